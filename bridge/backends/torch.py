"""PyTorch backend: ``torch.index_select`` on a tensor that shares the table's memory.

The weight is ``torch.from_numpy(table.data)``: no copy, also for a read-only memory map (torch warns
that such a tensor is not writable; the warning is silenced for that one call, and nothing here ever
writes to the weight). bfloat16 tables, which NumPy holds as ``ml_dtypes.bfloat16``, are handed to torch
as their int16 bit pattern, gathered as int16 (a gather copies bits), and :meth:`native` views the result
as ``torch.bfloat16``.

Speed: small batches (up to ``SMALL_BYTES`` of output) gather into per-thread staging tensors built
once per ids shape (:class:`~bridge.backends.base.ThreadBuffers`): copying the ids in and the rows out
(0.1 and 0.25 us at one id) is cheaper than wrapping two arrays with ``torch.from_numpy`` (0.8 us each).
One id is copied with ``torch.narrow_copy(weight, 0, id, 1, out=)`` (1.4 us), which takes the id as an
int, instead of ``torch.index_select(out=)`` (2.3 us); both copy the row's bytes. Without ``out=`` the
result is a copy of the staged rows, cheaper than a new array plus an assignment. ``lookup(ids)`` at one
id costs about 3.3 us. Gathering small batches with NumPy's ``take`` would cost about 1.1 us for the
same bytes, but this backend always gathers with torch: that is what a parity check of the torch
backend tests, and what a benchmark of it measures. Large batches gather straight into the output
buffer; without ``out=`` that buffer is new on every call, and its fresh pages cost about as much as
the gather itself (pass a reused ``out=`` for large batches). ``index_select`` checks every id against
``[0, rows)`` itself (negative ids included) and raises IndexError before reading outside the table, so
large batches of int32/int64 ids skip the index policy's own pass over them (one more read of 512 KiB
at 65,536 int64 ids, 6-11% of the gather from a cached table): when torch refuses an id, the call
takes the general path, which applies the policy (see :meth:`~bridge.backends.base.Lookup._try_unchecked`).

A quantized table is served dequantized: ``index_select`` on the integer table and on the scale (and
zero point), ``.to(dtype)``, then ``torch.div`` or ``torch.sub`` / ``torch.mul`` into the output buffer,
in :mod:`bridge.quantization`'s order.

Threads: torch's intra-op thread count is process-global (``torch.set_num_threads``), so ``threads`` is
recorded but not applied; this backend never changes global state.
"""

from __future__ import annotations

import warnings
from types import MethodType
from typing import Any, ClassVar

import numpy as np

from bridge.backends.base import Lookup, StagedLookup, ThreadBuffers, contiguous_data, require

# table dtype name -> (dtype torch reads from NumPy, torch dtype name of the result)
_DTYPES: dict[str, tuple[str, str]] = {
    "float16": ("float16", "float16"),
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "bfloat16": ("int16", "bfloat16"),
    "int8": ("int8", "int8"),
    "uint8": ("uint8", "uint8"),
    "int16": ("int16", "int16"),
    "int32": ("int32", "int32"),
    "int64": ("int64", "int64"),
}


def _integers(torch: Any, array: np.ndarray) -> Any:
    """An integer table or zero point as a shared tensor; uint16 as its int16 bit pattern (see ``_widen``)."""
    return _shared(torch, array.view(np.int16) if array.dtype == np.uint16 else array)


