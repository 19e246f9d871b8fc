"""PyTorch backend: ``torch.index_select`` on a tensor that shares the table's memory.

The weight is ``torch.from_numpy(table.data)``: no copy, also for a read-only memory map (torch warns
that such a tensor is not writable; the warning is silenced for that one call, and nothing here ever
writes to the weight). bfloat16 tables, which NumPy holds as ``ml_dtypes.bfloat16``, are handed to torch
as their int16 bit pattern, gathered as int16 (a gather copies bits), and :meth:`native` views the result
as ``torch.bfloat16``. Small batches copy through per-thread staging tensors
(:class:`~bridge.backends.base.ThreadBuffers`); large ones gather straight into the caller's buffer.

Threads: torch's intra-op thread count is process-global (``torch.set_num_threads``), so ``threads`` is
recorded but not applied; this backend never changes global state.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np

from bridge.backends.base import SMALL_BYTES, Lookup, ThreadBuffers, contiguous_data, require
from bridge.errors import BackendError

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


class TorchLookup(Lookup):
    """Gathers with ``torch.index_select(weight, 0, ids, out=...)`` into the NumPy output buffer."""

    backend: ClassVar[str] = "torch"
    framework: ClassVar[str | None] = "torch"
    extra: ClassVar[str | None] = "torch"

    def _setup(self, threads: int) -> None:
        torch = require("torch", backend=self.backend, extra=self.extra)
        name = str(self.dtype)
        if name not in _DTYPES:
            raise BackendError(
                f"table {self.table.name!r} has dtype {name}, which the torch backend does not serve; "
                f"supported: {', '.join(_DTYPES)}"
            )
        carrier, native = _DTYPES[name]
        self._carrier = np.dtype(carrier)
        self._same = self._carrier == self.dtype
        self._native_dtype = getattr(torch, native)
        data = contiguous_data(self.table, self.backend).view(self._carrier)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            self.weight = torch.from_numpy(data)  # shares memory; never written to
        self._from_numpy = torch.from_numpy
        self._index_select = torch.index_select
        self._flat_tail = (-1, self.table.dim)
        self._staging = ThreadBuffers(self._bind)

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        if out.nbytes <= SMALL_BYTES:  # copying through staging tensors beats two from_numpy calls
            ids_buf, out_buf, ids_t, out_t = self._staging.get(ids.shape)
            ids_buf[...] = ids
            self._index_select(self.weight, 0, ids_t, out=out_t)
            (out if self._same else out.view(self._carrier))[...] = out_buf
            return
        flat_ids = np.ascontiguousarray(ids).reshape(-1)
        dst = self._from_numpy((out if self._same else out.view(self._carrier)).reshape(self._flat_tail))
        self._index_select(self.weight, 0, self._from_numpy(flat_ids), out=dst)

    def _bind(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Any, Any]:
        """Staging buffers for ``shape`` and the flat tensors sharing their memory."""
        ids_buf = np.zeros(shape, np.int64)
        out_buf = np.empty(shape + (self.table.dim,), self._carrier)
        ids_t = self._from_numpy(ids_buf.reshape(-1))
        return ids_buf, out_buf, ids_t, self._from_numpy(out_buf.reshape(self._flat_tail))

    def _wrap(self, out: np.ndarray) -> Any:
        tensor = self._from_numpy(out if self._same else out.view(self._carrier))
        return tensor if tensor.dtype == self._native_dtype else tensor.view(self._native_dtype)
