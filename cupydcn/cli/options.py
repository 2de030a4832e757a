"""Option types and errors shared by the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def fail(prog: str, message: str, code: int = 2) -> int:
    """Print ``prog: error: message`` on one line of stderr; return the exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def unwritable_reason(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` (its folder is missing or not writable),
    or None."""
    folder = Path(path).expanduser().resolve().parent
    if not folder.exists():
        return f"folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{str(folder)!r} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"folder {str(folder)!r} is not writable"
    return None
