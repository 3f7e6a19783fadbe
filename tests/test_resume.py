"""Preemption and exact resume through the real CLI (1 CPU device, the demo shrunk to 4 frames).

One run goes uninterrupted. A second run on another workdir is stopped with SIGTERM (must save and exit 0), resumed,
killed with SIGKILL at an arbitrary later step (possibly mid async save), and resumed to the end. Its per-step losses
(`losses.jsonl`) must equal the uninterrupted run's bit for bit: the data iterator restores the exact next batch and
the RNG continues.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

from tests.conftest import ROOT, cli_env, losses, start, wait_for

NUM_STEPS = 10

CONFIG = textwrap.dedent(f"""
    from configs import demo

    def get_config():
        c = demo.get_config()
        c.train.num_steps = {NUM_STEPS}
        c.train.batch_size = 2
        c.train.log_every = 1
        c.data.num_frames = 4
        c.data.num_videos = 64
        c.checkpoint.every_steps = 2
        c.checkpoint.keep = 2
        c.checkpoint.async_save = True
        c.sample.at_end = False
        return c
""")


def _start(cfg: str, workdir: str):
    return start("atomo_jax.train", f"--config={cfg}", f"--workdir={workdir}", env=cli_env(1))


def _wait_for_step(proc, workdir: str, step: int) -> None:
    wait_for(lambda: max(losses(workdir), default=0) >= step, [proc], f"step {step}")


def test_sigterm_then_sigkill_resume_is_bitwise_identical(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG)
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    reference = _start(str(cfg), full)  # runs alongside the interrupted one

    # SIGTERM: finish the step, save, exit 0.
    proc = _start(str(cfg), broken)
    _wait_for_step(proc, broken, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(losses(broken))
    assert f"preempted: saved step {stopped}" in out, out[-3000:]
    steps = sorted(int(d) for d in os.listdir(os.path.join(broken, "checkpoints")) if d.isdigit())
    assert steps[-1] == stopped

    # SIGKILL a few steps after the resume, with saves (async) in flight.
    proc = _start(str(cfg), broken)
    _wait_for_step(proc, broken, stopped + 3)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = max(losses(broken))

    proc = _start(str(cfg), broken)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from checkpoint" in out

    out, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out[-3000:]
    want, got = losses(full), losses(broken)
    assert sorted(want) == list(range(1, NUM_STEPS + 1))
    assert got == want, (stopped, killed_at, got, want)
    # The log reads as one run: no duplicated or stale lines after the resumes.
    lines = [json.loads(x)["step"] for x in open(os.path.join(broken, "losses.jsonl"))]
    assert lines == list(range(1, NUM_STEPS + 1))

    # The final checkpoint loads for inference.
    sys.path.insert(0, ROOT)
    from atomo_jax.training.checkpoint import load_inference
    config, _, params = load_inference(broken)
    assert config.train.num_steps == NUM_STEPS and params["unet"]
