"""NumPy backend: ``np.take`` on the table itself (an ordinary array or a read-only memory map)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from bridge.backends.base import Lookup


class NumpyLookup(Lookup):
    """Gathers with ``np.take(data, ids, axis=0, out=out, mode="clip")``, the fastest NumPy form.

    ``mode="clip"`` is safe because the base class has already applied the index policy; it only
    skips NumPy's own bounds check. ``threads`` is accepted for symmetry; NumPy gathers on one thread.
    """

    backend: ClassVar[str] = "numpy"

    def _setup(self, threads: int) -> None:
        self._data = self.table.data

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        np.take(self._data, ids, axis=0, out=out, mode="clip")
