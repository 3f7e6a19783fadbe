"""Turn-taking for benchmark processes started together on one GPU: every process compiles at once (compiles are
CPU-bound and overlap well), then they time one after another in a fixed order, so a timed step never shares the GPU
with another process's compile, autotuning or steps, and a process allocates its big state only on its turn.

bench/gpu_run.sh sets `BENCH_GATE` (a directory), `BENCH_ORDER` (names, in timing order) and `BENCH_NAME` for each
process, and writes `<name>.exit` when a process ends, so a crash never leaves the others waiting. Without
`BENCH_GATE` both calls return at once (a process run alone)."""

from __future__ import annotations

import os
import time


def _path(name: str) -> str:
    return os.path.join(os.environ["BENCH_GATE"], name)


def compiled() -> None:
    """This process has compiled (and warmed up, for the peer)."""
    if os.environ.get("BENCH_GATE"):
        open(_path(os.environ["BENCH_NAME"] + ".compiled"), "w").close()


def wait_turn(timeout_s: float = 900.0) -> None:
    """Blocks until every process has compiled or ended and the one before this in BENCH_ORDER has ended; raises
    TimeoutError rather than time steps that might share the GPU."""
    if not os.environ.get("BENCH_GATE"):
        return
    order = os.environ["BENCH_ORDER"].split()
    me = os.environ["BENCH_NAME"]
    before = order[:order.index(me)]
    d = os.environ["BENCH_GATE"]
    done = lambda n: os.path.exists(_path(n + ".exit"))
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if all(done(n) or os.path.exists(_path(n + ".compiled")) for n in order) and all(done(n) for n in before):
            return
        time.sleep(0.25)
    raise TimeoutError(f"bench gate: {me} waited {timeout_s:.0f} s for its turn after {before} in {d}")
