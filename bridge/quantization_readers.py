"""One table, many readers: each must see the same dequantization (:mod:`bridge.quantization_onnx` builds it).

The scan records, per Gather and Slice of a table, the dequantization it reads the table through
(``TableRef.dequantizations``; ``"also"`` lists further dequantizations of one Gather's rows, as when tf2onnx
merges the equal integer tables of two layers and their lookups). One stored table serves one dequantization,
so a table is refused when its readers dequantize it by different schemes or with different parameter values
(the same values under other names are one dequantization), when it is read both dequantized and raw, and when
its rows are dequantized in a way the scan does not recognise (``"unrecognized"``; bfloat16 named as such).
Every refusal is one line naming the table and the nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bridge.errors import UnsupportedError
from bridge.quantization import OUT_DTYPES, Quantization
from bridge.scan import TableRef

Readers = list[tuple[dict[str, Any] | None, list[str]]]  # (dequantization or None for raw, reading nodes)


def readers(ref: TableRef) -> Readers:
    """Each distinct dequantization of ``ref`` (None: raw) with the nodes reading the table through it (a Gather
    whose rows are dequantized several ways, ``"also"``, reads it through each)."""
    uses = [use.node for use in ref.gathers + ref.slices]
    infos = ref.dequantizations if len(ref.dequantizations) == len(uses) else (ref.quantization,) * len(uses)
    found: Readers = []
    for info, node in zip(infos, uses, strict=True):
        for each in [info] if not info else [{k: v for k, v in info.items() if k != "also"}, *info.get("also", ())]:
            entry = next((e for e in found if e[0] == each), None)
            if entry is None:
                found.append((each, [node]))
            else:
                entry[1].append(node)
    return found


def check_readers(ref: TableRef, found: Readers) -> None:
    """UnsupportedError for rows dequantized in a way the scan did not recognise, a table read both
    dequantized and raw, or dequantized by different schemes."""
    for info, uses in found:
        if info and info.get("scheme") == "unrecognized":
            raise _unrecognized(ref, info, uses[0])
    cooked = [(info, uses) for info, uses in found if info]
    raw = next((uses for info, uses in found if not info), None)
    if raw is not None and cooked:
        raise UnsupportedError(
            f"table {ref.initializer!r} is read both dequantized ({_scheme_text(cooked[0][0])}, by "
            f"{cooked[0][1][0]!r}) and as raw integers (by {raw[0]!r}); one stored table cannot serve both: "
            "give the raw reader its own copy of the table"
        )
    for info, uses in cooked[1:]:
        if _scheme_text(info) != _scheme_text(cooked[0][0]):
            raise _two_ways(ref, (_scheme_text(cooked[0][0]), cooked[0][1]), (_scheme_text(info), uses))


def _scheme_text(info: dict[str, Any]) -> str:
    op = info.get("op")
    return f"{info.get('scheme')} ({op})" if info.get("scheme") == "row_scale" and op else str(info.get("scheme"))


def _two_ways(ref: TableRef, first: tuple[str, list[str]], other: tuple[str, list[str]]) -> UnsupportedError:
    return UnsupportedError(
        f"table {ref.initializer!r} is dequantized two ways: as {first[0]} (by node {first[1][0]!r}) and as "
        f"{other[0]} (by node {other[1][0]!r}); one stored table serves one dequantization: keep a separate integer "
        "table for each (tf2onnx merges equal constants, e.g. the int8 tables of two layers whose codes coincide)"
    )


def _unrecognized(ref: TableRef, info: dict[str, Any], use: str) -> UnsupportedError:
    where = f"{ref.dtype} table {ref.initializer!r} is dequantized after Gather {use!r} by {info.get('op')} " \
            f"{info.get('node')!r}"
    if "bfloat16" in info.get("casts", ()):
        return UnsupportedError(
            f"{where} in bfloat16 (its rows are cast to bfloat16), and quantized tables are served as "
            f"{', '.join(OUT_DTYPES)} only; quantize the layer under a float16 or float32 compute dtype"
        )
    return UnsupportedError(
        f"{where} in a way embedding-bridge does not recognise; storing the integers as the table would serve "
        "wrong vectors (supported: DequantizeLinear or Mul(Cast(q), scale) before the Gather, Keras int8/int4 "
        "after it; see bridge.quantization_onnx)"
    )


def check_same_values(ref: TableRef, quants: list[tuple[Quantization, list[str]]]) -> None:
    """UnsupportedError when the dequantizations of one table differ in value (not only in names)."""
    first, first_uses = quants[0]
    for quant, uses in quants[1:]:
        if not same_quantization(first, quant):
            raise _two_ways(ref, (_describe(first), first_uses), (_describe(quant), uses))


def same_quantization(a: Quantization, b: Quantization) -> bool:
    """Whether ``a`` and ``b`` compute the same vectors: same scheme, layout, dtypes and parameter bytes."""
    return a.metadata() == b.metadata() and _same_array(a.scale, b.scale) and _same_array(a.zero_point, b.zero_point)


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == \
        np.ascontiguousarray(b).tobytes()


def _describe(quant: Quantization) -> str:
    """``"affine with float32 scale [0.5]"``: the scheme and the first parameter values."""
    zero = "" if quant.zero_point is None else f", zero point {_first(quant.zero_point)}"
    return f"{quant.scheme} with {quant.scale.dtype} scale {_first(quant.scale)}{zero}"


def _first(values: np.ndarray, count: int = 2) -> str:
    flat = np.asarray(values).reshape(-1)
    more = ", ..." if flat.size > count else ""
    return "[" + ", ".join(f"{v:.6g}" for v in flat[:count].tolist()) + more + "]"


__all__ = ["Readers", "check_readers", "check_same_values", "readers", "same_quantization"]
