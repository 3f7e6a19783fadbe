"""Config files as every entry point reads them: `get_config()` of a Python file, then `--config.a.b=value`
overrides, parsed by ml_collections exactly as `python -m atomo_jax.train` parses them (types checked, the config
locked so a misspelled key is refused)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags
from absl import logging

from atomo_jax import libtpu_flags

REPO = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config value out of range or contradicting a checkpoint; the message names each key. Entry points print
    it as it is, without a traceback."""

DEFAULT_CONFIG = REPO / "configs" / "base.py"


def config_import_path() -> None:
    """Config files import each other as `configs.*`: from the working directory or this repository."""
    for root in (os.getcwd(), str(REPO)):
        if root not in sys.path:
            sys.path.insert(0, root)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of `path` (default configs/base.py) with `overrides` such as `--config.train.num_steps=5`."""
    path = _config_path(path or DEFAULT_CONFIG)
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
        raise ValueError(f"{path}: {_override_error(e)}") from None


def _override_error(e: Exception) -> str:
    """ml_collections' message for a bad override, on one line (it nests repr'd strings: 'x'\nDid you mean ...)."""
    message = str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", " ")
    message = message[1:-1] if message[:1] == message[-1:] == "'" else message
    return " ".join(re.sub(r"^'([^']+)'\s*", r"no such key '\1'. ", message).split())


def _config_path(path: str | Path) -> Path:
    """`configs/demo.py` names the shipped config when no such file is under the working directory (e.g. the
    `atomo-train` command run from elsewhere after `pip install`)."""
    path = Path(path)
    return REPO / path if not path.exists() and (REPO / path).is_file() else path


def cli_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of every atomo command: the module docstring as the description (examples kept as
    written), no abbreviated flags."""
    return argparse.ArgumentParser(prog=prog, description=doc, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_log_level(parser: argparse.ArgumentParser, default: str = "warning") -> None:
    parser.add_argument("--log_level", default=default, choices=("debug", "info", "warning", "error"),
                        help=f"library log level (default {default}: progress lines stay readable)")


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
              ) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
    """Parses `argv`; `--config.a.b=value` overrides (anywhere on the line) apply to `--config` (default
    configs/base.py when only overrides are given); sets the libtpu flags every command needs (atomo_jax/
    libtpu_flags.py). Returns (args, config or None); `args.explicit` holds the keys the command line set. A bad
    flag, file or override is one `error:` line and exit 2, without a traceback."""
    args, rest = parser.parse_known_args(argv)
    libtpu_flags.apply()  # every command compiles; before any of them starts a TPU backend
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.explicit = override_keys(overrides)
    if hasattr(args, "log_level"):
        flags.FLAGS.mark_as_parsed()  # absl logging (used by the libraries) without absl's flag parsing
        logging.set_verbosity(args.log_level)
    config = None
    if getattr(args, "config", None) or overrides:
        try:
            config = load_config(getattr(args, "config", None), overrides)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return args, config


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


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint's architecture laid over a config.

# Model sections that describe what a checkpoint holds; keys that only say how to run it are not architecture.
ARCHITECTURE_SECTIONS = ("unet", "vae", "image_encoder", "text_encoder")
RUNTIME_KEYS = {"unet": ("dtype", "attention_impl", "remat")}
# Keys a checkpoint suggests but does not fix: taken when the config leaves them unset, never a conflict.
SUGGESTED_KEYS = {"text_encoder": ("tokenizer",)}


@dataclasses.dataclass(frozen=True)
class Found:
    """A model config value a checkpoint gives: `where` names the file and field (or shape) it was read from;
    `certain` is False for a value the file does not state but its variant has (e.g. SD 1.x's 8 heads)."""

    value: Any
    where: str
    certain: bool = True


Architecture = dict[str, dict[str, Found]]  # section -> key -> Found


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def merge_architectures(*parts: Architecture) -> Architecture:
    """One architecture from several files; two files stating different values for one key is an error."""
    out: Architecture = {}
    for part in parts:
        for section, items in part.items():
            for key, found in items.items():
                have = out.setdefault(section, {}).get(key)
                if have is None or (found.certain and not have.certain):
                    out[section][key] = found
                elif found.certain and have.certain and _plain(have.value) != _plain(found.value):
                    raise ValueError(f"the inputs disagree on model.{section}.{key}: {have.value!r} ({have.where}) "
                                     f"vs {found.value!r} ({found.where})")
    return out


def saved_architecture(saved_model: dict, where: str) -> Architecture:
    """The architecture keys of a saved `config.model` (a composed checkpoint's COMPOSED_CONFIG)."""
    def found(section: str, key: str, value: Any) -> Found | None:
        if key in RUNTIME_KEYS.get(section, ()):
            return None
        suggested = key in SUGGESTED_KEYS.get(section, ())
        return None if suggested and not value else Found(value, f"{where} (model.{section}.{key})", not suggested)

    return {section: {key: f for key, value in saved_model[section].items()
                      if (f := found(section, key, value)) is not None}
            for section in ARCHITECTURE_SECTIONS if section in saved_model}


def override_keys(overrides: Iterable[str]) -> frozenset[str]:
    """`--config.a.b=value` -> "a.b": the keys a command line sets, whatever their value."""
    return frozenset(o[len("--config."):].split("=", 1)[0] for o in overrides if o.startswith("--config."))


def adopt_architecture(config: ml_collections.ConfigDict, found: Architecture,
                       explicit: Iterable[str] = ()) -> list[str]:
    """Lays `found` over `config.model` in place. A key the config sets (on the command line, `explicit` as from
    `override_keys`, or in its file, to something other than configs/base.py's default) must match what the file
    states, else one ValueError lists every such key with both values and the file; any other key takes the
    checkpoint's value. Returns notes on set keys a file could not confirm."""
    base, explicit = load_config(DEFAULT_CONFIG).model, frozenset(explicit)
    conflicts, notes = [], []
    for section, items in found.items():
        for key, f in items.items():
            if key not in config.model[section]:
                raise ValueError(f"{f.where}: model.{section}.{key} is not declared in {DEFAULT_CONFIG}")
            ours, theirs = _plain(config.model[section][key]), _plain(f.value)
            if ours == theirs:
                continue
            if ours == _plain(base[section][key]) and f"model.{section}.{key}" not in explicit:
                config.model[section][key] = theirs
            elif f.certain:
                conflicts.append(f"model.{section}.{key}: {theirs!r} in {f.where}, but {ours!r} in the config")
            else:
                notes.append(f"model.{section}.{key}={ours!r} as configured ({theirs!r} in {f.where})")
    if conflicts:
        raise ConfigError("the checkpoint's architecture differs from the config:\n  " + "\n  ".join(conflicts)
                         + "\nLeave those keys unset to take the checkpoint's values, or give the matching file.")
    return notes
