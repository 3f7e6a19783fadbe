r"""Train on a Cloud TPU pod (one slice, or several slices over DCN): create, set up, train, survive preemption, delete.

    python launch/tpu_pod.py run --name=my-pod --zone=us-east5-a --project=my-proj --accelerator_type=v5p-64 --spot \
        --config=configs/X.py --workdir=gs://my-bucket/runs/x --config.train.batch_size=32

Subcommands: `create`, `setup` (ship the working tree + install on every worker), `train` (the identical training
command on all workers), `run` (AOT fit check, then create + setup + train, recreating the pod and rerunning after a
preemption; training resumes from the latest checkpoint in the same GCS workdir), `delete`. Every subcommand has
`--dry-run` (prints the exact commands, one per line; `#` lines are notes) and `--help`.

Arguments after the launcher flags of the form `--config.KEY=VALUE` are passed verbatim to the trainer (and to the AOT
check), quoted for the remote shell.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/tpu_pod.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (REPO_ROOT, LaunchError, Runner, add_train_flags, check_config, env_argv, main_wrapper,
                           override_value, parse_env, show, split_overrides, train_argv)

# Paths on the workers, relative to the ssh user's home (where gcloud scp puts relative paths).
REMOTE_TARBALL = "atomo_jax_src.tar.gz"  # tpu_worker.sh reads it too
REMOTE_REPO = "atomo_jax_repo"
REMOTE_LOG = "atomo_logs/train.log"
REMOTE_PYTHON = '"$HOME/atomo_venv/bin/python"'  # expanded by the remote shell, hence not shell-quoted

# The config's data parallelism across slices (over DCN); must equal the number of slices.
DCN_KEY = "mesh.dcn_data"

# Flags that let XLA overlap collectives with compute on TPU (the set MaxText uses on v4/v5p). Replace or empty with
# --libtpu_init_args if a libtpu version rejects one.
DEFAULT_LIBTPU_INIT_ARGS = " ".join([
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
])

# Runtime (OS image) Google documents for JAX on each generation.
_RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
_CORES_NAMED = {"v2", "v3", "v4", "v5p"}  # the number in the name counts TensorCores (2 per chip), not chips
_CHIP_SIZES = {1, 4, 8, 16, 32, 64, 128, 256}  # v5e / v6e slice sizes in chips


@dataclass(frozen=True)
class TpuType:
    """One slice's accelerator type and its shape in hosts."""
    name: str  # as given by the user (passed to the AOT check)
    generation: str  # v2 v3 v4 v5e v5p v6e
    gcloud_name: str  # --accelerator-type for gcloud (v5e is spelled v5litepod there)
    chips: int
    hosts: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def parse_accelerator(name: str) -> TpuType:
    """`v5p-64` -> 32 chips on 8 hosts. Numbers count TensorCores for v2-v5p and chips for v5e/v6e."""
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise LaunchError(f"--accelerator_type={name}: expected a TPU type like v4-32, v5p-64, v5litepod-16 (v5e-16) "
                          "or v6e-64")
    gen, n = m.group(1), int(m.group(2))
    gen = "v5e" if gen == "v5litepod" else gen
    if gen in _CORES_NAMED:
        if n < 8 or n % 8:
            raise LaunchError(f"--accelerator_type={name}: {gen} sizes count TensorCores and are multiples of 8")
        chips = n // 2
        hosts = chips // 4
    else:
        if n not in _CHIP_SIZES:
            raise LaunchError(f"--accelerator_type={name}: {gen} sizes are {sorted(_CHIP_SIZES)} chips")
        chips = n
        hosts = 1 if n <= 8 else n // 4  # up to 8 chips sit on one host; larger slices have 4 chips per host
    gcloud_name = f"v5litepod-{n}" if gen == "v5e" else f"{gen}-{n}"
    return TpuType(name=name, generation=gen, gcloud_name=gcloud_name, chips=chips, hosts=hosts)


