"""Find tied output projections by value: ``logits = h @ W.T`` reusing an embedding table ``W``.

Exporters store a tied projection in one of three ways (measured, see DESIGN.md):

* ``"transposed"``: a separate constant of shape ``[D, V]`` equal to ``W.T`` feeding ``MatMul``
  (tf2onnx folds the transpose; the torch legacy exporter writes ``onnx::MatMul_N``; the torch
  dynamo exporter writes ``val_N``);
* ``"copy"``: a separate constant of shape ``[V, D]`` equal to ``W``, read by ``Gemm(transB=1)``
  or through ``Transpose`` into ``MatMul``;
* ``"shared"``: the table's own constant read by the projection (``Gemm(transB=1)`` from the
  torch exporters on 2-D activations, ``Transpose -> MatMul``).

Between the constant and the projection the walk follows ``Identity``, ``Transpose`` (swapping the
two axes) and ``Cast`` (a mixed-precision head computing in another dtype reads the same table).

Only constants whose shape and dtype fit a table are read; a few sampled rows are compared first
and the whole constant only when they agree, chunk by chunk, bit for bit (``-0.0`` and NaN
payloads included). External data is memory-mapped, so rejecting a candidate reads a few rows; an
inline candidate of a fitting shape is handed out by protobuf as one bytes object (the model is
already in memory), then compared the same way.

A table is known by :attr:`~bridge.scan.TableRef.key`, ``(graph path, initializer)``: two subgraphs
(the branches of an ``If``) may each define their own ``W``, and each gets its own ties.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.errors import UnsupportedError
from bridge.onnx_io import initializer_array, node_label, subgraphs, tensor_dtype
from bridge.scan import PASS_THROUGH, TableKey, TableRef, Use, table_tensor

_Key = tuple[str, str]  # (graph path where the constant is defined, name)
_PROJECTIONS = frozenset({"MatMul", "Gemm"})
_DOMAINS = frozenset({"", "ai.onnx"})
_MAX_CHAIN = 16
_CHUNK_BYTES = 16 << 20

#: layouts: the projection's constant equals the table ("copy"/"shared") or its transpose ("transposed")
LAYOUTS = ("shared", "transposed", "copy")


@dataclass(frozen=True)
class Tie:
    """A projection tied to table ``table``: the constant ``initializer`` (defined in graph ``graph``)
    holds the table's values in ``layout``, and ``consumers`` are the MatMul/Gemm nodes reading it
    (``via`` lists the Identity/Transpose/Cast nodes in between, from the constant on)."""

    table: str
    initializer: str
    graph: str
    layout: str
    consumers: tuple[Use, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict, for a store manifest's table metadata."""
        return {"initializer": self.initializer, "graph": self.graph, "layout": self.layout,
                "consumers": [use.to_json("tied") for use in self.consumers]}


@dataclass(frozen=True)
class _Operand:
    """A constant read by a projection; ``transposed``: tied iff the constant equals ``W.T``."""

    key: _Key
    tensor: onnx.TensorProto
    transposed: bool
    use: Use


def find_ties(
    model: onnx.ModelProto,
    refs: Sequence[TableRef],
    base_dir: Path | None = None,
    *,
    arrays: Mapping[TableKey, np.ndarray] | None = None,
    samples: int = 8,
) -> dict[TableKey, tuple[Tie, ...]]:
    """``{ref.key: ties}`` for every ref in ``refs`` (an empty tuple where none is tied).

    ``arrays`` may hold the tables' data already read (keyed by :attr:`TableRef.key`) so they are not
    read again; ``base_dir`` is the model's directory, for external data. ``samples`` rows are
    compared before a full comparison.
    """
    operands = list(_projection_operands(model))
    result: dict[TableKey, tuple[Tie, ...]] = {}
    for ref in refs:
        fits = [op for op in operands if _fits(ref, op)]
        if not fits:
            result[ref.key] = ()
            continue
        table = (arrays or {}).get(ref.key)
        if table is None:
            table = initializer_array(table_tensor(model, ref), base_dir)
        result[ref.key] = _ties_for(ref, table, fits, base_dir, samples)
    return result


def ties_json(ties: Sequence[Tie]) -> list[dict[str, Any]]:
    """The manifest form of a table's ties."""
    return [tie.to_json() for tie in ties]


# ----------------------------------------------------------------------------- graph walk


def _projection_operands(model: onnx.ModelProto) -> Iterator[_Operand]:
    """Every constant operand of a MatMul/Gemm, in every graph, with the orientation a tie needs."""
    yield from _walk("", model.graph, ())


@dataclass(frozen=True)
class _Frame:
    """One graph's names: constants, producing nodes, and (for a subgraph) its inputs, which shadow
    outer names."""

    path: str
    consts: dict[str, onnx.TensorProto]
    producers: dict[str, onnx.NodeProto]
    inputs: frozenset[str]


