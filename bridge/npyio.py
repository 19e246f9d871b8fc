"""Streaming .npy writer and mmap reader: one pass writes the file and its sha256.

The header is numpy's own (format 1.0, padded so the data starts at a multiple of 64
bytes), so the data block can be memory-mapped by any language, or used directly as ONNX
external data with ``offset = data_offset``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bridge import dtypes
from bridge.errors import ChecksumError, StoreError
from bridge.progress import byte_bar

_CHUNK = 64 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WrittenArray:
    """What :func:`write_npy` wrote: checksum, data offset and sizes."""

    sha256: str
    data_offset: int
    nbytes: int
    file_bytes: int


def write_npy(fh: BinaryIO, array: np.ndarray, *, desc: str = "writing") -> WrittenArray:
    """Write ``array`` as a .npy file to ``fh`` in chunks, hashing as it goes.

    The file holds :func:`bridge.dtypes.storage_dtype`: the same values in little-endian byte order (a
    big-endian array is byte-swapped chunk by chunk, never copied whole), or the bit pattern of an
    extension dtype (bfloat16) as unsigned integers.
    """
    storage = dtypes.storage_dtype(array.dtype)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(storage), "fortran_order": False, "shape": array.shape}
    )
    head = header.getvalue()
    fh.write(head)
    digest = hashlib.sha256(head)
    flat = array.reshape(-1)  # a copy only if array is not contiguous
    step = max(1, _CHUNK // max(1, array.dtype.itemsize))
    with byte_bar(array.nbytes, desc) as bar:
        for start in range(0, flat.size, step):
            chunk = _stored(flat[start : start + step], storage)
            fh.write(chunk.data)
            digest.update(chunk.data)
            bar.update(chunk.nbytes)
    return WrittenArray(digest.hexdigest(), len(head), array.nbytes, len(head) + array.nbytes)


def _stored(values: np.ndarray, storage: np.dtype[Any]) -> np.ndarray:
    """``values`` as ``storage``: the same bits for an extension dtype, the same values otherwise (byte-swapped)."""
    if values.dtype.isnative or values.dtype.byteorder == "|":
        return np.ascontiguousarray(values).view(storage)
    return np.ascontiguousarray(values, dtype=storage)


def file_sha256(path: Path, *, desc: str | None = None) -> str:
    """sha256 of a file, read in chunks (the page cache, not this process's heap, holds it)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, byte_bar(size, desc or f"verifying {path.name}") as bar:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise :class:`ChecksumError` if ``path``'s sha256 is not ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{what}: sha256 of {str(path)!r} is {actual[:16]}..., the manifest says {expected[:16]}...; "
            "the store is corrupt or was modified: re-create it (or open with verify=False to inspect it)"
        )


def open_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Memory-map a .npy file read-only and check it holds ``shape`` x ``dtype``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        # numpy suggests allow_pickle=True for a file it cannot parse: never the answer here
        reason = "it is not a .npy array file" if "pickle" in str(exc) else str(exc)
        raise StoreError(f"cannot read table file {str(path)!r}: {reason}; re-create the store") from exc
    expected_storage = dtypes.storage_dtype(dtype)
    if tuple(arr.shape) != tuple(shape) or arr.dtype != expected_storage:
        raise StoreError(
            f"table file {str(path)!r} holds {tuple(arr.shape)} {arr.dtype}, the manifest says "
            f"{tuple(shape)} {dtypes.dtype_name(dtype)}; the store is inconsistent: re-create it"
        )
    return arr if arr.dtype == dtype else arr.view(dtype)


def npy_data_offset(path: Path) -> int:
    """Byte offset of the data block in a .npy file (the header's length)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise StoreError(f"{str(path)!r} is not a .npy file")
    if head[6] == 1:
        return 10 + int.from_bytes(head[8:10], "little")
    return 12 + int.from_bytes(head[8:12], "little")
