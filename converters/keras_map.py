"""Match ONNX tables to framework weights by value: a hash of the bytes, then an exact comparison.

Names are not a reliable key (tf2onnx adds ``_N`` suffixes, SavedModels add
``StatefulPartitionedCall/``, identical constants are merged), values are: an initializer
equals the Keras weight it came from, bit for bit. Nothing here imports a framework.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """A framework weight a table may come from.

    ``primary`` marks an embedding layer's table; other 2-D weights (a position-embedding
    variable, a SavedModel variable of unknown role) are used only when no primary one matches.
    ``load`` returns the weight as a NumPy array; it is called only when the shape fits a table.
    """

    layer: str
    weight: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(compare=False, repr=False)
    primary: bool = True
    obj: Any = field(default=None, compare=False, repr=False)


def digest(arr: np.ndarray) -> bytes:
    """blake2b of dtype, shape and the raw bytes (C order) of ``arr``."""
    contiguous = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{contiguous.dtype.str}|{contiguous.shape}|".encode())
    h.update(contiguous.reshape(-1).view(np.uint8).data)  # the buffer itself (a memoryview), no copy
    return h.digest()


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def match_tables(tables: Sequence[np.ndarray], candidates: Sequence[Candidate]) -> list[list[Candidate]]:
    """For each table, the candidates whose value equals it (primary ones if any match, else the others).

    Candidates are loaded only when their shape equals some table's shape; one weight matching
    several tables (tf2onnx left two copies) is listed for each.
    """
    shapes = {tuple(t.shape) for t in tables}
    by_digest: dict[bytes, list[tuple[Candidate, np.ndarray]]] = defaultdict(list)
    for cand in candidates:
        if tuple(cand.shape) not in shapes:
            continue
        arr = np.asarray(cand.load())
        by_digest[digest(arr)].append((cand, arr))
    result = []
    for table in tables:
        hits = [c for c, arr in by_digest.get(digest(table), []) if same_bytes(arr, table)]
        primary = [c for c in hits if c.primary]
        result.append(primary or hits)
    return result
