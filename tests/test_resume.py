"""Preemption and exact resume through the real CLI (1 CPU device, conftest's TINY_DEMO).

One run goes uninterrupted. A second run on another workdir is stopped with SIGTERM (must save and exit 75), resumed,
killed with SIGKILL at an arbitrary later step (possibly mid async save), and resumed to the end. Its per-step losses
(`losses.jsonl`) must equal the uninterrupted run's bit for bit: the data iterator restores the exact next batch and
the RNG continues.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from atomo_jax.training.preemption import STOPPED_EXIT_CODE
from tests.conftest import ROOT, TINY_DEMO, cli_env, losses, start, tensorboard_values, wait_for

NUM_STEPS = 10
RUN = [*TINY_DEMO, f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
       "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2", "--config.checkpoint.async_save=True",
       "--config.sample.at_end=False"]


def _start(workdir, *extra: str):
    return start("atomo_jax.train", *RUN, f"--workdir={workdir}", *extra, env=cli_env(1))


def _wait_for_step(proc, workdir: str, step: int) -> None:
    wait_for(lambda: max(losses(workdir), default=0) >= step, [proc], f"step {step}")


def test_sigterm_then_sigkill_resume_is_bitwise_identical(tmp_path):
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    reference = _start(full)  # runs alongside the interrupted one

    # SIGTERM: finish the step, save, exit 75 ("stopped, rerun to resume"), never 0 (a finished run).
    proc = _start(broken)
    _wait_for_step(proc, broken, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == STOPPED_EXIT_CODE, out[-3000:]
    stopped = max(losses(broken))
    assert f"preempted: saved step {stopped}" in out, out[-3000:]
    assert out.rstrip().endswith(f"stopped at step {stopped} of {NUM_STEPS}, checkpoint saved (exit code 75: rerun "
                                 "the same command to resume)"), out[-3000:]
    assert "done at step" not in out
    steps = sorted(int(d) for d in os.listdir(os.path.join(broken, "checkpoints")) if d.isdigit())
    assert steps[-1] == stopped

    # SIGKILL a few steps after the resume, with saves (async) in flight.
    proc = _start(broken)
    _wait_for_step(proc, broken, stopped + 3)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = max(losses(broken))

    proc = _start(broken)
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
    # So does TensorBoard: the steps re-run after each restart are shown once, with the resumed run's values.
    shown = tensorboard_values(os.path.join(broken, "tensorboard"), "loss")
    assert sorted(shown) == list(range(1, NUM_STEPS + 1)) and all(len(v) == 1 for v in shown.values()), shown
    assert all(abs(shown[s][0] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in shown), (shown, want)

    # The final checkpoint loads for inference.
    sys.path.insert(0, ROOT)
    from atomo_jax.training.checkpoint import load_inference
    config, _, params = load_inference(broken)
    assert config.train.num_steps == NUM_STEPS and params["unet"]


def sigterm_handled(pid: int) -> bool:
    """The process has installed a SIGTERM handler (bit 15 of SigCgt in /proc/PID/status; this is Linux)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        return False
    return False


def test_sigterm_during_startup_of_the_last_step_still_saves_and_samples(tmp_path):
    """A SIGTERM that arrives while the trainer is still importing and compiling, in a 1-step run: the step runs,
    is saved, the end-of-run sample is written, and the exit is 0 (not 143, not a skipped sample)."""
    workdir = tmp_path / "run"
    proc = _start(workdir, "--config.train.num_steps=1", "--config.sample.at_end=True", "--config.sample.num_steps=2")
    wait_for(lambda: sigterm_handled(proc.pid), [proc], "the SIGTERM handler")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert not losses(workdir) or max(losses(workdir)) == 1
    assert (workdir / "checkpoints" / "1").is_dir(), out[-3000:]
    assert "sample written" in out and (workdir / "samples" / "sample_0000001.mp4").exists(), out[-3000:]
