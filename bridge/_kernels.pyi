"""Type stub of the optional C kernel built from bridge/_kernels.c."""

from typing import Any

def take_rows(table: Any, ids: Any, out: Any, rows: int, row_bytes: int, /) -> int: ...

CACHED_BYTES: int  # tables of at most this many bytes are not prefetched
