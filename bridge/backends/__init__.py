"""Runtime backends behind one interface, chosen per call by name.

    lookup = bridge.backends.lookup(table, "onnxruntime", policy="error")
    vectors = lookup(ids)          # np.ndarray of shape ids.shape + (dim,), the table's dtype
    lookup(ids, out=buf)           # into a preallocated C-contiguous buffer
    lookup.native(ids)             # torch.Tensor / onnxruntime.OrtValue / ndarray, sharing that buffer
    lookup.tokens(["the", "cat"])  # through table.vocab

Every backend validates ids and applies the index policy in the shared :class:`Lookup` base, then
gathers with its framework over the table's own memory (no copy). Frameworks are imported only when a
backend that needs them is created; nothing here is process-global.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from bridge.backends.base import Lookup
from bridge.errors import BackendError
from bridge.table import EmbeddingTable

# backend name -> (module, class, framework module it needs or None)
_ADAPTERS: dict[str, tuple[str, str, str | None]] = {
    "numpy": ("bridge.backends.numpy", "NumpyLookup", None),
    "onnxruntime": ("bridge.backends.onnxruntime", "OnnxruntimeLookup", "onnxruntime"),
    "torch": ("bridge.backends.torch", "TorchLookup", "torch"),
}
BACKENDS: tuple[str, ...] = tuple(_ADAPTERS)

__all__ = ["BACKENDS", "Lookup", "available_backends", "backend_class", "lookup"]


def backend_class(name: str) -> type[Lookup]:
    """The :class:`Lookup` subclass registered as ``name``; :class:`BackendError` lists valid names."""
    try:
        module, cls, _ = _ADAPTERS[name]
    except (KeyError, TypeError):
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    found: type[Lookup] = getattr(importlib.import_module(module), cls)
    return found


def available_backends() -> tuple[str, ...]:
    """Backends whose framework is installed (checked without importing it)."""
    return tuple(name for name, (_, _, fw) in _ADAPTERS.items() if fw is None or importlib.util.find_spec(fw))


def lookup(
    table: EmbeddingTable | np.ndarray,
    backend: str = "numpy",
    policy: str = "error",
    *,
    oov_id: int | None = None,
    threads: int = 1,
) -> Lookup:
    """Create a lookup for ``table`` on ``backend`` (``numpy``, ``onnxruntime`` or ``torch``).

    ``policy`` says what happens to ids outside ``[0, rows)`` (see :mod:`bridge.policy`); ``oov_id``
    overrides ``table.oov_id`` for the ``oov`` policy; ``threads`` sets onnxruntime's intra-op threads.
    A missing framework raises :class:`BackendError` naming the pip extra that installs it.
    """
    return backend_class(backend)(table, policy, oov_id=oov_id, threads=threads)
