"""A damaged newest checkpoint never stops a relaunch: the trainer sets it aside (renamed, not deleted), says which
and why, and tries the previous step, as many times as it takes. One 10-step run (checkpoints at steps 2-10) gets a
different kind of damage in each of its four newest checkpoints; one relaunch through the CLI sets all four aside,
each with its reason, restores step 2 and continues to step 12 exactly as an uninterrupted run does. A run whose
every checkpoint is damaged stops with one error listing each."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import TINY_DEMO, cli_env, losses, start, wait_all

SMALL = [*TINY_DEMO, "--config.train.log_every=1", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=5",
         "--config.checkpoint.async_save=False", "--config.sample.at_end=False"]


def truncate_largest_array_file(step: Path) -> None:
    files = sorted((step / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) // 2])


def remove_state_metadata(step: Path) -> None:
    for name in ("_METADATA", "_sharding", "manifest.ocdbt"):  # whichever this orbax version writes
        for path in (step / "state").rglob(name):
            path.unlink()


# Newest first: step 10 gets the first kind, step 4 the last.
DAMAGE = {
    "truncated array file": truncate_largest_array_file,
    "missing state metadata": remove_state_metadata,
    "missing state/": lambda step: shutil.rmtree(step / "state"),
    "missing data iterator json": lambda step: [p.unlink() for p in (step / "data").glob("*.json")],
}


def _train(workdir: Path, num_steps: int = 12):
    return start("atomo_jax.train", *SMALL, f"--config.train.num_steps={num_steps}", f"--workdir={workdir}",
                 env=cli_env(1))


def test_damaged_newest_checkpoints_fall_back_step_by_step(tmp_path):
    reference, first = tmp_path / "reference", tmp_path / "first"
    wait_all([_train(reference), _train(first, num_steps=10)])
    want = losses(reference)
    assert sorted(want) == list(range(1, 13))
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["10", "2", "4", "6", "8"]

    damaged = tmp_path / "damaged"
    shutil.copytree(first, damaged)
    steps = {name: damaged / "checkpoints" / str(step) for name, step in zip(DAMAGE, (10, 8, 6, 4))}
    for name, damage in DAMAGE.items():
        damage(steps[name])
    broken = tmp_path / "broken"  # every checkpoint damaged
    shutil.copytree(first, broken)
    for step in ("2", "4", "6", "8", "10"):
        shutil.rmtree(broken / "checkpoints" / step / "state")

    procs = [_train(damaged), _train(broken)]
    (out, _), (broken_out, _) = [p.communicate(timeout=900) for p in procs]
    assert procs[0].returncode == 0, out[-3000:]
    assert procs[1].returncode != 0, broken_out[-3000:]
    for name, step in steps.items():
        assert f"checkpoint {step} is unreadable (" in out, (name, out[-3000:])
        assert step.with_name(f"{step.name}.unreadable").is_dir(), name  # set aside, never deleted
    assert out.index(f"{steps['truncated array file']} is unreadable") < out.index(
        f"{steps['missing data iterator json']} is unreadable"), out[-3000:]  # newest first
    assert "resumed from checkpoint at step 2" in out, out[-3000:]
    assert losses(damaged) == want  # steps 3-10 re-run to the same floats, then 11 and 12

    assert "no checkpoint could be restored" in broken_out, broken_out[-3000:]
    for step in ("2", "4", "6", "8", "10"):
        assert f"{broken / 'checkpoints' / step}: " in broken_out, broken_out[-3000:]
