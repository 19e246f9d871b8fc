"""Dtype names that survive a round trip through JSON, .npy files and ONNX (bfloat16 included)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from bridge.errors import InputError

#: Extension dtypes numpy cannot describe in a .npy header; stored as unsigned ints of the same width.
_EXTENSION = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
_STORAGE: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The manifest name of a dtype: numpy's name, or the ml_dtypes name (``"bfloat16"``)."""
    return np.dtype(dtype).name


def from_name(name: str) -> np.dtype[Any]:
    """Inverse of :func:`dtype_name`."""
    if name in _EXTENSION:
        return _EXTENSION[name]
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise InputError(f"unknown dtype {name!r}") from exc


def storage_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype written into a .npy file: ``dtype`` itself, or an unsigned int for extension dtypes."""
    dt = np.dtype(dtype)
    if dt.name in _EXTENSION:
        return _STORAGE[dt.itemsize]
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


def is_storable(dtype: np.dtype[Any]) -> bool:
    """True for the dtypes a store holds: numpy's bool, integer, float and complex types, and the
    extension dtypes above (not strings, objects, datetimes, structured or other ml_dtypes types)."""
    dt = np.dtype(dtype)
    return dt.name in _EXTENSION or (dt.kind in "biufc" and dt.fields is None)
