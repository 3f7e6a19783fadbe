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

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_OWN_CACHE = None

# XLA:CPU flags for compiles whose programs are checked for values, shardings or memory figures, never for speed: no
# LLVM optimisation of the generated kernels. The optimised HLO, and so buffer sizes, FLOPs and collectives, are the
# same (the full-size fit check of test_aot: identical arguments, temporaries, outputs and FLOPs). Compiles get
# somewhat faster on this machine: demo train step 30 s -> 26 s, full-size fit check 218 s -> 205 s.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# The slowest files, in seconds of one 2-worker run on the 2-core CI machine (2026-11-29, with FAST_CPU_COMPILE):
# test_aot 474, test_sharding 216, test_multiprocess 196, test_train_demo 145, test_sample_cli 140, test_resume 126,
# test_export 91; every other file takes under 31. With --dist loadfile, xdist hands out whole files in collection
# order, re-sorted by test count unless told not to, so the long one-test files went last: in the run before this
# order the full-size AOT compile and the multi-process trainers began 8-9 minutes in and finished together at the
# end. Longest first (roughly) lets the short files fill in around them.
SLOWEST_FIRST = ("test_aot.py", "test_multiprocess.py", "test_sharding.py", "test_train_demo.py", "test_sample_cli.py",
                 "test_resume.py", "test_export.py")


def pytest_configure(config: pytest.Config) -> None:
    global _OWN_CACHE
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep our file order (see SLOWEST_FIRST)
        config.option.loadscopereorder = False
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run) makes it; workers inherit it
        _OWN_CACHE = tempfile.mkdtemp(prefix="atomo_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in SLOWEST_FIRST first, in that order; the sort is stable, so the rest keep their order and every file its
    own test order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
