"""Errors of the data pipeline that stop a run: the trainer prints them as they are, without a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be read as configured; the message names the file (and line) or the config key."""


class DataBroken(DataError):
    """Nearly every recent record was bad: the data, not a few files, is broken. The message has the counts and
    the most common reasons."""
