"""Pieces shared by the launchers: config-override parsing, the training command, printing and running commands.

Launchers build every command as an argv list first. `--dry-run` prints each with `shlex.join`, so a printed line
pasted into a POSIX shell runs exactly what the launcher would have run.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

# `--config.a.b=value`: the absl config_flags override syntax the trainer accepts. The `=` form is required so that a
# value can never be mistaken for a launcher flag.
_OVERRIDE = re.compile(r"--config\.[A-Za-z_][\w.]*=")


class LaunchError(ValueError):
    """A launcher was asked for something it cannot do; the message says what and what was expected."""


def split_overrides(extra: Sequence[str]) -> list[str]:
    """Validates the arguments argparse did not recognise: each must be a `--config.KEY=VALUE` override."""
    extra = list(extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    for arg in extra:
        if not _OVERRIDE.match(arg):
            raise LaunchError(
                f"unrecognised argument {arg!r}: launcher flags come first; config overrides must be written "
                "--config.KEY=VALUE (one argument, with '=')")
    return extra


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value of the last `--config.<key>=...` override, or None."""
    value = None
    for arg in overrides:
        name, _, val = arg.partition("=")
        if name == f"--config.{key}":
            value = val
    return value


def check_config(repo: Path, config: str) -> None:
    """The config path is relative to the repository (the code that gets shipped); fail before anything is rented."""
    path = config.split(":", 1)[0]  # config_flags allows `file.py:argument`
    if Path(path).is_absolute():
        raise LaunchError(f"--config={config}: give the path relative to the repository ({repo}), e.g. configs/demo.py")
    if not (repo / path).is_file():
        raise LaunchError(f"--config={config}: no such file {repo / path}")


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """The one training command every launcher runs (on every host)."""
    return [python, "-m", "atomo_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def env_argv(env: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """`env K=V ... argv`: sets the environment in the command itself, so a printed command is complete."""
    return ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else list(argv)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`--env K=V` flags to a dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env


def show(argv: Sequence[str]) -> str:
    """One command as a shell-safe line."""
    return shlex.join(argv)


class Runner:
    """Runs commands, or with dry_run prints them (stdout, one per line) and pretends they succeeded."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.cwd: Path | None = None

    def cd(self, path: Path) -> None:
        """Later commands run in `path` (a dry run prints the `cd`)."""
        self.cwd = path
        if self.dry_run:
            print(show(["cd", str(path)]), flush=True)

    def comment(self, text: str) -> None:
        """A note: a `#` line in a dry run (still a valid shell script), a status line on stderr otherwise."""
        print(f"# {text}" if self.dry_run else f"[launch] {text}", file=sys.stdout if self.dry_run else sys.stderr,
              flush=True)

    def run(self, argv: Sequence[str], check: bool = True) -> int:
        if self.dry_run:
            print(show(argv), flush=True)
            return 0
        print(f"[launch] $ {show(argv)}", file=sys.stderr, flush=True)
        rc = subprocess.call(list(argv), cwd=self.cwd)
        if check and rc != 0:
            raise subprocess.CalledProcessError(rc, list(argv))
        return rc

    def output(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        """Runs a query (never in a dry run: callers decide what a dry run assumes)."""
        assert not self.dry_run
        return subprocess.run(list(argv), capture_output=True, text=True, cwd=self.cwd)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file relative to the repository, e.g. configs/demo.py")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints and logs; rerunning with the same workdir resumes from its latest checkpoint")


def add_process_flags(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, *, python_help: str,
                      repo_help: str, env_help: str) -> None:
    """The flags every trainer launcher shares (--python, --repo_dir, --env, --dry-run) and the train group."""
    group.add_argument("--python", default=sys.executable, help=python_help)
    group.add_argument("--repo_dir", default=str(REPO_ROOT), help=repo_help)
    group.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help=env_help)
    group.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                       help="print the exact commands, one per line, and run nothing")
    add_train_flags(parser.add_argument_group(
        "train (then --config.KEY=VALUE overrides, passed to the trainer verbatim)"))


def main_wrapper(main, argv: Sequence[str] | None) -> int:
    """Turns LaunchError into a one-line message and exit code 2 (usage error), like argparse does."""
    try:
        return main(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: command failed with exit code {e.returncode}: {show(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
