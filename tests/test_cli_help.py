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