@dataclass(frozen=True)
class Pod:
    """The gcloud commands for one TPU VM (tpu-vm) or queued resource (several slices, or --queued)."""
    name: str
    tpu: TpuType
    zone: str | None
    project: str | None
    num_slices: int = 1
    queued: bool = False

    @property
    def is_queued_resource(self) -> bool:
        return self.queued or self.num_slices > 1

    @property
    def healthy_state(self) -> str:
        return "ACTIVE" if self.is_queued_resource else "READY"

    def _gcloud(self, *words: str) -> list[str]:
        group = ["queued-resources"] if self.is_queued_resource else ["tpu-vm"]
        loc = [f"--zone={self.zone}"] if self.zone else []
        loc += [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", *group, *words, *loc]

    def create(self, runtime_version: str, spot: bool) -> list[str]:
        if self.is_queued_resource:
            nodes = ([f"--node-count={self.num_slices}", f"--node-prefix={self.name}"] if self.num_slices > 1
                     else [f"--node-id={self.name}"])
            argv = self._gcloud("create", self.name, f"--accelerator-type={self.tpu.gcloud_name}",
                                f"--runtime-version={runtime_version}", *nodes)
        else:
            argv = self._gcloud("create", self.name, f"--accelerator-type={self.tpu.gcloud_name}",
                                f"--version={runtime_version}")
        return argv + (["--spot"] if spot else [])

    def describe(self) -> list[str]:
        field = "state.state" if self.is_queued_resource else "state"
        return self._gcloud("describe", self.name, f"--format=value({field})")

    def delete(self) -> list[str]:
        # --force: a queued resource is deleted together with its nodes.
        return self._gcloud("delete", self.name, "--quiet", *(["--force"] if self.is_queued_resource else []))

    def _all_workers(self) -> list[str]:
        return ["--worker=all", *(["--node=all"] if self.is_queued_resource else [])]

    def ssh_all(self, command: str) -> list[str]:
        # Keep-alives make a dead (preempted) worker end the ssh session instead of hanging it.
        return self._gcloud("ssh", self.name, *self._all_workers(), f"--command={command}",
                            "--ssh-flag=-o ServerAliveInterval=30 -o ServerAliveCountMax=10")

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        return self._gcloud("scp", local, f"{self.name}:{remote}", *self._all_workers())

    def scp_from(self, remote: str, local: str, slice_index: int, worker: int) -> list[str]:
        # gcloud copies to the client from one worker at a time.
        node = [f"--node={slice_index}"] if self.is_queued_resource else []
        return self._gcloud("scp", f"{self.name}:{remote}", local, f"--worker={worker}", *node)


def setup_command(python_version: str, jax_spec: str) -> str:
    """The remote shell command that unpacks the shipped tree and installs it (idempotent)."""
    return (f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_REPO} && "
            f"cd {REMOTE_REPO} && bash launch/tpu_worker.sh setup {show([python_version, jax_spec])}")


def train_env(workdir: str, libtpu_init_args: str, extra: dict[str, str]) -> dict[str, str]:
    env = {
        "PYTHONUNBUFFERED": "1",
        "JAX_PLATFORMS": "tpu,cpu",  # fail loudly rather than train on the host CPU if the TPU is unusable
        # Compiled executables survive preemption: a restarted job skips most of its compile time.
        "JAX_COMPILATION_CACHE_DIR": f"{workdir.rstrip('/')}/jax_cache",
    }
    if libtpu_init_args:
        env["LIBTPU_INIT_ARGS"] = libtpu_init_args
    env.update(extra)
    return env


def train_command(config: str, workdir: str, overrides: Sequence[str], env: dict[str, str]) -> str:
    """The remote shell command run on every worker: identical everywhere; jax.distributed finds the pod itself."""
    argv = train_argv("PYTHON", config, workdir, overrides)[1:]
    return (f"cd {REMOTE_REPO} && {show(env_argv(env, ['bash', 'launch/tpu_worker.sh', 'train']))} "
            f'"$HOME/{REMOTE_LOG}" {REMOTE_PYTHON} {show(argv)}')


def aot_argv(config: str, tpu: TpuType, num_slices: int, overrides: Sequence[str]) -> list[str]:
    slices = [f"--num_slices={num_slices}"] if num_slices > 1 else []
    return [sys.executable, "-m", "atomo_jax.aot", f"--config={config}", f"--topology={tpu.name}", *slices,
            *overrides]


def default_jax_spec(repo: Path) -> str:
    """`jax[tpu]` at the version requirements.txt pins, so the pod runs the jax the code was tested with."""
    req = repo / "requirements.txt"
    text = req.read_text() if req.is_file() else ""
    m = re.search(r"^jax(?:\[[a-z,]*\])?==([\w.]+)\s*$", text, re.M)
    if not m:
        raise LaunchError(f"{req}: no pinned 'jax==VERSION' line; pass --jax_spec (e.g. 'jax[tpu]==0.10.2')")
    return f"jax[tpu]=={m.group(1)}"


