"""Training entry point.

  python -m atomo_jax.train --config=configs/demo.py --workdir=/tmp/atomo_demo [--config.train.num_steps=50 ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from atomo_jax.configuration import absl_flags_parser

from atomo_jax.training.preemption import Preemption

_PREEMPTION = Preemption()  # listening from the first line of the process (see __main__ below)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter (orbax, grain) hides the progress lines
        logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.getcwd())  # configs import each other as `configs.*`
    from atomo_jax.configuration import ConfigError
    from atomo_jax.training.checkpoint import CheckpointError
    from atomo_jax.training.loop import train_and_evaluate
    from data_pipelines.errors import DataError

    explicit = frozenset(name[len("config."):] for name in flags.FLAGS
                         if name.startswith("config.") and flags.FLAGS[name].present)
    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, explicit, _PREEMPTION)
    except (ConfigError, DataError) as e:  # a bad value or unreadable data: the key, file or line; no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except CheckpointError as e:  # every checkpoint of the workdir unreadable: each path and why
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"[train] done at step {result['step']}", flush=True)


def run() -> None:
    """The `atomo-train` console script and `python -m atomo_jax.train`."""
    _PREEMPTION.listen()  # before flag parsing and the seconds of imports that follow
    app.run(main, flags_parser=absl_flags_parser(__name__))


if __name__ == "__main__":
    run()
