"""Casts between a table and its lookups: which ones, and the values they make, as onnxruntime makes them.

A table read through ``Cast`` nodes (``Gather(Cast(W, to=FLOAT16), ids)``) is stored as the Gather reads
it: the chain's casts are applied to the initializer's values and recorded in the table's metadata
(``metadata["onnx"]["cast"] = {"from": "float32", "to": "float16", "chain": ["float16"]}``). Casts are
computed as onnxruntime computes them (measured on onnxruntime 1.32, x86-64; the ONNX specification
leaves NaN payloads and the rounding of two-step conversions open):

==========================================  ==================================================================
cast                                        computed as
==========================================  ==================================================================
among float16, float32, float64, bfloat16   one conversion, rounding to nearest even (a table holding NaN is
                                            refused: onnxruntime's NaN bits depend on the NaN's position)
float64 -> float16, float64 -> bfloat16     through float32 (rounded twice)
integer -> integer, integer -> float        only where every value of the integer type is exact in the target
==========================================  ==================================================================

Anything else (float -> integer, narrowing integer casts, float8, bool, strings) raises
:class:`~bridge.errors.UnsupportedError` naming the table and the cast, as do readers that see one table
through different casts. A quantized table keeps its integers; every cast in front of its dequantization
must keep each integer exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from bridge.errors import UnsupportedError
from bridge.onnx_io import node_label, subgraphs, tensor_dtype
from bridge.scan import TableRef, Use
from bridge.scan_patterns import attr_int

_FLOATS = frozenset({"float16", "float32", "float64", "bfloat16"})
#: casts onnxruntime computes through float32, rounding twice
_THROUGH_FLOAT32 = frozenset({("float64", "float16"), ("float64", "bfloat16")})


def served_data(model: onnx.ModelProto, ref: TableRef, data: np.ndarray, graphs: ModelGraphs | None = None
                ) -> tuple[np.ndarray, dict[str, Any] | None]:
    """What the model's lookups read from the initializer ``data`` of ``ref``, and the cast record (None if none).

    A quantized table's integers are returned as they are (its casts are checked by :func:`table_casts`).
    ``graphs`` (of ``model``) is built when needed and not given.
    """
    steps = table_casts(model, ref, data.dtype, graphs)
    if not steps or ref.quantization:
        return data, None
    if data.dtype.kind in "fV" and np.isnan(data).any():
        raise UnsupportedError(
            f"table {ref.initializer!r} holds NaN values and the model casts it ({_chain_text(data.dtype, steps)}): "
            "onnxruntime gives a cast NaN bits that depend on where it sits in the tensor (its vectorized loop "
            "quiets NaNs, its scalar tail does not, or drops the payload), so no stored table can match the model "
            "bit for bit; replace the NaNs, or remove the Cast"
        )
    served = data
    for to in steps:
        served = _convert(served, to)
    return served, {"from": data.dtype.name, "to": served.dtype.name, "chain": [to.name for to in steps]}


def table_casts(model: onnx.ModelProto, ref: TableRef, dtype: np.dtype[Any], graphs: ModelGraphs | None = None
                ) -> tuple[np.dtype[Any], ...]:
    """The dtypes the ``Cast`` nodes between table ``ref`` (of ``dtype``) and its Gathers/Slices convert it to.

    Casts to the dtype the values already have are left out. Raises :class:`UnsupportedError` when the
    readers see the table through different casts, or a cast cannot be reproduced bit for bit.
    """
    if not has_cast(ref):
        return ()
    graphs = graphs or ModelGraphs(model)
    chains: dict[tuple[np.dtype[Any], ...], list[str]] = {}
    for use in ref.gathers + ref.slices:
        steps = _steps(ref, dtype, graphs.casts(ref, use))
        chains.setdefault(steps, []).append(use.node)
    if len(chains) > 1:
        seen = "; ".join(f"{', '.join(map(repr, uses))} through {_chain_text(dtype, c)}" for c, uses in chains.items())
        raise UnsupportedError(f"table {ref.initializer!r} is read through different casts ({seen}); "
                               "one stored table cannot serve them all")
    return next(iter(chains))


def has_cast(ref: TableRef) -> bool:
    """Whether a ``Cast`` sits between table ``ref`` and one of its Gathers or Slices."""
    return any("Cast" in use.via for use in ref.gathers + ref.slices)


def _chain_text(dtype: np.dtype[Any], steps: Sequence[np.dtype[Any]]) -> str:
    return " -> ".join(d.name for d in (dtype, *steps)) if steps else "no cast"


def _steps(ref: TableRef, dtype: np.dtype[Any], casts: Sequence[tuple[str, int]]) -> tuple[np.dtype[Any], ...]:
    """The real conversions among ``casts`` (``(node, ONNX type)``), each checked."""
    steps: list[np.dtype[Any]] = []
    for node, onnx_type in casts:
        current = steps[-1] if steps else np.dtype(dtype)
        to = _target(ref, node, current, onnx_type)
        problem = _quantized_cast_problem(np.dtype(dtype), to) if ref.quantization else _cast_problem(current, to)
        if problem:
            raise UnsupportedError(f"table {ref.initializer!r} is read through Cast {node!r} ({current.name} -> "
                                   f"{to.name}): {problem}")
        if to != current:
            steps.append(to)
    return tuple(steps)


def _target(ref: TableRef, node: str, current: np.dtype[Any], onnx_type: int) -> np.dtype[Any]:
    try:
        return tensor_dtype(onnx_type)
    except UnsupportedError:
        name = onnx.TensorProto.DataType.Name(onnx_type) if onnx_type in onnx.TensorProto.DataType.values() else \
            str(onnx_type)
        raise UnsupportedError(f"table {ref.initializer!r} is read through Cast {node!r} ({current.name} -> "
                               f"{name}), which embedding-bridge cannot reproduce") from None


def _precision(dtype: np.dtype[Any]) -> int:
    """Significant bits of a float type (an integer of at most this many bits is exact in it)."""
    return int(ml_dtypes.finfo(dtype).nmant) + 1


def _holds(integer: np.dtype[Any], to: np.dtype[Any]) -> bool:
    """Whether every value of the integer type ``integer`` is exact in ``to``."""
    if to.kind in "iu":
        return bool(np.can_cast(integer, to, "safe"))
    return to.name in _FLOATS and integer.itemsize * 8 - (integer.kind == "i") <= _precision(to)


def _cast_problem(src: np.dtype[Any], to: np.dtype[Any]) -> str | None:
    """Why casting values of ``src`` to ``to`` cannot be reproduced bit for bit; None when it can."""
    if src == to or (src.name in _FLOATS and to.name in _FLOATS):
        return None
    if src.kind in "iu" and _holds(src, to):
        return None
    if src.kind in "iu" and (to.kind in "iu" or to.name in _FLOATS):
        return f"not every {src.name} value is exact in {to.name}, so the cast rounds or wraps"
    return ("only conversions among float16, float32, float64 and bfloat16, and exact integer conversions, "
            "are reproduced bit for bit")


def _quantized_cast_problem(integers: np.dtype[Any], to: np.dtype[Any]) -> str | None:
    """Why a cast in front of a quantized table's dequantization does not keep its ``integers`` exact."""
    if integers.kind in "iu" and _holds(integers, to):
        return None
    return f"the table is quantized, and not every {integers.name} value is exact in {to.name}"


