"""NumPy backend: the table's own ``take`` (an ordinary array or a read-only memory map).

Speed: ``data.take(ids, 0, out, "clip")``, the array's bound method called with positional arguments,
costs 0.3 us at one id where ``np.take(data, ids, axis=0, out=out, mode="clip")`` costs 1.3 us (the
function forwards to the method through keyword handling). The method is bound once, on
``np.asarray(data)``, so a memory-mapped table yields plain ndarrays. ``mode="clip"`` is safe because
the base class has already applied the index policy; it only skips NumPy's own bounds check, which
with ``out=`` is slower than no ``out`` at all.

Bounds and gather in one pass: where the optional C kernel :mod:`bridge._kernels` is built (``pip
install`` compiles it when a C compiler is present), int32/int64 ids go straight to its ``take_rows``,
which checks each id as it copies the row and stops at the first one outside ``[0, rows)``; the call
then takes the general path, which applies the policy, so results and errors are the same (see
:meth:`~bridge.backends.base.Lookup._try_unchecked`). NumPy's take has no such mode (``mode="raise"``
accepts negative ids, and with ``out=`` it buffers the whole output), so without the kernel the policy
reads the ids once more before ``take``: 5-11% of a gather from a cached table at 65,536 ids. The
kernel also prefetches the rows of the ids a few places ahead, which NumPy's take does not: measured at
0.86-0.96x take's time on a 2.4 MiB table and 0.63-0.82x on a 512 MiB one. ``KERNEL`` is the module this
process uses (None: take after the check); :func:`_kernel_pays` keeps take for the one shape where the
kernel measured slower.

Without ``out=`` each call allocates its result; at large batches the fresh pages (the kernel zeroes
each one on first touch) cost as much as the gather itself, 1.4-4x in all (a 1M x 256 float32 batch is
a new GiB). Callers that look up large batches repeatedly should pass a reused ``out=``.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import numpy as np

from bridge.backends.base import Lookup


def _kernels() -> ModuleType | None:
    """The compiled :mod:`bridge._kernels`, or None where it was not built (no C compiler at install)."""
    try:
        from bridge import _kernels
    except ImportError:
        return None
    return _kernels


KERNEL: ModuleType | None = _kernels()


def _kernel_pays(row_bytes: int, table_bytes: int, cached_bytes: int) -> bool:
    """Whether the kernel is faster than NumPy's take for this table (see :mod:`bridge._kernels`).

    It copies rows of 1-32 bytes (powers of two) inline and longer ones with a call to glibc's memmove,
    and prefetches rows from tables of more than ``cached_bytes`` (a core's L2 cache). Odd narrow rows (12,
    20, 24 bytes...) from a table that fits in L2 get neither gain: one call per tiny row measured
    1.13-1.28x np.take there.
    """
    odd_narrow = row_bytes < 64 and row_bytes & (row_bytes - 1) != 0
    return not (odd_narrow and table_bytes <= cached_bytes)


class NumpyLookup(Lookup):
    """Gathers int32/int64 ids with the C kernel's checked ``take_rows`` where it is built and pays, and
    otherwise with ``data.take(ids, 0, out, "clip")`` after the policy, the fastest NumPy form.

    ``threads`` is accepted for symmetry; both gather on one thread. A quantized table is dequantized
    by :meth:`bridge.quantization.Quantization.dequantize_rows`.
    """

    backend: ClassVar[str] = "numpy"

    def _setup(self, threads: int) -> None:
        self._data = np.asarray(self.table.data)
        self._take = self._data.take  # bound once: 0.3 us per call, np.take 1.3 us
        if self.table.quantization is not None:
            self._quant = self.table.quantization
            self._gather = self._gather_quantized  # type: ignore[method-assign]
            self._fresh = super()._fresh  # type: ignore[method-assign]
            return
        self._rows, self._row_bytes = self._data.shape[0], self.table.dim * self._data.itemsize
        if KERNEL is not None and self._gatherable and self._data.flags.c_contiguous \
                and _kernel_pays(self._row_bytes, self._data.nbytes, KERNEL.CACHED_BYTES):
            self._take_rows = KERNEL.take_rows
            self._unchecked_from = 1  # the kernel beats the policy's pass plus take at every batch size

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        self._take(ids, 0, out, "clip")

    def _fresh(self, ids: np.ndarray) -> np.ndarray:
        return self._take(ids, 0, None, "clip")  # take allocates a C-contiguous result of the table's dtype

    def _gather_or_refuse(self, ids: np.ndarray, out: np.ndarray) -> bool:
        """The kernel's checked gather; False at the first id outside ``[0, rows)``, or where ``out`` overlaps
        the table (the kernel would read rows it has overwritten; NumPy's take buffers that case)."""
        if self._may_alias and np.may_share_memory(out, self._data):
            return False
        flags = ids.flags
        if not (flags.c_contiguous and flags.aligned):  # the kernel reads whole, aligned int32/int64 values
            ids = ids.copy()
        return self._take_rows(self._data, ids, out, self._rows, self._row_bytes) < 0

    def _gather_quantized(self, ids: np.ndarray, out: np.ndarray) -> None:
        """The integer rows, then the scheme's NumPy arithmetic into ``out``."""
        self._quant.dequantize_rows(self._take(ids, 0, None, "clip"), ids, out=out)
