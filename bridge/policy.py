"""The index policy: what a lookup does with ids outside ``[0, rows)``, the same in every backend.

Policies:

- ``error`` (default): raise :class:`IdError` naming the first bad id, its position and the valid range;
- ``clip``: clamp to ``[0, rows - 1]``;
- ``zero``: return a zero vector (all bits zero) for a bad id;
- ``oov``: return the row ``oov_id`` for a bad id;
- ``wrap``: Keras/ONNX negative indexing, ``id`` in ``[-rows, -1]`` means ``id + rows``; anything else
  out of range still raises.

How the frameworks differ without a policy (table of 1000 rows): ``-1`` is row 999 in Keras, ONNX and
``np.take`` but an error in torch; ``-1001`` is an error everywhere except onnxruntime running a Keras graph
(row 999); ``np.take`` wraps uint64 ids ``>= 2**63`` silently. The bridge validates ids once, here, so
every backend only ever gathers ids it knows to be in range. (The exception, with the same results:
int32/int64 ids that a gather checks itself as it copies, torch's ``index_select`` for large batches, the
numpy backend's C kernel and, under ``wrap``, onnxruntime's Gather for large batches, come here only when that
gather refused one.)

Ids may have any integer dtype and any shape (0-d and empty included); Python ints and nested lists are
accepted. Floats, bools, strings and objects are refused with an :class:`IdError` that says how to fix them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.errors import IdError, InputError

POLICIES: tuple[str, ...] = ("error", "clip", "zero", "oov", "wrap")

_UNSIGNED_BY_SIZE: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)
}
_INT64_MAX = int(np.iinfo(np.int64).max)
_SMALL = 16  # up to this many ids, tolist() and sorted() beat ndarray reductions
# native int32 / int64 (C int, long, long long): the id dtypes every backend gathers with as they are
_GATHER_DTYPES = frozenset(np.dtype(c) for c in "ilq")
_NDARRAY = np.ndarray  # one global lookup instead of two in IndexPolicy.fits, which runs on every call
_MAXIMUM = np.maximum.reduce


def as_ids(ids: Any) -> np.ndarray:
    """Return ``ids`` as an integer ndarray in native byte order, or raise :class:`IdError`.

    Arrays are returned as they are (no copy) when already fine. Python ints and (nested) lists of
    ints become int64, or uint64 where a value needs it.
    """
    if isinstance(ids, np.ma.MaskedArray):
        raise IdError("ids are a masked array, and a lookup has no meaning for a masked id; "
                      "pass ids.compressed() (the unmasked ids) or ids.filled(<an id>)")
    arr = np.asarray(ids) if isinstance(ids, np.ndarray) else _from_python(ids)  # np.matrix, memmap: a plain view
    kind = arr.dtype.kind
    if kind != "i" and kind != "u":
        raise IdError(_dtype_message(arr.dtype))
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _from_python(ids: Any) -> np.ndarray:
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as exc:
        raise IdError(f"ids of type {type(ids).__name__} cannot be read as an array ({exc}); pass integer ids") from exc
    if arr.size == 0 and arr.dtype.kind == "f" and isinstance(ids, (list, tuple)):
        return np.zeros(arr.shape, dtype=np.int64)  # np.asarray([]) is float64
    if arr.dtype.kind in "fO" and isinstance(ids, (list, tuple)):
        return _python_ints(ids, arr)
    return arr


def _python_ints(ids: Sequence[Any], arr: np.ndarray) -> np.ndarray:
    """A list that numpy made float or object only because an int did not fit in int64."""
    try:
        obj = np.asarray(ids, dtype=object)
    except ValueError:
        return arr
    values = list(obj.flat)
    if not values or not all(type(v) is int for v in values):
        return arr
    low, high = min(values), max(values)
    if low >= -(2**63) and high < 2**63:
        return obj.astype(np.int64)
    if low >= 0 and high < 2**64:
        return obj.astype(np.uint64)
    if high >= 2**64 or low < -(2**63):
        bad = high if high >= 2**64 else low
        raise IdError(f"id {bad} does not fit in 64 bits; ids must be int64 or uint64 values")
    raise IdError(f"ids mix a negative id ({low}) with an id >= 2**63 ({high}), and no 64-bit integer type "
                  "holds both; look them up in separate calls, or drop the ids >= 2**63 (no table has such rows)")


def _dtype_message(dtype: np.dtype[Any]) -> str:
    kind = dtype.kind
    if kind == "b":
        hint = "a boolean mask is not a list of ids; use np.flatnonzero(mask) to get the ids it selects"
    elif kind in "fc":
        hint = "convert whole-number values with ids.astype(np.int64) (check they are whole numbers first)"
    elif kind in "US":
        hint = "strings are tokens, not ids: use lookup.tokens([...]), or vocabulary.ids(...) to map them"
    elif kind == "O":
        hint = "pass a list or array of integers, e.g. np.asarray(ids, dtype=np.int64)"
    else:
        hint = "pass an integer array (int8..int64 or uint8..uint64)"
    return f"ids have dtype {dtype}, but ids must be integers; {hint}"


@dataclass(frozen=True)
class IndexPolicy:
    """A policy bound to a table size: :meth:`apply` turns any integer ids into safe ones.

    ``apply`` returns ``(safe, zero)``: ``safe`` holds int64 or int32 ids all in ``[0, rows)`` with the
    shape of the input, and ``zero`` is ``None`` or a boolean mask of the positions whose output vector
    must be all zeros (``zero`` policy only).
    """

    name: str
    rows: int
    oov_id: int | None = None
    table: str = "table"

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise InputError(f"unknown index policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.name == "oov":
            if self.oov_id is not None and not is_row_number(self.oov_id):
                raise InputError(f"oov_id must be an integer row number, got {self.oov_id!r} "
                                 f"({type(self.oov_id).__name__})")
            if self.oov_id is None:
                raise InputError(
                    f"policy 'oov' needs an OOV row, but table {self.table!r} has no oov_id; "
                    "pass oov_id=<row> or choose policy 'zero'"
                )
            if not 0 <= self.oov_id < self.rows:
                raise InputError(f"oov_id={self.oov_id} is outside [0, {self.rows}) for table {self.table!r}")

    @classmethod
    def create(cls, name: str, rows: int, *, oov_id: int | None = None, table: str = "table") -> IndexPolicy:
        """Build a policy; ``oov_id`` is kept only for the ``oov`` policy (the others ignore it)."""
        return cls(name=name, rows=int(rows), oov_id=None if name != "oov" else oov_id, table=table)

    def fits(self, ids: Any) -> bool:
        """True if ``ids`` can be gathered as it is: what :meth:`apply` would return unchanged.

        That is a plain ndarray of native int32 or int64 ids, all in ``[0, rows)``, and one id (any
        shape) or a 1-D array of at most 16: the one-id serving call. A cheap test (about 0.2 us at one id)
        run before :func:`as_ids` and :meth:`apply`; ``False`` means "take the general path", never "invalid".
        """
        if type(ids) is not _NDARRAY or ids.dtype not in _GATHER_DTYPES:  # gatherable_dtype(), inlined
            return False
        if ids.size == 1:
            return 0 <= ids.item() < self.rows
        if not 1 < ids.size <= _SMALL or ids.ndim != 1:  # empty, many ids, or nested (tolist() would nest)
            return False
        return _all_in_range(ids.tolist(), self.rows)

    def in_range(self, ids: np.ndarray) -> bool:
        """True if every id is in ``[0, rows)`` (``ids`` as returned by :func:`as_ids`); True for no ids."""
        size = ids.size
        if size <= _SMALL and ids.ndim <= 1:  # sorted() on a list beats two ndarray reductions here
            values = ids.tolist()
            if type(values) is int:
                return 0 <= values < self.rows
            return not values or _all_in_range(values, self.rows)
        if not size:  # empty, 2-D or more: a reduction would raise (no identity)
            return True
        if ids.dtype.kind == "i":  # negatives viewed as unsigned are huge: one maximum checks both ends
            ids = ids.view(_UNSIGNED_BY_SIZE[ids.itemsize])
        return int(_MAXIMUM(ids, None)) < self.rows  # the ufunc's reduce: ndarray.max() adds 0.3 us of Python

    def apply(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate ``ids`` (from :func:`as_ids`) and return ``(safe_ids, zero_mask_or_None)``."""
        if self.in_range(ids):
            if ids.dtype.char not in "ilq":  # int32, C long, C long long: int32 or int64 everywhere
                ids = ids.astype(np.int64)
            return ids, None
        return self.repair(ids)

    def repair(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`apply` for ids that :meth:`in_range` refused (it skips that check): raise or map the bad ones."""
        values = _to_int64(ids)  # ids beyond int64 become INT64_MAX: out of range, positive
        bad = (values < 0) | (values >= self.rows)
        if self.name == "error":
            self._raise_first(ids, bad)
        if self.name == "wrap":
            values[bad & (values < 0) & (values >= -self.rows)] += self.rows
            self._raise_first(ids, (values < 0) | (values >= self.rows))
            return values, None
        if self.rows == 0:
            if self.name == "zero":
                return np.zeros(values.shape, np.int64), bad
            raise IdError(f"table {self.table!r} has no rows, so no id is valid under policy {self.name!r}")
        if self.name == "clip":
            return np.clip(values, 0, self.rows - 1), None
        if self.name == "oov":
            assert self.oov_id is not None  # __post_init__ refuses policy 'oov' without a row
            return np.where(bad, np.int64(self.oov_id), values), None
        return np.where(bad, np.int64(0), values), bad  # zero

    def _raise_first(self, ids: np.ndarray, bad: np.ndarray) -> None:
        if not bad.any():
            return
        flat = int(np.argmax(bad.reshape(-1)))
        position = tuple(int(i) for i in np.unravel_index(flat, ids.shape))
        value = ids.reshape(-1)[flat].item()
        low = -self.rows if self.name == "wrap" else 0
        raise IdError(
            f"id {value} at position {position} is out of range for table {self.table!r} "
            f"({self.rows} rows; valid ids under policy {self.name!r}: {low}..{self.rows - 1}); "
            "fix the ids or choose another index policy (clip, zero, oov, wrap)"
        )


def is_row_number(value: Any) -> bool:
    """True for a Python or NumPy integer that is not a bool (``True`` is not row 1, ``3.5`` not row 3)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def gatherable_dtype(ids: Any) -> bool:
    """True if ``ids`` is a plain ndarray of native int32 or int64 ids: what every framework gathers with as is."""
    return type(ids) is _NDARRAY and ids.dtype in _GATHER_DTYPES


def _all_in_range(values: list[int], rows: int) -> bool:
    """True if the non-empty list ``values`` lies in ``[0, rows)`` (one sorted() beats min() plus max())."""
    ordered = sorted(values)
    return ordered[0] >= 0 and ordered[-1] < rows


def _to_int64(ids: np.ndarray) -> np.ndarray:
    """int64 copy of ``ids``; uint64 values that do not fit become INT64_MAX (still out of range)."""
    if ids.dtype.kind == "u" and ids.itemsize == 8:
        huge = ids > _INT64_MAX
        values = ids.astype(np.int64)
        values[huge] = _INT64_MAX
        return values
    return ids.astype(np.int64)
