r"""Run training on this machine: one process, or N processes on fake CPU devices to rehearse a multi-host job.

    python launch/local.py --config=configs/demo.py --workdir=/tmp/demo --config.train.num_steps=20
    python launch/local.py --num_processes=2 --devices_per_process=4 --config=configs/demo.py --workdir=/tmp/mh

With --num_processes=N each process gets XLA_FLAGS=--xla_force_host_platform_device_count=K (K =
--devices_per_process), JAX_PLATFORMS=cpu, and ATOMO_COORDINATOR=127.0.0.1:PORT, ATOMO_NUM_PROCESSES=N,
ATOMO_PROCESS_ID=i, which the trainer passes to jax.distributed.initialize. Process 0 prints to the terminal; the
others write LOG_DIR/process_<i>.log. If one process fails the others are stopped. SIGINT/SIGTERM are passed on as
SIGTERM, so the trainer saves a checkpoint; rerunning with the same workdir resumes from it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python launch/local.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (LaunchError, add_process_flags, check_config, env_argv, main_wrapper, parse_env,
                           show, split_overrides, train_argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(num_processes: int, devices_per_process: int | None, port: int,
                 extra: dict[str, str]) -> list[dict[str, str]]:
    """The environment each process adds to the inherited one."""
    envs = []
    for i in range(num_processes):
        env: dict[str, str] = {}
        if devices_per_process:
            flags = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        if num_processes > 1:
            env.update(ATOMO_COORDINATOR=f"127.0.0.1:{port}", ATOMO_NUM_PROCESSES=str(num_processes),
                       ATOMO_PROCESS_ID=str(i))
        env.update(extra)
        envs.append(env)
    return envs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("processes")
    g.add_argument("--num_processes", type=int, default=1, help="local jax processes (default 1)")
    g.add_argument("--devices_per_process", type=int,
                   help="fake CPU devices per process (default: 4 with --num_processes > 1, else the real devices)")
    g.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    g.add_argument("--log_dir", help="logs of processes 1..N-1 (default WORKDIR/process_logs)")
    add_process_flags(parser, g, python_help="Python to run the trainer with (default: this one)",
                      repo_help="checkout to run in (default: this one)", env_help="extra environment (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = split_overrides(extra)
    n = args.num_processes
    if n < 1:
        raise LaunchError(f"--num_processes={n}: must be >= 1")
    devices = args.devices_per_process or (4 if n > 1 else None)
    if devices is not None and devices < 1:
        raise LaunchError(f"--devices_per_process={devices}: must be >= 1")
    repo = Path(args.repo_dir).resolve()
    check_config(repo, args.config)
    port = args.port or (free_port() if n > 1 else 0)
    envs = process_envs(n, devices, port, parse_env(args.env))
    cmd = train_argv(args.python, args.config, args.workdir, overrides)
    log_dir = Path(args.log_dir or Path(args.workdir) / "process_logs").resolve()
    logs = [None] + [log_dir / f"process_{i}.log" for i in range(1, n)]

    if args.dry_run:
        print(show(["cd", str(repo)]))
        if n > 1:
            print(show(["mkdir", "-p", str(log_dir)]))
        for i in range(n - 1, -1, -1):  # background workers first, process 0 in the foreground, like the real run
            line = show(env_argv(envs[i], cmd))
            print(f"{line} >{shlex.quote(str(logs[i]))} 2>&1 &" if logs[i] else line)
        if n > 1:
            print("wait")
        return 0

    if n > 1:
        log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for i in range(n - 1, -1, -1):
        out = open(logs[i], "ab") if logs[i] else None
        print(f"[launch] process {i}: {show(env_argv(envs[i], cmd))}" + (f"  (log: {logs[i]})" if out else ""),
              file=sys.stderr, flush=True)
        procs.append(subprocess.Popen(cmd, cwd=repo, env={**os.environ, **envs[i]}, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
        if out:
            out.close()  # the child holds its own descriptor

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return wait_all(procs)


def wait_all(procs: Sequence[subprocess.Popen]) -> int:
    """Waits for every process; after the first failure the rest get SIGTERM (they would block in collectives)."""
    rc = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and rc == 0:
            rc = failed[0]
            print(f"[launch] a process exited with code {rc}; stopping the others", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    return rc or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main_wrapper(main, None))
