"""A one-node SLURM cluster of our own for a test: munged, slurmctld and slurmd on loopback, every file (config, key,
state, spool, logs) under one directory, stopped by PID at the end.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Needs root (slurmd starts job steps as their user) and Debian's slurm-wlm + munge (tests/run.sh installs them);
`missing()` says exactly what is absent. The node is this host under its own hostname, which must resolve: jax's
SLURM cluster detection connects to the first node of the step by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "not root: slurmd must run as root to start job steps"
    absent = [d for d in DAEMONS if shutil.which(d, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge)"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        return f"this host's name {socket.gethostname()!r} does not resolve"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One partition `cpu` of one node (this host, all its CPUs), KillWait 30 s, requeue allowed, no accounting."""

    def __init__(self, root: Path, kill_wait_s: int = 30):
        self.root = Path(root)
        self.kill_wait_s = kill_wait_s
        self.node = socket.gethostname()
        sbin = "/usr/sbin:/sbin"
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf"),
                    "PATH": f"{os.environ.get('PATH', '')}:{sbin}"}
        self._pids: list[int] = []

    def _config(self) -> str:
        r = self.root
        cpus = os.cpu_count() or 1
        return "\n".join([
            "ClusterName=atomo_test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={r / 'munge' / 'socket'}",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            # No cgroups in a container: track a job's processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={self.kill_wait_s}",
            "MinJobAge=3600",  # keep ended jobs in `scontrol show job` for the test to read
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            ""])

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        """Starts a daemon (it forks into the background) and keeps its PID (read now: slurmd removes its PID file
        when it begins to shut down)."""
        subprocess.run(argv, env=self.env, check=True, timeout=60, capture_output=True)
        self._wait(lambda: pid_file.exists() and pid_file.read_text().strip().isdigit(), f"{pid_file}", 30)
        self._pids.append(int(pid_file.read_text()))

    def __enter__(self) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        (r / "slurm.conf").write_text(self._config())
        try:
            subprocess.run(["mungekey", "--create", f"--keyfile={r / 'munge' / 'key'}"], env=self.env, check=True,
                           timeout=60, capture_output=True)
            (r / "munge" / "key").chmod(0o400)
            self._daemon(["munged", "--force", f"--key-file={r / 'munge' / 'key'}",
                          f"--socket={r / 'munge' / 'socket'}", f"--pid-file={r / 'munge' / 'pid'}",
                          f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}"],
                         r / "munge" / "pid")
            self._daemon(["slurmctld", "-i"], r / "slurmctld.pid")  # -i: no state from an earlier run
            self._daemon(["slurmd"], r / "slurmd.pid")
            self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t").stdout, "the node to come up", 60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Cancels every job (their processes end with them), then stops the daemons by PID, slurmd first."""
        if (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--user=root", check=False)
            try:
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), "jobs to end",
                           self.kill_wait_s + 30)
            except TimeoutError:
                pass
        for pid in reversed(self._pids):
            _stop(pid)
        self._pids.clear()

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode:
            raise AssertionError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, ExitCode, Restarts, TimeLimit, ...)."""
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "-o", "show", "job", job_id).stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        """The daemons' log tails, for a failure message."""
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted((self.root / "log").glob("*.log")))

    @staticmethod
    def _wait(predicate, what: str, timeout: float) -> None:
        t0 = time.time()
        while not predicate():
            if time.time() - t0 > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)


def _stop(pid: int, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
