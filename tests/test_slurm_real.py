"""The SLURM launcher against a real SLURM: a one-node cluster of our own (tests/slurm_cluster.py) with a CPU
partition, the demo submitted through `launch/slurm.py --gpus_per_node=0` as a user would.

One job is requeued by hand mid-run, then stopped by its time limit's warning signal, and must end COMPLETED with
every step exactly once; another is stopped by hand and must not end COMPLETED. Skipped, with the reason, only on a
machine that cannot run slurmd (not root, packages absent); tests/run.sh installs the packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST_CPU_COMPILE, ROOT, TINY_DEMO
from tests.slurm_cluster import SlurmCluster, missing

REASON = missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cannot run a SLURM cluster here: {REASON}")

# The trainer is held (SIGSTOP) from each stop's cue until its signal is pending (`held`), so no step speed lets a
# run end before its signal; the time-limit signal alone comes up to ~30 s after its cue (slurmctld checks limits
# every 30 s), which an unheld 600-step run outran on 2 idle cores (~32 steps/s). 300 steps are ~9 s of steps
# there, dozens of the test's 0.2 s polls, to catch each run before its end.
NUM_STEPS = 300
# Both jobs run the same program (conftest's TINY_DEMO, which other tests compile too), compiled once for all.
DEMO = [*TINY_DEMO, "--config.train.log_every=1", "--config.checkpoint.every_steps=0", "--config.sample.at_end=False"]
PHASE_S = 600  # per wait; room for the suite's load (this file 160 s alone; its requeue test 139-143 s in a
# 2-worker suite, 2026-12-07)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def submit(cluster: SlurmCluster, tmp_path: Path, *flags: str) -> tuple[str, Path, Path]:
    """`launch/slurm.py` on the CPU partition -> (job id, job log, workdir). The submitting shell's environment
    goes with the job (--export=ALL) without JAX_PLATFORMS: the batch script must choose the backend itself."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    env = {k: v for k, v in cluster.env.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {FAST_CPU_COMPILE}"
    res = subprocess.run([sys.executable, "launch/slurm.py", "--gpus_per_node=0", "--partition=cpu",
                          "--stop_margin_s=120", f"--log_dir={logs}", f"--python={sys.executable}", *flags,
                          f"--workdir={workdir}", *DEMO], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"Submitted batch job (\d+)", res.stdout).group(1)
    return job_id, logs / f"atomo_jax-{job_id}.out", workdir


def steps(workdir: Path) -> list[int]:
    """The steps of losses.jsonl, line by line (a cut last line left out)."""
    path = workdir / "losses.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def wait(cluster: SlurmCluster, job_id: str, log: Path, predicate, what: str) -> None:
    t0 = time.time()
    while not predicate():
        state = cluster.job(job_id)["JobState"]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            if predicate():
                return
            raise AssertionError(f"job {job_id} {state} before {what}:\n{_tail(log)}")
        if time.time() - t0 > PHASE_S:
            raise AssertionError(f"timed out waiting for {what} (job {job_id} {state}):\n{_tail(log)}\n"
                                 f"{cluster.logs()}")
        time.sleep(0.2)


def trainer_pid(workdir: Path) -> int:
    """The trainer's process: `python -m atomo_jax.train ... --workdir=WORKDIR`, started by srun (whose own command
    line holds the same words after `srun`); of those, the one whose parent is not one (a forked data worker keeps
    its parent's command line)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argv[1:3] == ["-m", "atomo_jax.train"] and f"--workdir={workdir}" in argv:
            found[int(proc.name)] = int(_status(int(proc.name)).get("PPid", "0"))
    roots = [pid for pid, parent in found.items() if parent not in found]
    assert len(roots) == 1, f"expected one trainer process for {workdir}, found {sorted(found)}"
    return roots[0]


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@contextlib.contextmanager
def held(workdir: Path):
    """Stop the trainer (SIGSTOP) for the body, which makes SLURM signal it, and let it go (SIGCONT) once that
    SIGTERM is pending, SLURM continued it itself (a job kill sends SIGCONT first) or it is gone. A stopped trainer
    takes no steps, so the signal lands before the run's end however fast the machine is."""
    pid = trainer_pid(workdir)
    os.kill(pid, signal.SIGSTOP)
    term = 1 << (signal.SIGTERM - 1)
    try:
        while not _status(pid).get("State", "T").startswith("T"):  # SIGSTOP lands asynchronously
            time.sleep(0.05)
        yield
        t0 = time.time()
        while True:
            st = _status(pid)
            if not st or not st["State"].startswith("T") or (int(st["ShdPnd"], 16) | int(st["SigPnd"], 16)) & term:
                return
            assert time.time() - t0 < PHASE_S, f"no SIGTERM reached the held trainer (pid {pid}) in {PHASE_S} s"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def release(cluster: SlurmCluster, job_id: str) -> None:
    """SLURM holds a requeued batch job for about two minutes (its begin time; measured here: requeue at 07:49:58,
    started again at 07:52:48) before it may run again; start it soon after it is pending instead. Not in the same
    second as the requeue: slurmd revokes the old run's credential at second resolution, and a launch within that
    second is refused ("Killing non-startable batch JobId=1: Job credential revoked", the job FAILED 1:0)."""
    t0 = time.time()
    while cluster.job(job_id)["JobState"] != "PENDING":
        assert time.time() - t0 < PHASE_S, f"job {job_id} never went back to PENDING: {cluster.job(job_id)}"
        time.sleep(0.5)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")


