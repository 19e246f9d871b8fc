"""From what the scanner saw (``TableRef.quantization``) to a :class:`~bridge.quantization.Quantization`.

:mod:`bridge.scan_patterns` names the constants of a dequantization; this module reads them from the
model and picks the scheme with the same arithmetic (see :mod:`bridge.quantization`):

==================================================  ==========================================
graph (``q`` the integer table)                      Quantization
==================================================  ==========================================
``Cast(Gather(q, i)) / Unsqueeze(Gather(s, i))``     ``row_div``, scale ``s`` [V] (Keras int8, int4); a widening
                                                     ``Cast`` of the gathered ``s`` (float16 -> float32) is
                                                     applied to the stored scale
``Cast(Gather(q, i)) * Unsqueeze(Gather(s, i))``     ``mul``, axis 0
``(Cast(Gather(q, i)) - Cast(Z[i][:, g])) * S[i][:, g]``  ``group_affine`` (Keras int4, block_size > 0)
``Gather(DequantizeLinear(q, s[, z]), i)``           ``affine`` (per tensor, axis 0 or 1), or
                                                     ``group_affine`` for ``block_size`` on axis 1
``Gather(Mul(Cast(q), s), i)``                       ``mul``: s of shape [], [1], [V, 1], [D], [1, D]
==================================================  ==========================================

The served dtype is the scale's dtype (ONNX ``Div``/``Mul``/``DequantizeLinear`` output the scale's type), or a
``DequantizeLinear``'s ``output_dtype`` (opset 23) where every scale is exact in it (else refused: onnxruntime
rounds the product, not the scale).
Anything else raises :class:`~bridge.errors.UnsupportedError` naming the pattern: storing the integer
table as if it were the embedding would serve wrong vectors. So does an integer table whose gathered rows
reach a ``DequantizeLinear``, or a ``Mul``/``Div``/``Sub`` after a Cast to a float type, in a way none of the
above matches (the scan's ``"unrecognized"`` scheme; bfloat16 dequantization is refused as such), one read
both dequantized and raw, and one whose readers dequantize it with different schemes or parameter values
(the same values under other names are one dequantization).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.errors import InputError, UnsupportedError
from bridge.onnx_io import initializer_array
from bridge.quantization import OUT_DTYPES, Quantization
from bridge.quantization_readers import check_readers, check_same_values, readers
from bridge.scan import TableRef, table_tensor


@dataclass(frozen=True)
class _Reader:
    model: onnx.ModelProto
    ref: TableRef
    base_dir: Path | None

    def array(self, info: dict[str, Any], role: str) -> np.ndarray | None:
        """The constant ``info[role]`` (``"scale"``, ...), None if it names none. It is looked up in the graph
        the scan found it in, ``info[role + "_graph"]``, which defaults to the table's own graph."""
        name = info.get(role)
        if not name:
            return None
        graph = str(info.get(f"{role}_graph", self.ref.graph))
        try:
            tensor = table_tensor(self.model, replace(self.ref, initializer=str(name), graph=graph))
        except InputError:
            raise self.unsupported(f"its parameter {name!r} is not a constant of graph {graph!r}") from None
        try:
            return np.asarray(initializer_array(tensor, self.base_dir))
        except UnsupportedError as exc:
            raise self.unsupported(f"its parameter {name!r} cannot be read ({exc})") from exc

    def unsupported(self, why: str) -> UnsupportedError:
        return UnsupportedError(
            f"table {self.ref.initializer!r} is quantized ({(self.ref.quantization or {}).get('scheme')}) but {why}; "
            "this dequantization is not supported, so its vectors cannot be served exactly"
        )

    @property
    def rows(self) -> int:
        return int(self.ref.shape[0])

    @property
    def dim(self) -> int:
        return int(self.ref.shape[1])


def quantization_from_ref(model: onnx.ModelProto, ref: TableRef, base_dir: Path | None = None) -> Quantization | None:
    """The :class:`Quantization` of table ``ref`` in ``model`` (None when the scan found none).

    Every reader of the table must see one dequantization: a table whose readers dequantize it with different
    parameters (by value: the same parameters under other names are one dequantization), or that is read both
    dequantized and raw, or dequantized in a way the scan does not recognise, is refused.
    """
    if not ref.quantization:
        return None
    reader = _Reader(model, ref, base_dir)
    found = readers(ref)
    check_readers(ref, found)
    quants = [(_build(reader, info), uses) for info, uses in found if info]
    check_same_values(ref, quants)
    return quants[0][0]


