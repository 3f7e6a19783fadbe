"""Imports run one way: data_pipelines knows nothing of the model (it imports no atomo_jax), and the model code
imports neither training nor the data pipelines; a trainer process imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((Path(ROOT) / folder).rglob("*.py"))
            for name in sorted(imported_modules(path)) if name.startswith(forbidden)]


def test_data_pipelines_import_no_model_code():
    assert not offenders("data_pipelines", ("atomo_jax",))


def test_models_and_diffusion_import_no_training_or_data():
    for folder in ("atomo_jax/models", "atomo_jax/diffusion"):
        assert not offenders(folder, ("atomo_jax.training", "data_pipelines")), folder


def test_trainer_imports_no_torch():
    """torch (2.5 CPU-seconds and 220 MB per process) is for the converters, export and eval's scorers; a trainer
    process, started once per host, per restart and per test, must not pay for it (tensorboardX did, at import)."""
    code = "import sys, atomo_jax.train, atomo_jax.training.loop; print(sorted({m.split('.')[0] for m in sys.modules}))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    top = set(ast.literal_eval(res.stdout.strip().splitlines()[-1]))
    assert "jax" in top and not top & {"torch", "tensorflow", "tensorboardX"}, sorted(top)
