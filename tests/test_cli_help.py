"""Every entry point answers --help with its usage and exit status 0 (absl's own --help exits 1)."""

from __future__ import annotations

import pytest

from tests.conftest import cli_env, start

ENTRY_POINTS = {  # module -> a flag its usage must show
    "atomo_jax.train": "--workdir", "atomo_jax.sample": "--checkpoint", "atomo_jax.aot": "--topology",
    "atomo_jax.cache_latents": "--output_dir", "atomo_jax.export": "--checkpoint", "atomo_jax.eval": "--videos",
    "atomo_jax.convert": "compose", "data_pipelines.tfds_builder": "--captions_file",
    "launch.local": "--num_processes", "launch.slurm": "--gpus_per_node", "launch.tpu_pod": "--accelerator_type",
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_exits_zero_with_usage(module):
    proc = start(module, "--help", env=cli_env())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert ENTRY_POINTS[module] in out, out[-3000:]


@pytest.mark.parametrize("module", ["atomo_jax.train", "atomo_jax.aot", "atomo_jax.cache_latents",
                                    "atomo_jax.convert"])
def test_a_misspelled_config_key_is_one_line_with_the_closest_key(module, tmp_path):
    args = {"atomo_jax.train": [f"--workdir={tmp_path}"], "atomo_jax.aot": ["--topology=cpu-1"],
            "atomo_jax.cache_latents": [f"--checkpoint={tmp_path}", f"--output_dir={tmp_path}"],
            "atomo_jax.convert": ["motion", str(tmp_path), "--out", str(tmp_path / "m.safetensors")]}[module]
    proc = start(module, *args, "--config=configs/demo.py", "--config.train.num_stpes=5", env=cli_env())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == ["error: configs/demo.py: no such key 'num_stpes'. Did you mean \"num_steps\" instead of "
                     "\"num_stpes\"?"], out[-3000:]
