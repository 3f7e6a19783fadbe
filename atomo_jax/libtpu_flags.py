"""libtpu flags every atomo command needs on TPU, added to LIBTPU_INIT_ARGS before jax starts its TPU backend.

The TPU compiler of libtpu 0.0.42.1 emits each convolution recursively over its tiles, on its own fiber-scheduler
threads ("futex-default-S"). At 512 px with 20 or more frames per chip that recursion outgrows their default stack
and the process dies with `SIGSEGV STACK OVERFLOW` in `MatrixMultiplyAccumulateFunctor`, no Python error (v6e-64,
paper config: 16 frames compile, 20 and 24 crash). Neither `ulimit -s` nor `--xla_internal_thread_stack_size_bytes`
changes those stacks, nor `--default_thread_stack_size` alone (24 frames still crash); with the fibers' flag as well,
20 and 24 frames compile (docs/scaling.md; the fibers' flag alone gets past the crash, both are set as compiled).
A deeper stack only reserves address space; pages are touched when used.
Both are absl flags of the libtpu that pyproject.toml's `[tpu]` extra pins (0.0.42.1, for jax 0.10.2).
"""

from __future__ import annotations

import os

# 20 frames overflow the default; libtpu's own messages say stacks over 256 MB defeat its stack unwinding.
COMPILER_THREAD_STACK_BYTES = 256 << 20
_REQUIRED = {"--default_thread_stack_size": str(COMPILER_THREAD_STACK_BYTES),
             "--fibers_default_thread_stack_size": str(COMPILER_THREAD_STACK_BYTES)}


def with_required(init_args: str) -> str:
    """`init_args` (a LIBTPU_INIT_ARGS value) plus each required flag it does not already set: a user's own value
    of a flag wins."""
    given = {word.split("=", 1)[0] for word in init_args.split()}
    extra = [f"{flag}={value}" for flag, value in _REQUIRED.items() if flag not in given]
    return " ".join([init_args.strip(), *extra]).strip()


def apply() -> None:
    """Sets LIBTPU_INIT_ARGS for this process and the processes it starts. Call it before the first jax
    computation: libtpu reads the variable once, when the TPU backend starts (off TPU nothing reads it)."""
    os.environ["LIBTPU_INIT_ARGS"] = with_required(os.environ.get("LIBTPU_INIT_ARGS", ""))