def _walk(path: str, graph: onnx.GraphProto, outer: tuple[_Frame, ...]) -> Iterator[_Operand]:
    frame = _Frame(path, {t.name: t for t in graph.initializer}, {},
                   frozenset(v.name for v in graph.input) if outer else frozenset())
    for node in graph.node:
        value = _constant_value(node)
        if value is not None:
            frame.consts[node.output[0]] = value
        for out in node.output:
            frame.producers.setdefault(out, node)
    scope = (*outer, frame)
    for position, node in enumerate(graph.node):
        if node.op_type in _PROJECTIONS and node.domain in _DOMAINS:
            for input_index in (0, 1):
                operand = _operand(scope, node, position, input_index)
                if operand is not None:
                    yield operand
        for sub_path, sub in subgraphs(path, position, node):
            yield from _walk(sub_path, sub, scope)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in _DOMAINS or not node.output:
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def _wants_transposed(node: onnx.NodeProto, input_index: int) -> bool:
    """Whether operand ``input_index`` of a projection is ``[D, V]`` (``W.T``) when the projection is tied.

    ``h @ B``: B is ``[D, V]``; ``A @ h``: A is ``[V, D]``; Gemm's transA/transB flip these.
    """
    wants = input_index == 1
    if node.op_type == "Gemm":
        flag = "transA" if input_index == 0 else "transB"
        if next((a.i for a in node.attribute if a.name == flag), 0):
            wants = not wants
    return wants


def _operand(scope: tuple[_Frame, ...], node: onnx.NodeProto, position: int, input_index: int
             ) -> _Operand | None:
    """Follow input ``input_index`` of ``node`` back through Identity/Transpose/Cast to a rank-2 constant."""
    if len(node.input) <= input_index or not node.input[input_index]:
        return None
    name, transposed = node.input[input_index], _wants_transposed(node, input_index)
    via: list[str] = []  # op types passed on the way
    for _ in range(_MAX_CHAIN):
        found = _lookup(scope, name)
        if found is None:
            return None
        path, item = found
        if isinstance(item, onnx.TensorProto):
            if len(item.dims) != 2:
                return None
            use = Use(node=node_label(node, position), op_type=node.op_type, graph=scope[-1].path,
                      input_index=input_index, via=tuple(reversed(via)))
            return _Operand((path, name), item, transposed, use)
        if item.op_type == "Transpose" and _is_swap(item):
            transposed = not transposed
        elif item.op_type not in PASS_THROUGH or item.domain not in _DOMAINS:
            return None
        via.append(item.op_type)
        name = item.input[0] if item.input else ""
    return None


def _lookup(scope: tuple[_Frame, ...], name: str) -> tuple[str, onnx.TensorProto | onnx.NodeProto] | None:
    """The constant or producer node of ``name``, innermost graph first (None for a graph input)."""
    for frame in reversed(scope):
        if name in frame.consts:
            return frame.path, frame.consts[name]
        if name in frame.producers:
            return frame.path, frame.producers[name]
        if name in frame.inputs:
            return None
    return None


def _is_swap(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm in (None, [1, 0])


# ----------------------------------------------------------------------------- value checks


def _fits(ref: TableRef, op: _Operand) -> bool:
    """Shape and dtype filter: nothing is read for an operand that cannot hold the table."""
    if len(ref.shape) != 2:
        return False
    rows, dim = ref.shape
    want = (dim, rows) if op.transposed else (rows, dim)
    if tuple(int(d) for d in op.tensor.dims) != want:
        return False
    if op.key == (ref.graph, ref.initializer):
        return True
    try:
        return tensor_dtype(op.tensor).name == ref.dtype
    except UnsupportedError:  # an element type numpy cannot hold cannot equal a table it holds
        return False


def _ties_for(ref: TableRef, table: np.ndarray, operands: list[_Operand], base_dir: Path | None,
              samples: int) -> tuple[Tie, ...]:
    groups: dict[tuple[_Key, bool], list[_Operand]] = {}
    for op in operands:
        groups.setdefault((op.key, op.transposed), []).append(op)
    ties = []
    for (key, transposed), ops in groups.items():
        shared = key == (ref.graph, ref.initializer)
        if shared and not transposed:
            equal = True
        else:
            other = table if shared else initializer_array(ops[0].tensor, base_dir)
            equal = _rows_equal(table, other, transposed, _sample_rows(table.shape[0], samples)) and \
                _all_equal(table, other, transposed)
        if equal:
            layout = "shared" if shared else ("transposed" if transposed else "copy")
            ties.append(Tie(table=ref.initializer, initializer=key[1], graph=key[0], layout=layout,
                            consumers=tuple(op.use for op in ops)))
    return tuple(ties)


def _sample_rows(rows: int, samples: int) -> np.ndarray:
    """First, last and evenly spaced rows between them."""
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, rows - 1, num=max(2, samples)).round().astype(np.int64))


def _bits(arr: np.ndarray) -> np.ndarray:
    """The array's bytes (bitwise comparison: equal NaN payloads match, -0.0 and 0.0 differ)."""
    return np.ascontiguousarray(arr).view(np.uint8)


def _block(other: np.ndarray, rows: np.ndarray | slice, transposed: bool) -> np.ndarray:
    return other[:, rows].T if transposed else other[rows]


def _rows_equal(table: np.ndarray, other: np.ndarray, transposed: bool, rows: np.ndarray) -> bool:
    return bool(np.array_equal(_bits(table[rows]), _bits(_block(other, rows, transposed))))


def _all_equal(table: np.ndarray, other: np.ndarray, transposed: bool) -> bool:
    rows, dim = table.shape
    step = max(1, _CHUNK_BYTES // max(1, dim * table.dtype.itemsize))
    for start in range(0, rows, step):
        chunk = slice(start, min(rows, start + step))
        if not np.array_equal(_bits(table[chunk]), _bits(_block(other, chunk, transposed))):
            return False
    return True


__all__ = ["LAYOUTS", "Tie", "find_ties", "ties_json"]
