"""The in-memory form of one embedding table: matrix, vocabulary, provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bridge import dtypes
from bridge.errors import InputError
from bridge.policy import is_row_number
from bridge.quantization import Quantization
from bridge.vocab import Vocabulary


@dataclass(frozen=True)
class SourceRef:
    """Where a table came from: a framework layer and its weight (``framework`` is e.g. ``"keras"``)."""

    framework: str
    layer: str
    weight: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"framework": self.framework, "layer": self.layer, "weight": self.weight}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SourceRef:
        return cls(framework=str(obj["framework"]), layer=str(obj["layer"]), weight=obj.get("weight"))


@dataclass
class EmbeddingTable:
    """One embedding matrix of shape ``[rows, dim]`` and what is known about it.

    ``data`` may be an ordinary array or a read-only memory map of a store file; nothing in
    this package copies it unless asked. ``oov_id`` is the row the ``oov`` index policy uses;
    ``padding_id`` is set only where the source really has a padding row (a Keras
    ``mask_zero`` layer has a *mask*, recorded in ``metadata["mask_zero"]``, not a padding row).

    A quantized table keeps its integer matrix in ``data`` (``dtype`` is that integer type) and the
    scale / zero point in ``quantization``; lookups serve dequantized vectors of ``served_dtype``, and
    :func:`bridge.quantization.dense` gives the whole float table.
    """

    name: str
    data: np.ndarray
    vocab: Vocabulary | None = None
    sources: tuple[SourceRef, ...] = ()
    initializer: str | None = None
    oov_id: int | None = None
    padding_id: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray):
            raise InputError(f"table {self.name!r}: data must be a numpy array, got {type(self.data).__name__}; "
                             "pass np.asarray(data)")
        if not dtypes.is_storable(self.data.dtype):
            raise InputError(f"table {self.name!r} has dtype {self.data.dtype}; a table holds numbers (bool, int, "
                             "uint, float, complex, bfloat16, float8): convert it with data.astype(...)")
        if self.data.ndim != 2:
            raise InputError(f"table {self.name!r} must be 2-D [rows, dim], got shape {tuple(self.data.shape)}")
        for label, idx in (("oov_id", self.oov_id), ("padding_id", self.padding_id)):
            if idx is not None and not is_row_number(idx):
                raise InputError(f"table {self.name!r}: {label} must be an integer row number, got {idx!r} "
                                 f"({type(idx).__name__})")
            if idx is not None and not 0 <= idx < self.rows:
                raise InputError(f"table {self.name!r}: {label}={idx} is outside [0, {self.rows})")
        if self.quantization is not None:
            self.quantization.check(self.rows, self.dim, self.data.dtype, self.name)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def served_dtype(self) -> np.dtype[Any]:
        """The dtype lookups return: ``quantization.out_dtype`` for a quantized table, else ``dtype``."""
        return self.data.dtype if self.quantization is None else self.quantization.dtype

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        src = ", ".join(s.layer for s in self.sources) or "unknown"
        vocab = f", vocab={len(self.vocab)}" if self.vocab is not None else ""
        quant = f", quantization={self.quantization.scheme}" if self.quantization is not None else ""
        return f"EmbeddingTable({self.name!r}, shape={self.shape}, dtype={self.dtype}, source={src}{vocab}{quant})"