def _build(reader: _Reader, info: dict[str, Any]) -> Quantization:
    """The :class:`Quantization` of one dequantization ``info`` of the table."""
    ref = reader.ref
    build = _SCHEMES.get(str(info.get("scheme")))
    if build is None:
        raise reader.unsupported(f"scheme {info.get('scheme')!r} is unknown")
    _check_links(reader, _LINK_OPS.get(str(info.get("scheme"))))
    if ref.dtype not in _INTEGERS:
        raise reader.unsupported(f"its integers are {ref.dtype} (8- and 16-bit integer tables are supported)")
    try:
        quant = build(reader, info)
        quant.check(reader.rows, reader.dim, np.dtype(ref.dtype), ref.initializer)
    except (InputError, TypeError, ValueError) as exc:
        raise reader.unsupported(str(exc)) from exc
    return quant


def _check_links(reader: _Reader, op: str | None) -> None:
    """A dequantization in front of the Gather must feed every Gather, with only Identity after it."""
    if op is None:
        return
    for use in reader.ref.gathers:
        after = use.via[use.via.index(op) + 1:] if op in use.via else None
        if after is None or any(link != "Identity" for link in after):
            chain = " -> ".join(use.via) or "nothing"
            raise reader.unsupported(f"Gather {use.node!r} reads it through {chain}, not through one {op}")


def _out_dtype(reader: _Reader, scale: np.ndarray) -> str:
    if scale.dtype.kind != "f":
        raise reader.unsupported(f"its scale has dtype {scale.dtype}, not a float type")
    return scale.dtype.name


def _dql_out_dtype(reader: _Reader, scale: np.ndarray, output_dtype: str | None) -> str:
    """The served dtype of a DequantizeLinear: its ``output_dtype`` attribute (opset 23), else the scale's.

    onnxruntime computes the product in float32 and rounds it to ``output_dtype`` once (measured, onnxruntime
    1.32); the store casts the scale to the served dtype first. The two agree bit for bit when every scale is
    exact in ``output_dtype`` (an 8-bit integer times a float16 scale is then exact in float32); any other
    scale is refused.
    """
    out = _out_dtype(reader, scale)
    if not output_dtype or output_dtype == out:
        return out
    if output_dtype not in OUT_DTYPES:
        raise reader.unsupported(f"its DequantizeLinear output_dtype is {output_dtype} (supported: "
                                 f"{', '.join(OUT_DTYPES)})")
    with np.errstate(over="ignore", invalid="ignore"):
        exact = scale.astype(output_dtype).astype(scale.dtype)
    if exact.tobytes() != np.ascontiguousarray(scale).tobytes():
        raise reader.unsupported(
            f"its DequantizeLinear output_dtype is {output_dtype} while its {out} scale is not exact in "
            f"{output_dtype}: onnxruntime rounds each {out} product to {output_dtype}, the store would round the "
            "scale first, and the two differ"
        )
    return output_dtype


def _row_scale(reader: _Reader, info: dict[str, Any]) -> Quantization:
    scale = _widened(reader, _required(reader, info, "scale"), info.get("scale_casts") or ())
    if info.get("op") == "Mul":
        return Quantization("mul", scale, axis=0, out_dtype=_out_dtype(reader, scale))
    return Quantization("row_div", scale, out_dtype=_out_dtype(reader, scale))


def _widened(reader: _Reader, scale: np.ndarray, casts: Sequence[str]) -> np.ndarray:
    """The scale as the model divides by it: through the Casts after its Gather (``Cast(Gather(S_f16), FLOAT)``),
    each a widening that keeps every value (float16 or bfloat16 to float32 or float64, float32 to float64)."""
    for to in casts:
        if to == scale.dtype.name:
            continue
        if (scale.dtype.name, to) not in _WIDENINGS:
            raise reader.unsupported(f"its gathered scale is cast from {scale.dtype.name} to {to}, which does not "
                                     "keep every value (widening float casts are supported)")
        scale = scale.astype(np.dtype(to))
        if np.isnan(scale).any():
            raise reader.unsupported("its scale holds NaN and the model casts it: onnxruntime's cast need not keep "
                                     "a NaN's bits; replace the NaNs")
    return scale


