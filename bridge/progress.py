"""Progress bars on stderr for work that can take more than a few seconds."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

#: Work smaller than this many bytes gets no bar (it finishes in well under a second).
MIN_BYTES_FOR_BAR = 256 * 1024 * 1024


def byte_bar(total: int, desc: str, *, enabled: bool | None = None) -> Any:
    """A tqdm bar counting bytes on stderr; silent for small work, ``EMBRIDGE_NO_PROGRESS=1`` or ``enabled=False``."""
    if enabled is None:
        enabled = total >= MIN_BYTES_FOR_BAR and not os.environ.get("EMBRIDGE_NO_PROGRESS")
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not enabled, leave=False,
    )
