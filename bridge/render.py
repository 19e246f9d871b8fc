"""Plain-text rendering shared by the CLI and reports: aligned tables, byte sizes, strict JSON values."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def human_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table (no trailing spaces)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``: what JavaScript's ``JSON.stringify`` cannot keep, written so that every JSON
    parser accepts the document (Python's ``json`` would write the bare, non-standard ``NaN``).
    Lists, tuples and dict values are converted recursively; everything else is returned as it is.
    """
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):  # float, NumPy floats
        value = float(obj)
        return obj if math.isfinite(value) else _NON_FINITE[repr(value)]
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
