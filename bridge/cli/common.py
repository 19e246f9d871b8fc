"""Helpers shared by the sub-commands: common options and output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bridge.errors import InputError
from bridge.render import json_safe

#: What the running command has written completely (paths), for an honest message if it then fails.
WRITTEN: list[str] = []


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON document on stdout, nothing else there."""
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def add_output(parser: argparse.ArgumentParser) -> None:
    """``-o OUT`` and ``--force``."""
    parser.add_argument("-o", "--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def emit_json(obj: Any) -> None:
    """Write ``obj`` as strict JSON to stdout (NaN and infinities as strings: :func:`bridge.render.json_safe`)."""
    json.dump(json_safe(obj), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")


def say(text: str = "") -> None:
    """Human-readable output on stdout."""
    print(text)


def note(text: str) -> None:
    """A remark for the person at the terminal (stderr, so --json stays clean)."""
    print(text, file=sys.stderr)


def wrote(path: object) -> None:
    """Record that ``path`` is written completely (the error message of a later failure names it)."""
    WRITTEN.append(str(path))


def comma_list(text: str, flag: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; InputError for an empty value or an empty item (``"a,,b"``, ``"a,"``)."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise InputError(f"{flag} is empty; give a comma-separated list, or leave the option out")
    if not all(items):
        raise InputError(f"{flag} {text!r} has an empty item; write the items separated by single commas")
    return items