def ended(cluster: SlurmCluster, job_id: str) -> bool:
    return cluster.job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _tail(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else f"(no job log at {log})"


def test_requeue_and_time_limit_save_resume_and_finish_every_step_once(cluster, tmp_path):
    job, log, workdir = submit(cluster, tmp_path, "--time=30", f"--config.train.num_steps={NUM_STEPS}")

    # `scontrol requeue` mid-run: SLURM SIGTERMs the job; the trainer saves within KillWait; the job runs again and
    # resumes from that checkpoint.
    wait(cluster, job, log, lambda: len(steps(workdir)) >= 3, "step 3")
    with held(workdir):
        cluster.run("scontrol", "requeue", job)
    release(cluster, job)
    wait(cluster, job, log, lambda: "resumed from checkpoint" in _tail(log), "the requeued run to resume")
    first_stop = int(re.search(r"preempted: saved step (\d+)", log.read_text()).group(1))
    assert first_stop >= 3 and int(cluster.job(job)["Restarts"]) == 1

    # The time limit: shortened so that less than --stop_margin_s (120 s) is left, SLURM sends the batch script
    # SIGUSR1; it stops the trainer, which saves, and requeues the job. The limit is put back while it waits.
    wait(cluster, job, log, lambda: max(steps(workdir), default=0) > first_stop + 2, "steps after the resume")
    with held(workdir):
        elapsed_min = int(cluster.job(job)["RunTime"].split(":")[-2]) + 1  # H:MM:SS, the job runs minutes only
        cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed_min + 1}")
    wait(cluster, job, log, lambda: "stopped for the time limit and saved; requeueing" in log.read_text(),
         "the time-limit stop")
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")
    release(cluster, job)
    wait(cluster, job, log, lambda: ended(cluster, job), "the job to end")

    text = log.read_text()
    info = cluster.job(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:] + cluster.logs()
    assert int(info["Restarts"]) == 2
    stops = [int(s) for s in re.findall(rf"stopped at step (\d+) of {NUM_STEPS}, checkpoint saved", text)]
    assert len(stops) == 2 and stops[0] == first_stop < stops[1] < NUM_STEPS, text[-4000:]
    assert text.count("resumed from checkpoint") == 2 and text.rstrip().endswith(f"done at step {NUM_STEPS}")
    assert steps(workdir) == list(range(1, NUM_STEPS + 1))  # every step once, in order, across three runs
    # Only the backend the job uses: the venv's libtpu never tries to open a TPU.
    assert "TPU" not in text, [line for line in text.splitlines() if "TPU" in line][:5]


def test_a_job_stopped_by_hand_is_not_completed(cluster, tmp_path):
    """`scancel --signal=TERM` reaches the trainer, which saves and exits 75: the job ends FAILED with that code,
    not COMPLETED."""
    job, log, workdir = submit(cluster, tmp_path, "--time=30", f"--config.train.num_steps={NUM_STEPS}")
    wait(cluster, job, log, lambda: len(steps(workdir)) >= 2, "step 2")
    with held(workdir):
        cluster.run("scancel", "--signal=TERM", job)
    wait(cluster, job, log, lambda: ended(cluster, job), "the job to end")
    text = log.read_text()
    info = cluster.job(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), text[-4000:] + cluster.logs()
    stopped = re.findall(rf"stopped at step (\d+) of {NUM_STEPS}, checkpoint saved", text)
    assert len(stopped) == 1 and "done at step" not in text, text[-4000:]
    assert (workdir / "checkpoints" / stopped[0]).is_dir() and max(steps(workdir)) == int(stopped[0])