def pack(repo: Path, out: Path) -> None:
    """Tars the working tree as git sees it (tracked + untracked, minus ignored): uncommitted edits ship too."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise LaunchError(f"{repo} is not a git checkout ({listed.stderr.strip()}); the launcher ships what git tracks")
    with tarfile.open(out, "w:gz") as tar:
        for rel in sorted(set(filter(None, listed.stdout.split("\0")))):
            if (repo / rel).is_file():  # skips tracked files deleted in the working tree
                tar.add(repo / rel, arcname=rel)


# ---------------------------------------------------------------------------------------------------------- steps


def _pod(args) -> Pod:
    if args.num_slices < 1:
        raise LaunchError(f"--num_slices={args.num_slices}: must be >= 1")
    return Pod(name=args.name, tpu=parse_accelerator(args.accelerator_type), zone=args.zone, project=args.project,
               num_slices=args.num_slices, queued=args.queued)


def _tarball(args) -> str:
    return str(Path(tempfile.gettempdir()) / f"atomo_jax-{args.name}.tar.gz")


def do_create(args, pod: Pod, runner: Runner, check: bool = True) -> int:
    runtime = args.runtime_version or _RUNTIME[pod.tpu.generation]
    return runner.run(pod.create(runtime, args.spot), check=check)


def do_setup(args, pod: Pod, runner: Runner, check: bool = True) -> int:
    repo = Path(args.repo_dir).resolve()
    tarball = _tarball(args)
    runner.run([sys.executable, str(Path(__file__).resolve()), "pack", f"--repo_dir={repo}", f"--out={tarball}"])
    rc = runner.run(pod.scp_to_all(tarball, REMOTE_TARBALL), check=check)
    if rc:
        return rc
    jax_spec = args.jax_spec or default_jax_spec(repo)
    return runner.run(pod.ssh_all(setup_command(args.python_version, jax_spec)), check=check)


def _train_inputs(args, pod: Pod) -> tuple[list[str], dict[str, str]]:
    if not args.workdir.startswith("gs://"):
        raise LaunchError(f"--workdir={args.workdir}: a pod needs a GCS workdir (gs://bucket/path) that every host "
                          "shares and that outlives a preempted pod")
    check_config(Path(args.repo_dir).resolve(), args.config)
    overrides = list(args.overrides)
    if pod.num_slices > 1:
        dcn = override_value(overrides, DCN_KEY)
        if dcn is None:
            overrides.append(f"--config.{DCN_KEY}={pod.num_slices}")
        elif dcn != str(pod.num_slices):
            raise LaunchError(f"--config.{DCN_KEY}={dcn} but --num_slices={pod.num_slices}: data "
                              "parallelism across slices must equal the number of slices")
    return overrides, train_env(args.workdir, args.libtpu_init_args, parse_env(args.env))


def _log_root(args) -> Path:
    return Path(args.log_dir).resolve() if args.log_dir else REPO_ROOT / "runs" / args.name / "logs"


def do_train(args, pod: Pod, runner: Runner, log_dir: Path) -> int:
    overrides, env = _train_inputs(args, pod)
    runner.comment(f"{pod.num_slices} x {pod.tpu.gcloud_name}: {pod.tpu.chips} chips per slice on {pod.tpu.hosts} "
                   f"hosts ({pod.tpu.chips_per_host} chips each), {pod.num_slices * pod.tpu.hosts} workers in all")
    rc = runner.run(pod.ssh_all(train_command(args.config, args.workdir, overrides, env)), check=False)
    collect_logs(pod, runner, log_dir)
    return rc


def collect_logs(pod: Pod, runner: Runner, log_dir: Path) -> None:
    """Per-worker logs to log_dir/slice{S}-worker{W}.log (best effort: a dead worker has no log to give)."""
    runner.run(["mkdir", "-p", str(log_dir)])
    for s in range(pod.num_slices):
        for w in range(pod.tpu.hosts):
            runner.run(pod.scp_from(REMOTE_LOG, str(log_dir / f"slice{s}-worker{w}.log"), s, w), check=False)


def query_state(pod: Pod, runner: Runner) -> str | None:
    """The pod's state, or None if it does not exist. Retries transient gcloud failures."""
    for attempt in range(5):
        out = runner.output(pod.describe())
        if out.returncode == 0:
            return out.stdout.strip() or None
        if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower():
            return None
        time.sleep(10 * (attempt + 1))
    raise LaunchError(f"cannot query {pod.name}: {out.stderr.strip()}")


