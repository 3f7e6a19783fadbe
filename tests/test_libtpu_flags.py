"""The libtpu flags every command needs (atomo_jax/libtpu_flags.py) are in LIBTPU_INIT_ARGS before a backend starts.

The flags matter only on a TPU (or a TPU-topology compile): a 512 px x 20-frame step crashes libtpu's compiler
without it. What can break here is the order: a CLI module that starts a jax backend at import, or a command that
computes before parsing its arguments, would leave libtpu with its default stacks.
"""

from __future__ import annotations

import subprocess
import sys

from atomo_jax import libtpu_flags
from tests.conftest import ROOT, cli_env

STACK = libtpu_flags.COMPILER_THREAD_STACK_BYTES
FLAGS = [f"--default_thread_stack_size={STACK}", f"--fibers_default_thread_stack_size={STACK}"]

# Imports every command's module, then runs the aot command (a cpu-1 lowering) with jax's backend start watched.
_PROBE = """
import importlib, os, sys
from jax._src import xla_bridge
for module in ("atomo_jax.train", "atomo_jax.sample", "atomo_jax.aot", "atomo_jax.cache_latents",
               "atomo_jax.convert.__main__", "atomo_jax.export"):
    importlib.import_module(module)
    assert not xla_bridge.backends_are_initialized(), f"importing {module} started a jax backend"
seen = []
start = xla_bridge._init_backend
def watched(platform):
    seen.append(os.environ.get("LIBTPU_INIT_ARGS", ""))
    return start(platform)
xla_bridge._init_backend = watched
from atomo_jax import aot
rc = aot.main(["--config=configs/demo.py", "--topology=cpu-1", "--lower_only"])
assert rc == 0, rc
assert seen, "no backend started"
print("LIBTPU_INIT_ARGS at backend start:", seen[0])
"""


def test_every_command_sets_the_compiler_stack_flag_before_a_backend_starts():
    env = cli_env()
    env["LIBTPU_INIT_ARGS"] = "--xla_enable_async_all_gather=true"  # a launcher's flags stay
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("LIBTPU_INIT_ARGS at backend start:")][0]
    assert line.split(":", 1)[1].split() == ["--xla_enable_async_all_gather=true", *FLAGS]


def test_a_users_own_stack_flag_wins_and_nothing_is_added_twice():
    mine = "--default_thread_stack_size=1073741824 --xla_tpu_overlap_compute_collective_tc=true"
    assert libtpu_flags.with_required(mine) == f"{mine} {FLAGS[1]}"
    assert libtpu_flags.with_required("") == " ".join(FLAGS)
    assert libtpu_flags.with_required(libtpu_flags.with_required("")) == " ".join(FLAGS)