def _group_affine(reader: _Reader, info: dict[str, Any]) -> Quantization:
    scale = _required(reader, info, "scale")
    zero = reader.array(info, "zero_point")
    g_idx = _required(reader, info, "g_idx").astype(np.int64).reshape(-1)
    size = _group_size(reader, g_idx)
    return Quantization("group_affine", scale, zero, group_size=size, out_dtype=_out_dtype(reader, scale))


def _group_size(reader: _Reader, g_idx: np.ndarray) -> int:
    """``B`` such that ``g_idx == arange(dim) // B``; anything else is refused."""
    size = int(np.count_nonzero(g_idx == 0))
    if g_idx.shape != (reader.dim,) or size == 0 or not np.array_equal(g_idx, np.arange(reader.dim) // size):
        raise reader.unsupported("its column groups are not consecutive blocks of one size")
    return size


def _dequantize_linear(reader: _Reader, info: dict[str, Any]) -> Quantization:
    scale = _required(reader, info, "scale")
    zero = reader.array(info, "zero_point")
    out = _dql_out_dtype(reader, scale, info.get("output_dtype"))
    axis = int(info.get("axis", 1))
    if axis not in (-2, -1, 0, 1):
        raise reader.unsupported(f"its axis is {axis}")
    axis %= 2
    if scale.size == 1:
        return Quantization("affine", scale.reshape(1), _flat(zero), out_dtype=out)
    if info.get("block_size"):
        if axis != 1 or scale.ndim != 2:
            raise reader.unsupported("it is blocked along the rows (axis 0); only blocks along axis 1 are supported")
        return Quantization("group_affine", scale, zero, group_size=int(info["block_size"]), out_dtype=out)
    return Quantization("affine", scale, zero, axis=axis, out_dtype=out)


def _mul_cast(reader: _Reader, info: dict[str, Any]) -> Quantization:
    scale = _required(reader, info, "scale")
    out = _out_dtype(reader, scale)
    if scale.size == 1 and scale.ndim <= 2:
        return Quantization("mul", scale.reshape(1), out_dtype=out)
    if scale.shape == (reader.rows, 1):
        return Quantization("mul", scale.reshape(-1), axis=0, out_dtype=out)
    if scale.shape in ((reader.dim,), (1, reader.dim)):
        return Quantization("mul", scale.reshape(-1), axis=1, out_dtype=out)
    raise reader.unsupported(f"its scale has shape {list(scale.shape)} (per-tensor, [rows, 1] or [dim] are supported)")


def _cast_parameter(reader: _Reader, info: dict[str, Any]) -> Quantization:
    raise reader.unsupported(f"its {info.get('op')} reads the parameter {info.get('parameter')!r} through a Cast to "
                             "another type, which the store cannot reproduce")


def _flat(zero: np.ndarray | None) -> np.ndarray | None:
    return None if zero is None else zero.reshape(1)


def _required(reader: _Reader, info: dict[str, Any], key: str) -> np.ndarray:
    value = reader.array(info, key)
    if value is None:
        raise reader.unsupported(f"it names no {key}")
    return value


_INTEGERS = frozenset({"int8", "uint8", "int16", "uint16"})  # scan's dtype names ("int4" is ONNX's, not numpy's)
#: casts of a gathered scale that keep every value: (from, to) dtype names
_WIDENINGS = frozenset({("float16", "float32"), ("float16", "float64"), ("bfloat16", "float32"),
                        ("bfloat16", "float64"), ("float32", "float64")})
#: scan schemes applied in front of the Gather, and the link op that applies them
_LINK_OPS = {"dequantize_linear": "DequantizeLinear", "mul_cast": "Mul"}

_SCHEMES: dict[str, Callable[[_Reader, dict[str, Any]], Quantization]] = {
    "row_scale": _row_scale,
    "group_affine": _group_affine,
    "dequantize_linear": _dequantize_linear,
    "mul_cast": _mul_cast,
    "cast_parameter": _cast_parameter,
}

__all__ = ["quantization_from_ref"]