# 75: the trainer was stopped (a maintenance notice, SIGTERM) and saved; 143: a worker got SIGTERM (VM shutting
# down); 255: ssh lost the connection after gcloud's own retries.
_RETRYABLE = (75, 143, 255)
_WAITING = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES"}


def wait_until_ready(pod: Pod, runner: Runner, poll_s: float) -> str | None:
    """Polls until the pod is usable or broken; returns the final state (None: gone)."""
    while True:
        state = query_state(pod, runner)
        if state not in _WAITING and state != "DELETING":
            return state
        runner.comment(f"{pod.name} is {state}; waiting")
        time.sleep(poll_s)


def do_run(args, pod: Pod, runner: Runner) -> int:
    """AOT check, then create/setup/train until training ends on a healthy pod; recreate after preemption."""
    overrides, env = _train_inputs(args, pod)  # validates before anything is rented
    runner.cd(Path(args.repo_dir).resolve())  # the AOT check imports the shipped code and reads the config from here
    if args.skip_aot_check:
        runner.comment("AOT fit check skipped (--skip_aot_check)")
    else:
        # Same libtpu flags as the pod: they change scheduling and memory, and a flag libtpu rejects fails here.
        libtpu = {k: v for k, v in env.items() if k == "LIBTPU_INIT_ARGS"}
        runner.run(env_argv(libtpu, aot_argv(args.config, pod.tpu, pod.num_slices, overrides)))
    log_root = _log_root(args)
    if runner.dry_run:
        do_create(args, pod, runner)
        runner.comment(f"wait until `{show(pod.describe())}` prints {pod.healthy_state}")
        do_setup(args, pod, runner)
        do_train(args, pod, runner, log_root / "attempt-1")
        runner.comment(f"if {pod.name} is then gone or not {pod.healthy_state} (preempted): `{show(pod.delete())}`, "
                       f"then create, setup and train again with the same --workdir={args.workdir} (resumes from its "
                       f"latest checkpoint), up to {args.max_attempts} attempts")
        if args.delete_when_done:
            runner.run(pod.delete())
        return 0
    for attempt in range(1, args.max_attempts + 1):
        state = wait_until_ready(pod, runner, args.poll_seconds)
        if state not in (None, pod.healthy_state):
            runner.comment(f"{pod.name} is {state}: deleting it")
            runner.run(pod.delete(), check=False)
            state = wait_until_ready(pod, runner, args.poll_seconds)
        if state is None:
            if do_create(args, pod, runner, check=False):
                runner.comment(f"create failed (attempt {attempt}); retrying in {args.poll_seconds:.0f}s")
                time.sleep(args.poll_seconds)
                continue
            if wait_until_ready(pod, runner, args.poll_seconds) != pod.healthy_state:
                continue
        setup_rc = do_setup(args, pod, runner, check=False)
        rc = setup_rc or do_train(args, pod, runner, log_root / f"attempt-{attempt}")
        state = query_state(pod, runner)
        if state == pod.healthy_state:
            if rc in _RETRYABLE:
                runner.comment(f"lost the workers (exit code {rc}) on a healthy pod; rerunning (running training is "
                               "re-attached, stopped training resumes from its checkpoint)")
                continue
            if rc == 0:
                runner.comment(f"training finished; logs in {log_root}")
                if args.delete_when_done:
                    runner.run(pod.delete())
                return 0
            # A failure on a healthy pod is not a preemption: rerunning would only burn pod-hours.
            raise LaunchError(f"{'setup' if setup_rc else 'training'} failed with exit code {rc} on a healthy pod; "
                              f"logs in {log_root}. Fix and rerun the same command: it resumes from {args.workdir}")
        runner.comment(f"{pod.name} is {state or 'gone'} (preempted) after attempt {attempt}; recreating it. "
                       f"Training resumes from the latest checkpoint in {args.workdir}")
    raise LaunchError(f"gave up after {args.max_attempts} attempts (--max_attempts)")


