"""The package as users get it: `pip install .` (and `-e .`) into a new venv, the atomo-* commands, and a 3-step run
of the demo (shrunk to TINY_DEMO) from a directory that is not the repository. The dependencies come from the suite's
own environment (on PYTHONPATH), so the test checks our packaging, not 2 GB of downloads."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

from tests.conftest import ROOT, TINY_DEMO, cli_env

COMMANDS = ("atomo-train", "atomo-sample", "atomo-convert", "atomo-export", "atomo-eval", "atomo-aot",
            "atomo-cache-latents")


def _run(args: list, cwd, env: dict, timeout: float = 600) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_pip_install_commands_and_demo_from_another_directory(tmp_path):
    # A clean copy of the checkout: setuptools builds in the source tree (build/, *.egg-info).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".bench_cache", ".whl"))
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**cli_env(1), "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    _run([sys.executable, "-m", "venv", venv], elsewhere, env)
    _run([venv / "bin" / "pip", "install", "-q", "--no-deps", src], elsewhere, env)
    where = _run([venv / "bin" / "python", "-c", "import atomo_jax, configs, data_pipelines, launch; "
                  "print(atomo_jax.__file__, configs.__file__)"], elsewhere, env)
    assert str(venv) in where and str(src) not in where, where  # the installed copy, not the checkout
    for command in COMMANDS:
        assert "--" in _run([venv / "bin" / command, "--help"], elsewhere, env), command  # exit 0 and a usage
    out = _run([venv / "bin" / "atomo-train", *TINY_DEMO, "--workdir=run", "--config.train.num_steps=3",
                "--config.sample.at_end=False", "--config.checkpoint.every_steps=0", "--config.train.log_every=1",
                "--config.train.peak_flops=1e12"], elsewhere, env)
    assert "[train] done at step 3" in out and (elsewhere / "run" / "checkpoints" / "3").is_dir(), out[-3000:]
    assert "eta=" in out and "mfu=" in out, out[-3000:]  # the progress line, MFU from the configured peak

    # Editable: the import resolves to the source tree. Without the suite's packages on PYTHONPATH, because an
    # editable install there (tests/run.sh makes one) has a finder module of the same name that would win.
    editable = tmp_path / "editable"
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "venv", editable], elsewhere, bare)
    _run([editable / "bin" / "pip", "install", "-q", "--no-deps", "-e", src], elsewhere, bare)
    where = _run([editable / "bin" / "python", "-c", "import atomo_jax; print(atomo_jax.__file__)"], elsewhere, bare)
    assert where.strip().startswith(str(src)), where
    assert all((editable / "bin" / command).is_file() for command in COMMANDS)
