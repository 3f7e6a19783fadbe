"""Shared test setup: run from the repo root so `configs.*` imports work, and share one XLA compilation cache
across the whole run.

Many tests start trainers in subprocesses (resume, SIGTERM, multi-process, CLIs) that compile the same programs
again; JAX's persistent compilation cache lets every process after the first load them instead. The cache lives in
a fresh directory per pytest run (xdist workers inherit it from the controller) and is removed at the end, so no
compiled program outlives the run. Set JAX_COMPILATION_CACHE_DIR yourself to keep one between runs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_OWN_CACHE = None

# XLA:CPU flags for compiles whose programs are checked for values, shardings or memory figures, never for speed: no
# LLVM optimisation of the generated kernels. The optimised HLO, and so buffer sizes, FLOPs and collectives, are the
# same (the full-size fit check of test_aot: identical arguments, temporaries, outputs and FLOPs). Compiles get
# somewhat faster on this machine: demo train step 30 s -> 26 s, full-size fit check 218 s -> 205 s.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The suite's own process too (models built and trained in-process: the demo's training fixture 93 s -> 67 s). Set
# before anything imports jax, whose CPU client reads XLA_FLAGS when it starts; xdist workers inherit it.
if FAST_CPU_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_COMPILE}".strip()

# The demo shrunk from the command line as a user shrinks it, for the tests of mechanisms (resume, signals, damaged
# checkpoints, launchers, the sample CLI) rather than of the model: one UNet level (every layer kind once: resnet,
# temporal conv, spatial + IP attention, motion module), 16 px, 4 frames, batch 2. Its train step compiles in a
# fraction of the demo's time, and every 1-device run of it is the same program, so the compilation cache gives the
# suite one compile for all of them. Tests append only runtime flags (steps, checkpoints, logging, sampling). No
# held-out scoring: tests/test_train_demo.py covers it.
TINY_DEMO = ("--config=configs/demo.py", "--config.model.unet.block_out_channels=(32,)",
             "--config.model.unet.down_attention=(True,)", "--config.data.resolution=16", "--config.data.num_frames=4",
             "--config.sample.num_frames=4", "--config.train.batch_size=2", "--config.data.num_videos=64",
             "--config.sample.heldout_clips=0")


def tiny_demo_config():
    """TINY_DEMO as a ConfigDict, parsed as the trainer parses it, for tests that build the model in Python."""
    from atomo_jax.configuration import load_config
    return load_config(TINY_DEMO[0].removeprefix("--config="), TINY_DEMO[1:])

# The slowest files, longest first (seconds per file, summed from the 25 slowest tests of one 2-worker run on the
# 2-core machine, 2026-12-07, 17 min 23 s in all): test_journey 252, test_train_demo 214 (its brief demo run),
# test_buckets 214, test_sharding 209, test_lora 178, test_slurm_real 141, test_aot 115, test_resume 68,
# test_sample_cli 68, test_convert_cli 64, test_checkpoint_fallback 57. With --dist loadfile, xdist hands out whole
# files in collection order, re-sorted by test count unless told not to, so the long one-test files went last and
# finished together at the end; longest first lets the short files fill in around them.
SLOWEST_FIRST = ("test_journey.py", "test_train_demo.py", "test_buckets.py", "test_sharding.py", "test_lora.py",
                 "test_slurm_real.py", "test_aot.py", "test_resume.py", "test_sample_cli.py", "test_convert_cli.py",
                 "test_checkpoint_fallback.py", "test_multiprocess.py", "test_packing.py", "test_install.py",
                 "test_export.py", "test_worker_exit.py")


def pytest_configure(config: pytest.Config) -> None:
    global _OWN_CACHE
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep our file order (see SLOWEST_FIRST)
        config.option.loadscopereorder = False
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run) makes it; workers inherit it
        _OWN_CACHE = tempfile.mkdtemp(prefix="atomo_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in SLOWEST_FIRST first, in that order; the sort is stable, so the rest keep their order and every file its
    own test order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# ---- one subprocess harness for every test that runs the project's CLIs as a user does ---------------------------


def cli_env(devices: int = 1, **extra: str) -> dict:
    """Environment of a CLI run: CPU only, `devices` fake devices, FAST_CPU_COMPILE (tests check values, not speed)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_CPU_COMPILE}", **extra}


def start(module: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m MODULE ARGS` from the repository root, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(module: str, *args: str, env: dict | None = None, timeout: float = 900) -> str:
    """Runs a CLI to the end; its output, or a failure showing the output's tail."""
    proc = start(module, *args, env=env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"python -m {module} {' '.join(args)} exited {proc.returncode}:\n{out[-5000:]}"
    return out


def start_processes(module: str, *args: str, num_processes: int, devices_per_process: int,
                    extra_args: Sequence[Sequence[str]] | None = None) -> list[subprocess.Popen]:
    """One multi-host job of `num_processes` local processes (jax.distributed on 127.0.0.1 through the ATOMO_*
    variables the entry points honour); `extra_args[i]` are appended for process i."""
    port = free_port()
    return [start(module, *args, *(extra_args[i] if extra_args else ()),
                  env=cli_env(devices_per_process, ATOMO_COORDINATOR=f"127.0.0.1:{port}",
                              ATOMO_NUM_PROCESSES=str(num_processes), ATOMO_PROCESS_ID=str(i)))
            for i in range(num_processes)]


def wait_all(procs: Sequence[subprocess.Popen], timeout: float = 900, returncode: int = 0) -> list[str]:
    """Waits for every process; their outputs, or a failure showing the tail of each one that did not exit with
    `returncode`."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == returncode, f"process {i} exited {p.returncode}:\n{out[-5000:]}"
    return outs


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL to each process we started (by PID), then reap it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=60)


def race_threads(targets: Sequence[Callable[[], None]]) -> None:
    """Runs the callables in threads at once with a 1 us switch interval, so shared state races as it would under
    grain's read threads; returns when all are done."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=t) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: str | os.PathLike) -> dict[int, float]:
    """`WORKDIR/losses.jsonl` as {step: loss} (complete lines only: a kill may cut the last one)."""
    path = os.path.join(workdir, "losses.jsonl")
    out = {}
    if os.path.exists(path):
        for line in open(path):
            if line.endswith("\n"):
                rec = json.loads(line)
                out[rec["step"]] = rec["loss"]
    return out


def wait_for(predicate: Callable[[], bool], procs: Sequence[subprocess.Popen], what: str,
             timeout: float = 900) -> None:
    """Polls `predicate` while every process in `procs` is alive."""
    t0 = time.time()
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"exited ({p.returncode}) before {what}:\n{p.stdout.read()[-5000:]}")
        if time.time() - t0 > timeout:
            kill_all(procs)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def tensorboard_values(logdir: str | os.PathLike, tag: str) -> dict[int, list]:
    """{step: values} of one tag as TensorBoard shows it: event files in order, and a restart's SessionLog.START at
    step s hiding the points at steps >= s written before it (how MetricWriter marks a resume). A value is a float for
    a scalar, the encoded bytes for an image."""
    import struct

    from tensorboard.compat.proto import event_pb2

    out: dict[int, list] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {s: v for s, v in out.items() if s < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    item = value.image.encoded_image_string if value.HasField("image") else value.simple_value
                    out.setdefault(event.step, []).append(item)
    return out