# ---------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    pod = argparse.ArgumentParser(add_help=False)
    g = pod.add_argument_group("pod")
    g.add_argument("--name", required=True, help="TPU VM / queued resource name")
    g.add_argument("--accelerator_type", default="v5p-8",
                   help="one slice: v4-32, v5p-64 (TensorCores: 32 chips, 8 hosts), v5litepod-16 / v5e-16, v6e-64 "
                        "(chips)")
    g.add_argument("--num_slices", type=int, default=1,
                   help="slices over DCN; >1 uses a queued resource with --node-count and adds "
                        f"--config.{DCN_KEY}=N (the runtime sets the MEGASCALE_* env)")
    g.add_argument("--queued", action="store_true", help="use a queued resource even for one slice")
    g.add_argument("--zone", help="e.g. us-east5-a (default: gcloud config)")
    g.add_argument("--project", help="GCP project (default: gcloud config)")
    g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the exact commands, one per line, and run nothing")

    create = argparse.ArgumentParser(add_help=False)
    g = create.add_argument_group("create")
    g.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    g.add_argument("--runtime_version", help="TPU VM image (default per generation: " +
                   ", ".join(f"{k}: {v}" for k, v in _RUNTIME.items()) + ")")

    setup = argparse.ArgumentParser(add_help=False)
    g = setup.add_argument_group("setup")
    g.add_argument("--repo_dir", default=str(REPO_ROOT), help="working tree to ship (default: this checkout)")
    g.add_argument("--python_version", default="3.11", help="Python for the workers' venv (installed by uv)")
    g.add_argument("--jax_spec", help="jax requirement for the workers (default: jax[tpu]==the requirements.txt pin)")

    train = argparse.ArgumentParser(add_help=False)
    g = train.add_argument_group("train (then --config.KEY=VALUE overrides, passed to the trainer verbatim)")
    add_train_flags(g)
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the trainer on every worker (repeatable)")
    g.add_argument("--libtpu_init_args", default=DEFAULT_LIBTPU_INIT_ARGS,
                   help="LIBTPU_INIT_ARGS (default: async-collective flags; '' for none)")
    g.add_argument("--log_dir", help="local directory for per-worker logs (default: REPO/runs/NAME/logs)")

    parser = argparse.ArgumentParser(prog="tpu_pod.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    kw = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    sub.add_parser("create", parents=[pod, create], help="create the TPU VM or queued resource", **kw)
    sub.add_parser("setup", parents=[pod, setup], help="ship the working tree and install it on every worker", **kw)
    sub.add_parser("train", parents=[pod, setup, train], help="run the training command on every worker", **kw)
    run = sub.add_parser("run", parents=[pod, create, setup, train],
                         help="AOT check + create + setup + train, recreating the pod after preemption", **kw)
    run.add_argument("--skip_aot_check", action="store_true",
                     help="do not run `python -m atomo_jax.aot` locally before renting the pod")
    run.add_argument("--max_attempts", type=int, default=50, help="pod creations/trainings before giving up")
    run.add_argument("--poll_seconds", type=float, default=60.0, help="wait between state polls and retries")
    run.add_argument("--delete_when_done", action="store_true", help="delete the pod after training finishes")
    sub.add_parser("delete", parents=[pod], help="delete the TPU VM or queued resource (and its nodes)", **kw)
    pk = sub.add_parser("pack", help="(internal) tar the working tree for the workers", **kw)
    pk.add_argument("--repo_dir", default=str(REPO_ROOT))
    pk.add_argument("--out", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = split_overrides(extra)
    if args.overrides and args.command not in ("train", "run"):
        raise LaunchError(f"config overrides only apply to train and run, not {args.command}: {args.overrides}")
    if args.command == "pack":
        pack(Path(args.repo_dir).resolve(), Path(args.out))
        return 0
    pod, runner = _pod(args), Runner(args.dry_run)
    if args.command == "create":
        return do_create(args, pod, runner)
    if args.command == "setup":
        return do_setup(args, pod, runner)
    if args.command == "train":
        rc = do_train(args, pod, runner, _log_root(args))
        if rc:
            print(f"error: training exited with code {rc} on {pod.name}; per-worker logs in {_log_root(args)}. "
                  f"Rerun to resume from {args.workdir}", file=sys.stderr)
        return rc
    if args.command == "run":
        return do_run(args, pod, runner)
    return runner.run(pod.delete())


if __name__ == "__main__":
    sys.exit(main_wrapper(main, None))
