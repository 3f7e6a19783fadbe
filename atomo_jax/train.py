"""Train an AtomoVideo model.

  atomo-train --config=configs/demo.py --workdir=runs/demo [--config.train.num_steps=50 ...]
  python -m atomo_jax.train --config=configs/base.py --workdir=/ckpt/run --config.init.checkpoint=/ckpt/init

Rerunning with the same --workdir resumes from its latest readable checkpoint. Any config key can be set with
--config.a.b=value (configs/base.py lists them all).

Exit codes: 0 the run reached train.num_steps; 75 it was stopped (SIGTERM, preemption) and saved a checkpoint
before the end: rerun the same command to resume; 2 a bad config value or unreadable data; 1 any other failure.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from atomo_jax.training.preemption import STOPPED_EXIT_CODE, Preemption

_PREEMPTION = Preemption()  # listening from the first line of the process (see run below)


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here, after the SIGTERM listener above: the trainer's imports (jax, orbax, grain) take seconds, and a
    # preemption notice in that time must still end in a saved checkpoint.
    from atomo_jax.configuration import add_log_level, cli_parser, parse_cli

    parser = cli_parser("atomo-train", __doc__)
    parser.add_argument("--config", required=True, help="config file with get_config() (e.g. configs/demo.py)")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, TensorBoard logs, samples")
    add_log_level(parser)
    args, config = parse_cli(parser, argv)
    sys.path.insert(0, os.getcwd())  # configs import each other as `configs.*`
    from atomo_jax.configuration import ConfigError
    from atomo_jax.training.checkpoint import CheckpointError
    from atomo_jax.training.loop import train_and_evaluate
    from data_pipelines.errors import DataError

    try:
        result = train_and_evaluate(config, args.workdir, args.explicit, _PREEMPTION)
    except (ConfigError, DataError) as e:  # a bad value or unreadable data: the key, file or line; no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except CheckpointError as e:  # every checkpoint of the workdir unreadable: each path and why
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if result.get("preempted"):
        print(f"[train] stopped at step {result['step']} of {result['num_steps']}, checkpoint saved (exit code "
              f"{STOPPED_EXIT_CODE}: rerun the same command to resume)", flush=True)
        return STOPPED_EXIT_CODE
    print(f"[train] done at step {result['step']}", flush=True)
    return 0


def run() -> None:
    """The `atomo-train` console script and `python -m atomo_jax.train`."""
    _PREEMPTION.listen()  # before argument parsing and the seconds of imports that follow
    sys.exit(main())


if __name__ == "__main__":
    run()
