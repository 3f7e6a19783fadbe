"""Config files as every entry point reads them: `get_config()` of a Python file, then `--config.a.b=value`
overrides, parsed by ml_collections exactly as `python -m atomo_jax.train` parses them (types checked, the config
locked so a misspelled key is refused)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "base.py"


def config_import_path() -> None:
    """Config files import each other as `configs.*`: from the working directory or this repository."""
    for root in (os.getcwd(), str(REPO)):
        if root not in sys.path:
            sys.path.insert(0, root)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of `path` (default configs/base.py) with `overrides` such as `--config.train.num_steps=5`."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"not a config override (expected --config.a.b=value): {' '.join(bad)}")
    config_import_path()
    values = flags.FlagValues()
    # config_flags reads the overrides from `sys_argv` (default: the process's sys.argv), not from the parsed list.
    argv = ["config", f"--config={path}", *overrides]
    config_flags.DEFINE_config_file("config", str(path), "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ValueError(f"{path}: {' '.join(str(message).split())}") from None


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A config saved with a checkpoint (JSON), laid over configs/base.py: every key the code reads is present,
    also for a checkpoint written before a key was added; a saved key base.py does not declare is an error."""
    config = load_config(DEFAULT_CONFIG).unlock()

    def merge(target: ml_collections.ConfigDict, values: dict, where: str) -> None:
        for key, value in values.items():
            if key not in target:
                raise ValueError(f"saved config key {where}{key} is not declared in {DEFAULT_CONFIG}")
            if isinstance(value, dict) and isinstance(target[key], ml_collections.ConfigDict):
                merge(target[key], value, f"{where}{key}.")
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    merge(config, saved, "")
    return config
