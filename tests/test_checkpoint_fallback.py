"""A damaged newest checkpoint never stops a relaunch: the trainer sets it aside (renamed, not deleted), says which
and why, restores the previous step, and continues exactly as an uninterrupted run would. Four kinds of damage, each
on its own copy of one 4-step run (checkpoints at steps 2 and 4), each resumed through the CLI to step 6; and a run
whose every checkpoint is damaged stops with one error listing each."""

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


DAMAGE = {
    "truncated array file": truncate_largest_array_file,
    "missing state metadata": remove_state_metadata,
    "missing state/": lambda step: shutil.rmtree(step / "state"),
    "missing data iterator json": lambda step: [p.unlink() for p in (step / "data").glob("*.json")],
}


def _train(workdir: Path, num_steps: int = 6):
    return start("atomo_jax.train", *SMALL, f"--config.train.num_steps={num_steps}", f"--workdir={workdir}",
                 env=cli_env(1))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path):
    reference, first = tmp_path / "reference", tmp_path / "first"
    wait_all([_train(reference), _train(first, num_steps=4)])
    want = losses(reference)
    assert sorted(want) == list(range(1, 7)) and (first / "checkpoints" / "4").is_dir()

    runs = {}
    for i, (name, damage) in enumerate(DAMAGE.items()):
        workdir = tmp_path / f"case{i}"
        shutil.copytree(first, workdir)
        damage(workdir / "checkpoints" / "4")
        runs[name] = workdir
    names = list(runs)
    for pair in (names[:2], names[2:]):  # two at a time on a 2-core machine
        outs = wait_all([_train(runs[name]) for name in pair])
        for name, out in zip(pair, outs):
            step4 = runs[name] / "checkpoints" / "4"
            assert f"checkpoint {step4} is unreadable (" in out, (name, out[-3000:])
            assert "resumed from checkpoint at step 2" in out, (name, out[-3000:])
            assert (runs[name] / "checkpoints" / "4.unreadable").is_dir(), name  # set aside, never deleted
            assert losses(runs[name]) == want, name  # steps 3 and 4 re-run to the same floats, then 5 and 6

    # Every checkpoint damaged: one error naming each step directory, nothing restored or overwritten.
    broken = tmp_path / "broken"
    shutil.copytree(first, broken)
    for step in ("2", "4"):
        shutil.rmtree(broken / "checkpoints" / step / "state")
    proc = _train(broken)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "no checkpoint could be restored" in out, out[-3000:]
    for step in ("2", "4"):
        assert f"{broken / 'checkpoints' / step}: " in out, out[-3000:]
