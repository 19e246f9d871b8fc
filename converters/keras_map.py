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

import ml_dtypes
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


def same_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 24) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (NaN payloads and -0.0 included).

    Compared ``chunk`` bytes at a time, so a table of gigabytes needs no temporary of its size.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    y = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return all(np.array_equal(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.size, chunk))


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
        cast = compute_cast(cand, arr)
        if cast is not None:
            by_digest[digest(cast)].append((cand, cast))
    result = []
    for table in tables:
        hits = [c for c, arr in by_digest.get(digest(table), []) if same_bytes(arr, table)]
        primary = [c for c in hits if c.primary]
        result.append(primary or hits)
    return result


def compute_cast(cand: Candidate, arr: np.ndarray) -> np.ndarray | None:
    """The weight cast to its layer's compute dtype, where that differs (a mixed-precision layer), else None.

    A mixed-precision model loaded from a file gathers from its float32 table cast to float16 (or
    bfloat16), and tf2onnx folds the cast into the ONNX constant: that constant equals this array.
    """
    compute = str(getattr(cand.obj, "compute_dtype", "") or "")
    if arr.dtype.kind != "f" or compute not in ("float16", "bfloat16") or getattr(cand.obj, "quantization_mode", None):
        return None
    target = np.dtype(ml_dtypes.bfloat16) if compute == "bfloat16" else np.dtype(np.float16)
    return arr.astype(target) if target != arr.dtype else None
