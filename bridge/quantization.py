"""Quantized embedding tables: how a row of integers becomes the vector a model serves.

A quantized :class:`~bridge.table.EmbeddingTable` keeps its integer table ``q`` ``[V, D]`` as
``data`` and a :class:`Quantization` with the parameters. For an id ``i`` (``cast`` is a cast to
``out_dtype``; every operation is one IEEE operation in ``out_dtype``, in the order written)::

    row_div       out = cast(q[i]) / cast(scale[i])                                  scale [V]
                  Keras int8, and Keras int4 with block_size None or -1 (Embedding._int8_call,
                  _int4_call: ``cast(take(q, i)) / expand_dims(take(scale, i), -1)``).
    group_affine  g = arange(D) // group_size                                         scale, zero [V, G]
                  out = (cast(q[i]) - cast(zero[i, g])) * cast(scale[i, g])           G = ceil(D / group_size)
                  Keras int4 with block_size > 0 (``dequantize_with_sz_map``: subtract, then multiply),
                  and ONNX ``DequantizeLinear(axis=1, block_size=B)``; no zero point means zero 0.
    affine        out = (cast(q[i]) - cast(zero)) * cast(scale)                       ONNX DequantizeLinear
    mul           out = cast(q[i]) * cast(scale)                                      ONNX Mul(Cast(q), scale)
                  For both: ``axis=None`` per tensor (scale, zero of shape [1]), ``axis=0`` per row
                  ([V], indexed by ``i``), ``axis=1`` per column ([D]).

Why these are exact in every framework: a cast of an integer of at most 16 bits to float32/float64
(of at most 8 bits to float16) is exact, and so is the difference of two such integers (onnxruntime's
DequantizeLinear subtracts in int32 before casting; the result is the same number). What remains is one
correctly rounded ``/`` or ``*`` (after one ``-``), which numpy, torch, onnxruntime and TensorFlow all
compute the same way. A float16 result is computed in float32 and rounded once more; for a single
``+ - * /`` of float16 inputs that second rounding is exact (24 >= 2 * 11 + 2 bits). Where that argument
fails, the table is refused (:meth:`Quantization.check`): float16 output from a 16-bit table or zero point
(``q - zero`` is not exact in float16, onnxruntime subtracts exactly), and a NaN in a scale with float16
involved (onnxruntime returns the canonical NaN, NumPy and torch keep the payload).

``scale`` keeps the dtype it was stored with and is cast to ``out_dtype`` (a widening, or nothing,
for every source this package reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.errors import InputError, UnsupportedError

if TYPE_CHECKING:
    from bridge.table import EmbeddingTable

SCHEMES: tuple[str, ...] = ("row_div", "group_affine", "affine", "mul")
OUT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
_CHUNK_BYTES = 16 << 20  # output bytes per step of dense()


@dataclass(frozen=True, eq=False)
class Quantization:
    """How the integer rows of a table are turned into vectors (see the module docstring).

    ``scale`` (and ``zero_point``) may be ordinary arrays or read-only memory maps; a per-tensor
    parameter given as a 0-d array is kept with shape ``[1]``. ``axis`` applies to ``affine`` and
    ``mul`` only (``None``: per tensor, ``0``: per row, ``1``: per column).
    """

    scheme: str
    scale: np.ndarray
    zero_point: np.ndarray | None = None
    group_size: int | None = None
    out_dtype: str = "float32"
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown quantization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        out = np.dtype(self.out_dtype).name
        if out not in OUT_DTYPES:
            raise UnsupportedError(f"quantized tables are served as {', '.join(OUT_DTYPES)}, not {out}")
        object.__setattr__(self, "out_dtype", out)
        for label in ("scale", "zero_point"):
            value = getattr(self, label)
            if value is not None and np.ndim(value) == 0:
                object.__setattr__(self, label, np.asarray(value).reshape(1))
            elif isinstance(value, np.ndarray) and not value.dtype.isnative:  # small: one copy in native order
                object.__setattr__(self, label, value.astype(value.dtype.newbyteorder("=")))
        self._check_kinds()
        self._check_layout()

    def _check_kinds(self) -> None:
        if not isinstance(self.scale, np.ndarray) or self.scale.dtype.kind != "f":
            raise InputError(f"quantization scale must be a float array, got {_describe(self.scale)}")
        zp = self.zero_point
        if zp is not None and (not isinstance(zp, np.ndarray) or zp.dtype.kind not in "iu" or zp.dtype.itemsize > 2):
            raise InputError(f"quantization zero point must be an 8- or 16-bit integer array, got {_describe(zp)}")

    def _check_layout(self) -> None:
        s, zp = self.scale, self.zero_point
        if zp is not None and zp.shape != s.shape:
            raise InputError(f"zero point shape {zp.shape} differs from scale shape {s.shape}")
        if self.scheme == "row_div":
            self._expect(s.ndim == 1 and zp is None and self.axis is None, "a [rows] scale and no zero point")
        elif self.scheme == "group_affine":
            ok = s.ndim == 2 and self.group_size is not None and self.group_size > 0 and self.axis is None
            self._expect(ok, "a [rows, groups] scale and a positive group_size")
        else:
            self._expect(self.axis in (None, 0, 1) and self.group_size is None, "axis None, 0 or 1, no group_size")
            self._expect(s.ndim == 1 and (self.axis is not None or s.size == 1), "a [1], [rows] or [dim] scale")
            self._expect(self.scheme == "affine" or zp is None, "no zero point (use 'affine' for one)")

    def _expect(self, ok: bool, what: str) -> None:
        if not ok:
            raise InputError(
                f"quantization {self.scheme!r} needs {what}; got scale {tuple(self.scale.shape)}, "
                f"zero point {None if self.zero_point is None else tuple(self.zero_point.shape)}, "
                f"group_size={self.group_size}, axis={self.axis}"
            )

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of the served vectors."""
        return np.dtype(self.out_dtype)

    @property
    def per_row(self) -> bool:
        """True when scale (and zero point) are indexed by the id (one entry, or group, per row)."""
        return self.scheme in ("row_div", "group_affine") or self.axis == 0

    def check(self, rows: int, dim: int, q_dtype: np.dtype[Any], table: str = "table") -> None:
        """Raise :class:`InputError` unless the parameters fit an integer table of ``rows`` x ``dim``
        (:class:`UnsupportedError` for a table dtype no scheme serves, and for parameters the backends cannot
        serve bit for bit as onnxruntime does: see :meth:`_check_exact`)."""
        q_dtype = np.dtype(q_dtype)
        if q_dtype.kind not in "iu" or q_dtype.itemsize > 2 or (self.out_dtype == "float16" and q_dtype.itemsize > 1):
            raise UnsupportedError(
                f"table {table!r}: a quantized table holds 8- or 16-bit integers (8-bit for float16 output), "
                f"got {q_dtype}"
            )
        self._check_exact(table)
        want = self._scale_shape(rows, dim)
        if tuple(self.scale.shape) != want:
            raise InputError(f"table {table!r} ({rows} x {dim}): {self.scheme} scale must have shape {want}, "
                             f"got {tuple(self.scale.shape)}")

    def _check_exact(self, table: str) -> None:
        """:class:`UnsupportedError` where the backends cannot agree bit for bit with onnxruntime on a float16
        output: a zero point wider than 8 bits (``q - zero`` is not exact in float16; onnxruntime subtracts
        exactly) or a NaN in a scale (onnxruntime returns the canonical NaN, NumPy and torch keep its payload)."""
        zp = self.zero_point
        if self.out_dtype == "float16" and zp is not None and zp.dtype.itemsize > 1:
            raise UnsupportedError(
                f"table {table!r}: its zero point is {zp.dtype} and its vectors float16, but q - zero is exact in "
                "float16 only for 8-bit zero points (onnxruntime subtracts exactly, NumPy and torch would round); "
                "dequantize it to float32 (a float32 scale), or use 8-bit zero points"
            )
        if "float16" in (self.out_dtype, self.scale.dtype.name) and np.isnan(self.scale).any():
            raise UnsupportedError(
                f"table {table!r}: its {self.scale.dtype} scale holds NaN and its vectors are {self.out_dtype}: "
                "onnxruntime returns the canonical NaN where NumPy and torch keep a NaN's payload bits, so no "
                "backend can match the model bit for bit; replace the NaNs in the scale"
            )

    def _scale_shape(self, rows: int, dim: int) -> tuple[int, ...]:
        if self.scheme == "row_div":
            return (rows,)
        if self.scheme == "group_affine":
            return (rows, -(-dim // int(self.group_size or 1)))
        return {None: (1,), 0: (rows,), 1: (dim,)}[self.axis]

    def groups(self, dim: int) -> np.ndarray:
        """``g_idx``: the group of each column, ``arange(dim) // group_size`` (int64)."""
        return np.arange(dim, dtype=np.int64) // int(self.group_size or 1)

    def metadata(self) -> dict[str, Any]:
        """The JSON-safe description without the arrays: scheme, group_size, axis, out_dtype."""
        return {"scheme": self.scheme, "group_size": self.group_size, "axis": self.axis, "out_dtype": self.out_dtype}

    def dequantize_rows(self, q_rows: np.ndarray, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Vectors for integer rows ``q_rows`` (``ids.shape + (dim,)``) gathered with ``ids`` (all valid).

        The NumPy reference of each scheme's arithmetic, written into ``out`` when given.
        """
        dt = self.dtype
        if out is None:
            out = np.empty(q_rows.shape, dt)
        ids = np.asarray(ids)
        if self.scheme == "row_div":
            scale = np.take(self.scale, ids, mode="clip").astype(dt, copy=False)[..., None]
            return np.divide(q_rows, scale, out=out, dtype=dt)
        if self.scheme == "group_affine":
            scale = self._expand(self.scale, ids, q_rows.shape[-1]).astype(dt, copy=False)
            if self.zero_point is None:
                return np.multiply(q_rows, scale, out=out, dtype=dt)
            np.subtract(q_rows, self._expand(self.zero_point, ids, q_rows.shape[-1]), out=out, dtype=dt)
            return np.multiply(out, scale, out=out)
        scale = self._broadcast(self.scale, ids).astype(dt, copy=False)
        if self.zero_point is None:
            return np.multiply(q_rows, scale, out=out, dtype=dt)
        np.subtract(q_rows, self._broadcast(self.zero_point, ids), out=out, dtype=dt)
        return np.multiply(out, scale, out=out)

    def _expand(self, param: np.ndarray, ids: np.ndarray, dim: int) -> np.ndarray:
        """``param[ids][..., groups(dim)]``: each group's entry repeated over its columns."""
        rows = np.take(param, ids, axis=0, mode="clip")
        return np.repeat(rows, int(self.group_size or 1), axis=-1)[..., :dim]

    def _broadcast(self, param: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """A per-tensor, per-row or per-column parameter, shaped to broadcast against the rows."""
        if self.axis == 0:
            return np.take(param, ids, mode="clip")[..., None]
        return np.asarray(param)

    def __repr__(self) -> str:
        zp = "" if self.zero_point is None else f", zero_point={tuple(self.zero_point.shape)} {self.zero_point.dtype}"
        pairs = (("group_size", self.group_size), ("axis", self.axis))
        extra = "".join(f", {k}={v}" for k, v in pairs if v is not None)
        return (f"Quantization({self.scheme!r}, scale={tuple(self.scale.shape)} {self.scale.dtype}{zp}{extra}, "
                f"out_dtype={self.out_dtype!r})")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def dense(table: EmbeddingTable, *, chunk_rows: int | None = None) -> np.ndarray:
    """The float table ``[rows, dim]`` a quantized table serves (``table.data`` itself when not quantized).

    Computed ``chunk_rows`` rows at a time (default: about 16 MiB of output per step) with
    :meth:`Quantization.dequantize_rows`, so only the output is held in memory.
    """
    quant = table.quantization
    if quant is None:
        return table.data
    out = np.empty(table.shape, quant.dtype)
    step = chunk_rows or max(1, _CHUNK_BYTES // max(1, table.dim * quant.dtype.itemsize))
    for start in range(0, table.rows, step):
        stop = min(start + step, table.rows)
        ids = np.arange(start, stop, dtype=np.int64)
        quant.dequantize_rows(np.asarray(table.data[start:stop]), ids, out=out[start:stop])
    return out


__all__ = ["OUT_DTYPES", "SCHEMES", "Quantization", "dense"]
