"""A SIGKILLed trainer leaves no process behind: its grain workers (and multiprocessing's resource tracker) exit
within seconds instead of running on under PID 1 (data_pipelines/worker_guard.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import TINY_DEMO, kill_all, losses, start, wait_for

EXIT_WITHIN_S = 5.0


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc; this is Linux)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkilled_trainer_leaves_no_workers(tmp_path):
    proc = start("atomo_jax.train", *TINY_DEMO, f"--workdir={tmp_path / 'run'}", "--config.data.worker_count=2",
                 "--config.train.log_every=1", "--config.train.num_steps=1000", "--config.checkpoint.every_steps=0",
                 "--config.sample.at_end=False")
    workers: list[int] = []
    try:
        wait_for(lambda: len(losses(tmp_path / "run")) >= 1, [proc], "the first step")
        workers = children(proc.pid)
        assert len(workers) >= 2, workers  # the two grain workers (+ the resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        t0 = time.time()
        while any(alive(w) for w in workers) and time.time() - t0 < EXIT_WITHIN_S:
            time.sleep(0.1)
        left = [w for w in workers if alive(w)]
        assert not left, f"still running {time.time() - t0:.1f} s after the trainer was killed: {left}"
    finally:  # whatever happened, end what this test started, by PID
        kill_all([proc])
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
