"""NumPy backend: ``np.take`` on the table itself (an ordinary array or a read-only memory map)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from bridge.backends.base import Lookup


class NumpyLookup(Lookup):
    """Gathers with ``np.take(data, ids, axis=0, out=out, mode="clip")``, the fastest NumPy form.

    ``mode="clip"`` is safe because the base class has already applied the index policy; it only
    skips NumPy's own bounds check. ``threads`` is accepted for symmetry; NumPy gathers on one thread.
    A quantized table is dequantized by :meth:`bridge.quantization.Quantization.dequantize_rows`.
    """

    backend: ClassVar[str] = "numpy"

    def _setup(self, threads: int) -> None:
        self._data = self.table.data
        if self.table.quantization is not None:
            self._quant = self.table.quantization
            self._gather = self._gather_quantized  # type: ignore[method-assign]

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        np.take(self._data, ids, axis=0, out=out, mode="clip")

    def _gather_quantized(self, ids: np.ndarray, out: np.ndarray) -> None:
        """``np.take`` of the integer rows, then the scheme's NumPy arithmetic into ``out``."""
        self._quant.dequantize_rows(np.take(self._data, ids, axis=0, mode="clip"), ids, out=out)