def _shared(torch: Any, array: np.ndarray) -> Any:
    """``torch.from_numpy(array)``: shares memory, also with a read-only memory map (never written to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


class TorchLookup(StagedLookup):
    """Gathers with ``torch.index_select(weight, 0, ids, out=...)`` into the NumPy output buffer."""

    backend: ClassVar[str] = "torch"
    framework: ClassVar[str | None] = "torch"
    extra: ClassVar[str | None] = "torch"

    def _setup(self, threads: int) -> None:
        torch = require("torch", backend=self.backend, extra=self.extra)
        carrier, native = self._dtype_entry(_DTYPES)
        self._carrier = np.dtype(carrier)
        self._same = self._carrier == self.dtype
        self._native_dtype = getattr(torch, native)
        self._from_numpy = torch.from_numpy
        self._index_select = torch.index_select
        self._narrow_copy = torch.narrow_copy
        self._flat_tail = (-1, self.table.dim)
        self._row_bytes = self.table.dim * self.dtype.itemsize
        if self.table.quantization is not None:
            self._setup_quantized(torch)
            return
        self.weight = _shared(torch, contiguous_data(self.table, self.backend).view(self._carrier))
        self._staging = ThreadBuffers(self._bind)
        if self._gatherable:  # index_select refuses any id outside [0, rows) itself: see _gather_or_refuse
            self._unchecked_from = self._direct_from

    def _setup_quantized(self, torch: Any) -> None:
        """Bind the integer table, scale and zero point (no copies) and the dequantizing gather."""
        quant = self.table.quantization
        assert quant is not None
        self._quant, self._torch = quant, torch
        self.weight = _integers(torch, contiguous_data(self.table, self.backend))
        self._scale = _shared(torch, np.ascontiguousarray(quant.scale))
        self._zero = None if quant.zero_point is None else _integers(torch, np.ascontiguousarray(quant.zero_point))
        self._unsigned16 = (self.table.dtype == np.uint16,
                            quant.zero_point is not None and quant.zero_point.dtype == np.uint16)
        self._group_size = quant.group_size if quant.scheme == "group_affine" else None
        self._gather = self._gather_quantized  # type: ignore[method-assign]
        self._fresh = MethodType(Lookup._fresh, self)  # type: ignore[method-assign]  # no staging buffers

    def _gather_quantized(self, ids: np.ndarray, out: np.ndarray) -> None:
        """``index_select`` of the integer rows and the scale (zero point) rows, then torch arithmetic."""
        torch, dt, quant = self._torch, self._native_dtype, self._quant
        ids_t = self._from_numpy(np.ascontiguousarray(ids).reshape(-1))
        out_t = self._from_numpy(out.reshape(self._flat_tail))
        rows = self._widen(self._index_select(self.weight, 0, ids_t), self._unsigned16[0]).to(dt)
        if quant.scheme == "row_div":
            torch.div(rows, self._index_select(self._scale, 0, ids_t).to(dt).unsqueeze(-1), out=out_t)
            return
        scale, zero = self._param(self._scale, ids_t), self._param(self._zero, ids_t)
        if zero is None:
            torch.mul(rows, scale.to(dt), out=out_t)
            return
        torch.sub(rows, self._widen(zero, self._unsigned16[1]).to(dt), out=out_t)
        torch.mul(out_t, scale.to(dt), out=out_t)

    def _widen(self, bits: Any, unsigned16: bool) -> Any:
        """uint16 integers gathered as int16 bits (torch's index_select has no uint16) -> their int32 values."""
        return bits.to(self._torch.int32).bitwise_and_(0xFFFF) if unsigned16 else bits

    def _param(self, param: Any, ids_t: Any) -> Any:
        """Scale or zero point shaped to broadcast against ``[n, dim]`` rows (per tensor, row, column or group)."""
        if param is None:
            return None
        if self._group_size is not None:  # each group's entry over its columns (fancy indexing is 7x slower)
            rows = self._index_select(param, 0, ids_t)
            return self._torch.repeat_interleave(rows, self._group_size, dim=1)[:, : self.table.dim]
        if self._quant.axis == 0:
            return self._index_select(param, 0, ids_t).unsqueeze(-1)
        return param

    def _gather_direct(self, ids: np.ndarray, out: np.ndarray) -> None:
        flat_ids = np.ascontiguousarray(ids).reshape(-1)
        dst = self._from_numpy((out if self._same else out.view(self._carrier)).reshape(self._flat_tail))
        self._index_select(self.weight, 0, self._from_numpy(flat_ids), out=dst)

    def _gather_or_refuse(self, ids: np.ndarray, out: np.ndarray) -> bool:
        """``index_select`` checks every id against ``[0, rows)`` (negative ones too) and raises IndexError."""
        try:
            self._gather_large(ids, out)
        except IndexError:
            return False
        return True

    def _stage(self, ids: np.ndarray) -> np.ndarray:
        ids_buf, out_buf, ids_t, out_t = self._staging.get(ids.shape)
        if ids.size == 1:  # one row: narrow_copy takes the id as an int (see the module docstring)
            self._narrow_copy(self.weight, 0, ids.item(), 1, out=out_t)
        else:
            ids_buf[...] = ids
            self._index_select(self.weight, 0, ids_t, out=out_t)
        return out_buf

    def _bind(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Any, Any]:
        """Staging buffers for ``shape`` and the flat tensors sharing their memory."""
        ids_buf = np.zeros(shape, np.int64)
        out_buf = np.empty(shape + (self.table.dim,), self._carrier)
        ids_t = self._from_numpy(ids_buf.reshape(-1))
        return ids_buf, out_buf, ids_t, self._from_numpy(out_buf.reshape(self._flat_tail))

    def _wrap(self, out: np.ndarray) -> Any:
        tensor = self._from_numpy(out if self._same else out.view(self._carrier))
        return tensor if tensor.dtype == self._native_dtype else tensor.view(self._native_dtype)
