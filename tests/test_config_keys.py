"""One place for configuration: every `--config.x.y=v` the README, docs/ and config docstrings show is accepted by
configs/base.py and configs/demo.py (parsed as the trainer parses it), every key the code reads is declared in
base.py, and demo.py only changes values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from atomo_jax.configuration import load_config
from tests.conftest import ROOT

ROOT = Path(ROOT)
PLACEHOLDERS = {"a.b", "x", "KEY"}  # the generic `--config.a.b=value` of the docs
FLAG = re.compile(r"--config\.([A-Za-z_][A-Za-z_0-9.]*)=([^\s`\]]+)")


def documented_overrides() -> list[str]:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.py"))]
    found = {f"--config.{key}={value}" for path in texts for key, value in FLAG.findall(path.read_text())
             if key not in PLACEHOLDERS}
    return sorted(found)


def leaves(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_docs_show_overrides():
    flags = documented_overrides()
    assert len(flags) > 15, flags
    for needed in ("data.kind=latents", "data.latents_dir", "model.text_encoder.tokenizer", "data.root"):
        assert any(needed in f for f in flags), needed


@pytest.mark.parametrize("config", ["base", "demo"])
def test_every_documented_override_is_accepted(config):
    path = ROOT / "configs" / f"{config}.py"
    for flag in documented_overrides():
        flag = shlex.split(flag)[0]  # what the shell hands the program: quotes removed, as a user types it
        key, value = flag[len("--config."):].split("=", 1)
        got = load_config(path, [flag])
        for part in key.split("."):
            got = got[part]
        same = str(got).replace(" ", "") == value.strip("'\"").replace(" ", "")
        assert same or (isinstance(got, float) and got == float(value)), (flag, got)


def test_demo_declares_nothing_new():
    assert set(leaves(load_config(ROOT / "configs" / "demo.py"))) == set(leaves(load_config(ROOT / "configs" /
                                                                                             "base.py")))


def test_a_misspelled_key_is_refused_by_name():
    with pytest.raises(ValueError, match="latent_dir"):
        load_config(ROOT / "configs" / "base.py", ["--config.data.latent_dir=/x"])


def test_no_config_read_has_a_hidden_default():
    """`cfg.get(key, default)` would let a key live outside base.py: the code reads declared keys directly.
    (convert/ reads the checkpoints' own diffusers/transformers configs, whose defaults are theirs.)"""
    code = [p for d in ("atomo_jax", "data_pipelines", "launch") for p in (ROOT / d).rglob("*.py")
            if "convert" not in p.parts]
    offenders = []
    for path in code:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(config|cfg|data_config|train|mesh_config)(\.[a-z_]+)*\.get\(\"", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


BAD_VALUES = {  # key -> a value out of its range; each must be named in the trainer's error
    "data.num_frames": "0", "data.num_given_frames": "9", "data.resolution": "4", "data.frame_prediction_prob": "1.5",
    "cond_drop.image": "-0.1", "train.learning_rate": "-0.002", "train.warmup_steps": "-1",
    "train.lr_schedule": "linear", "train.grad_accum": "0", "train.ema_decay": "1.0", "train.num_steps": "0",
    "sample.num_steps": "0", "sample.sampler": "euler", "checkpoint.every_steps": "-5", "train.peak_flops": "-1",
}


def test_bad_values_through_the_cli_name_every_key(tmp_path):
    """One trainer run with every bad value at once: exit 2 before any work, one line per key, no traceback."""
    from tests.conftest import cli_env, start

    args = [f"--config.{key}={value}" for key, value in BAD_VALUES.items()]
    proc = start("atomo_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", *args,
                 env=cli_env())
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for key, value in BAD_VALUES.items():
        assert any(line.removeprefix("error: ").startswith(f"config.{key}=") for line in out.splitlines()), (key, out)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was written


def test_three_axis_mesh_is_refused_until_shardy_gets_its_gradients_right(tmp_path):
    """data x fsdp x tensor trains with wrong gradients under this jax's Shardy (bench/shardy_grads.py): the trainer
    says so and stops before any work instead of training on them."""
    from tests.conftest import cli_env, start

    proc = start("atomo_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                 "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", env=cli_env(8))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "error: config.mesh.tensor=2: expected 1 when data and fsdp are both > 1" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