def _convert(data: np.ndarray, to: np.dtype[Any]) -> np.ndarray:
    """``data`` (no NaN: :func:`served_data` refuses those) cast to ``to`` as onnxruntime's Cast computes it."""
    with np.errstate(over="ignore", invalid="ignore"):
        if (data.dtype.name, to.name) in _THROUGH_FLOAT32:
            return data.astype(np.float32).astype(to)
        return data.astype(to)


class ModelGraphs:
    """Every graph of a model with its nodes by label, the node making each value, and each subgraph's parent."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes: dict[str, dict[str, onnx.NodeProto]] = {}
        self.made_by: dict[str, dict[str, onnx.NodeProto]] = {}
        self.local: dict[str, set[str]] = {}
        self.parent: dict[str, str] = {}
        self._add("", model.graph)

    def _add(self, path: str, graph: onnx.GraphProto) -> None:
        self.nodes[path] = {node_label(node, i): node for i, node in enumerate(graph.node)}
        self.made_by[path] = {out: node for node in graph.node for out in node.output if out}
        self.local[path] = {*self.made_by[path], *(t.name for t in graph.initializer), *(v.name for v in graph.input)}
        for position, node in enumerate(graph.node):
            for sub_path, sub in subgraphs(path, position, node):
                self.parent[sub_path] = path
                self._add(sub_path, sub)

    def casts(self, ref: TableRef, use: Use) -> list[tuple[str, int]]:
        """``(node name, ONNX type)`` of each Cast between the table and the reader ``use``, table first."""
        reader = self.nodes.get(use.graph, {}).get(use.node)
        links = self._back(ref, use.graph, reader.input[0], use.via) if reader is not None and reader.input else None
        if links is None:
            raise UnsupportedError(f"table {ref.initializer!r}: the links to {use.node!r} ({' -> '.join(use.via)}) "
                                   "cannot be followed in this model; scan this model again")
        return [(n.name or n.op_type, attr_int(n, "to", 0)) for n in links if n.op_type == "Cast"]

    def _back(self, ref: TableRef, path: str, name: str, ops: Sequence[str]) -> list[onnx.NodeProto] | None:
        """The link nodes of types ``ops`` from the table to the value ``name`` of graph ``path``; None if none."""
        while name not in self.local[path] and path in self.parent:
            path = self.parent[path]
        if not ops:
            return [] if (path, name) == (ref.graph, ref.initializer) else None
        node = self.made_by[path].get(name)
        if node is None or node.op_type != ops[-1]:
            return None
        for value in node.input if node.op_type == "Mul" else node.input[:1]:
            found = self._back(ref, path, value, ops[:-1])
            if found is not None:
                return [*found, node]
        return None
