"""Shared test setup: run from the repo root so `configs.*` imports work, and share one XLA compilation cache
across the whole run.

Many tests start trainers in subprocesses (resume, SIGTERM, multi-process, CLIs) that compile the same programs
again; JAX's persistent compilation cache lets every process after the first load them instead. The cache lives in
a fresh directory per pytest run (xdist workers inherit it from the controller) and is removed at the end, so no
compiled program outlives the run. Set JAX_COMPILATION_CACHE_DIR yourself to keep one between runs.
"""

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_OWN_CACHE = None


def pytest_configure(config):
    global _OWN_CACHE
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run) makes it; workers inherit it
        _OWN_CACHE = tempfile.mkdtemp(prefix="atomo_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
