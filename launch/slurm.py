r"""Submit training to a SLURM cluster (launch/slurm.sbatch). GPU nodes: one task per node driving all of its
GPUs. CPU nodes (`--gpus_per_node=0`): `--tasks_per_node` jax processes per node on CPU devices, for rehearsals,
latent caching and evaluation.

    python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
        --config=configs/X.py --workdir=/shared/runs/x --config.train.batch_size=64
    python launch/slurm.py --nodes=1 --gpus_per_node=0 --tasks_per_node=2 --partition=cpu \
        --config=configs/demo.py --workdir=/shared/runs/rehearsal

builds and runs one `sbatch ... launch/slurm.sbatch --config=... --workdir=... [--config.KEY=VALUE ...]` line
(`--dry-run` prints it and runs nothing). The workdir must be on storage every node shares. The job's log is
LOG_DIR/JOBNAME-JOBID.out (--log_dir, default REPO/runs/slurm). The job requeues itself before its time limit
(--requeue), and every rerun resumes from the workdir's latest checkpoint. Its ExitCode is the trainer's: 0 all
steps ran (COMPLETED), 75 stopped and saved before the last step (never COMPLETED), other values an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/slurm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (REPO_ROOT, LaunchError, Runner, add_process_flags, check_config, main_wrapper,
                           parse_env, split_overrides, train_argv)

SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"


def sbatch_argv(args, overrides: Sequence[str]) -> list[str]:
    """The sbatch line: resources as flags (they override the script's #SBATCH defaults), train args after it."""
    log_dir = Path(args.log_dir).resolve()
    platform = "cuda" if args.gpus_per_node else "cpu"
    export = ["ALL", f"ATOMO_PYTHON={args.python}", f"ATOMO_PLATFORM={platform}",
              *(f"{k}={v}" for k, v in parse_env(args.env).items())]
    if any("," in item for item in export[1:]):
        raise LaunchError("--python/--env values cannot contain ',' (sbatch --export separates variables with it)")
    flags = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.tasks_per_node}",
        *([f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []),
        f"--time={args.time}",
        f"--signal=B:USR1@{args.stop_margin_s}",
        f"--chdir={Path(args.repo_dir).resolve()}",
        f"--output={log_dir / '%x-%j.out'}",
        f"--export={','.join(export)}",
    ]
    flags += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    flags += [f"--partition={args.partition}"] if args.partition else []
    flags += [f"--account={args.account}"] if args.account else []
    flags += [f"--qos={args.qos}"] if args.qos else []
    flags += list(args.sbatch_flag)
    train_args = train_argv("python", args.config, args.workdir, overrides)[3:]  # the script adds python -m ...
    return ["sbatch", *flags, str(SBATCH_SCRIPT), *train_args]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurm.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("job")
    g.add_argument("--nodes", type=int, default=1, help="nodes; one training process per node (default 1)")
    g.add_argument("--gpus_per_node", type=int, default=8,
                   help="GPUs per node, all used by its process (default 8); 0: CPU nodes")
    g.add_argument("--tasks_per_node", type=int, default=1,
                   help="jax processes per node; more than 1 only on CPU nodes (default 1)")
    g.add_argument("--cpus_per_task", type=int, help="CPUs for each node's process (default: all CPUs of the node)")
    g.add_argument("--time", default="24:00:00", help="time limit per run (the job requeues itself; default 24:00:00)")
    g.add_argument("--stop_margin_s", type=int, default=300,
                   help="seconds before the time limit at which the trainer is told to save and stop (default 300)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--job_name", default="atomo_jax")
    g.add_argument("--sbatch_flag", action="append", default=[], metavar="FLAG",
                   help="extra sbatch flag, e.g. --sbatch_flag=--constraint=h100 (repeatable)")
    g.add_argument("--log_dir", default=str(REPO_ROOT / "runs" / "slurm"),
                   help="where the job's output file goes (default REPO/runs/slurm)")
    add_process_flags(parser, g,
                      python_help="Python on the compute nodes (default: this interpreter; its venv must be on "
                                  "shared storage)",
                      repo_help="checkout the job runs in (shared storage)",
                      env_help="extra environment for the trainer (repeatable), e.g. XLA_FLAGS=...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = split_overrides(extra)
    if args.nodes < 1 or args.gpus_per_node < 0 or args.tasks_per_node < 1:
        raise LaunchError(f"--nodes={args.nodes} --gpus_per_node={args.gpus_per_node} "
                          f"--tasks_per_node={args.tasks_per_node}: expected >= 1, >= 0 (0: CPU nodes) and >= 1")
    if args.gpus_per_node and args.tasks_per_node != 1:
        raise LaunchError(f"--tasks_per_node={args.tasks_per_node} with GPUs: a GPU node runs one process that drives "
                          "all of its GPUs (--tasks_per_node is for CPU nodes, --gpus_per_node=0)")
    check_config(Path(args.repo_dir).resolve(), args.config)
    runner = Runner(args.dry_run)
    processes = args.nodes * args.tasks_per_node
    if args.gpus_per_node:
        runner.comment(f"{args.nodes} nodes x {args.gpus_per_node} GPUs = {args.nodes * args.gpus_per_node} devices, "
                       f"{processes} jax processes")
    else:
        runner.comment(f"{args.nodes} CPU nodes x {args.tasks_per_node} tasks = {processes} jax processes on CPU "
                       "devices")
    runner.comment(f"job log: {Path(args.log_dir).resolve() / (args.job_name + '-JOBID.out')}")
    runner.run(["mkdir", "-p", str(Path(args.log_dir).resolve())])
    return runner.run(sbatch_argv(args, overrides))


if __name__ == "__main__":
    sys.exit(main_wrapper(main, None))
