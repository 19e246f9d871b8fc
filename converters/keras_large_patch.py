"""The large-table path's ONNX side: find each skeleton pattern in the converted graph, patch its row count.

tf2onnx converts the skeleton (:mod:`converters.keras_skeleton`); :func:`locate_tables` finds each
pattern **by value** and refuses one used other than through Gathers or copied into another
constant. tf2onnx bakes the skeleton's row count ``k`` into the negative-id wrap in front of each
Gather (``id < 0 ? id + k : id``): :func:`patch_gathers` re-points the inputs holding ``k`` on the
Gather's index path at a new constant holding the real row count.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bridge.errors import ConversionError, UnsupportedError
from bridge.external import iter_tensors
from bridge.extract import read_tables
from bridge.onnx_io import initializer_array, iter_graphs, node_label
from bridge.scan import TableRef
from converters.keras_map import Candidate, compute_cast, same_bytes
from converters.keras_skeleton import ShrunkTable

#: Ops of the negative-id wrap that may hold the row count, and ops walked through on the index path.
_WRAP_OPS = frozenset({"Add", "Sub", "Where", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal",
                       "Min", "Max", "Clip", "Mod"})
_WALK_OPS = _WRAP_OPS | {"Mul", "Cast", "Not", "And", "Or", "Identity", "Neg", "Abs", "Reshape", "Squeeze",
                         "Unsqueeze", "Expand"}
_MAX_WALK = 64

__all__ = ["locate_tables", "patch_gathers", "patch_row_count"]


# ----------------------------------------------------------------------------- locating the patterns


def locate_tables(model: onnx.ModelProto, plan: list[ShrunkTable]) -> dict[int, tuple[TableRef, ShrunkTable]]:
    """``{position in read_tables order: (ref, entry)}`` for each pattern found in the skeleton's ONNX model.

    A mixed-precision layer may read its whole table cast to its compute dtype (a model loaded from a
    file), and tf2onnx folds that cast into the constant: the pattern is then found cast the same way,
    and the returned entry holds that dtype and pattern (the store keeps the real table cast to it).
    Refuses a pattern that tf2onnx used other than through Gathers, or whose rows appear in any
    other constant (e.g. a lookup with constant ids folded by tf2onnx).
    """
    found: dict[int, tuple[TableRef, ShrunkTable]] = {}
    refs = read_tables(model, None)
    for entry in plan:
        hits = [i for i, (_, data) in enumerate(refs) if same_bytes(np.asarray(data), entry.pattern)]
        folded = _folded_cast(entry)
        if not hits and folded is not None:
            entry = folded
            hits = [i for i, (_, data) in enumerate(refs) if same_bytes(np.asarray(data), entry.pattern)]
        if len(hits) > 1:
            raise ConversionError(f"tf2onnx wrote the table of {entry.paths[0]!r} {len(hits)} times; "
                                  "convert with large=False")
        if not hits:
            continue
        ref = refs[hits[0]][0]
        uses = [f"{u.op_type} {u.node!r}" for u in ref.tied + ref.other]
        if uses:
            raise UnsupportedError(
                f"the table of Embedding {entry.paths[0]!r} is used other than by a row lookup ({', '.join(uses)}); "
                "the large-table path replaces it by a small stand-in, which would change such uses; "
                "convert with large=False if it fits in memory"
            )
        _check_no_copies(model, ref, entry)
        found[hits[0]] = (ref, entry)
    return found


def _folded_cast(entry: ShrunkTable) -> ShrunkTable | None:
    """``entry`` with its pattern cast to its layers' compute dtype (as tf2onnx folds it), or None if no cast."""
    layer = entry.layers[0]
    cand = Candidate(entry.paths[0], "embeddings", (entry.skeleton_rows, entry.dim), lambda: entry.pattern, obj=layer)
    cast = compute_cast(cand, entry.pattern)
    if cast is None:
        return None
    return replace(entry, dtype=cast.dtype, pattern=cast)


def _check_no_copies(model: onnx.ModelProto, ref: TableRef, entry: ShrunkTable) -> None:
    first = set(entry.pattern[:, 0].tolist())
    rows = {row.tobytes() for row in entry.pattern}
    for graph, tensor in iter_tensors(model):
        if (graph, tensor.name) == (ref.graph, ref.initializer) or tensor.data_type != _elem(entry.dtype):
            continue
        arr = np.asarray(initializer_array(tensor, None))
        for view in (arr, arr.T) if arr.ndim == 2 else (arr,):
            if view.ndim == 0 or view.shape[-1] != entry.dim:
                continue
            flat = np.ascontiguousarray(view).reshape(-1, entry.dim)
            hit = np.isin(flat[:, 0], list(first))
            if any(row.tobytes() in rows for row in flat[hit]):
                raise UnsupportedError(
                    f"tf2onnx copied rows of Embedding {entry.paths[0]!r}'s table into constant {tensor.name!r} "
                    "(a lookup with constant ids, or a transposed use); the large-table path cannot replace "
                    "those rows; convert with large=False if it fits in memory"
                )


def _elem(dtype: np.dtype[Any]) -> int:
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


# ----------------------------------------------------------------------------- patching the row count


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """One-element numeric constants of ``graph``: initializers and ``Constant`` outputs."""
    out = {t.name: t for t in graph.initializer if math.prod(t.dims) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None and math.prod(value.dims) == 1:
                out[node.output[0]] = value
    return {name: t for name, t in out.items() if t.data_type not in (TensorProto.STRING, TensorProto.BOOL)}


def _index_path(graph: onnx.GraphProto, gather: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes computing the Gather's indices, walked back through element-wise ops (at most _MAX_WALK)."""
    producers = {out: node for node in graph.node for out in node.output}
    consts = _scalar_constants(graph)
    seen: dict[int, onnx.NodeProto] = {}
    stack = [gather.input[1]]
    while stack and len(seen) < _MAX_WALK:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen or node.op_type not in _WALK_OPS:
            continue
        seen[id(node)] = node
        stack.extend(name for name in node.input if name and name not in consts)
    return list(seen.values())


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def patch_row_count(graph: onnx.GraphProto, gather: onnx.NodeProto, skeleton_rows: int, rows: int) -> int:
    """Re-point wrap inputs holding ``skeleton_rows`` on ``gather``'s index path at a constant ``rows``.

    The constant itself is left alone (tf2onnx merges equal constants; others may read it).
    Returns how many inputs were re-pointed. Raises :class:`ConversionError` when a value derived
    from ``skeleton_rows`` (``k - 1``, ``-k``) or ``k`` feeding any other op remains on the path.
    """
    consts = _scalar_constants(graph)
    replaced: list[str] = []
    path = _index_path(graph, gather)
    for node in path:
        for i, name in enumerate(node.input):
            tensor = consts.get(name)
            if tensor is None or node.op_type not in _WRAP_OPS:
                continue
            value = numpy_helper.to_array(tensor)
            if value.reshape(-1)[0] != skeleton_rows:
                continue
            new = numpy_helper.from_array(_exact(value, rows, tensor.name), _fresh_name(graph, f"{name}__rows"))
            graph.initializer.append(new)
            node.input[i] = new.name
            replaced.append(name)
    _check_no_leftover(path, _scalar_constants(graph), skeleton_rows, gather)
    _drop_unread(graph, set(replaced))
    return len(replaced)


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers ``names`` that no node (subgraphs included) or output reads any more."""
    read = {name for _, g in iter_graphs(graph) for node in g.node for name in node.input}
    read.update(o.name for o in graph.output)
    keep = [t for t in graph.initializer if t.name not in names or t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _exact(like: np.ndarray, rows: int, name: str) -> np.ndarray:
    value = np.full(like.shape, rows, dtype=like.dtype)
    if value.reshape(-1)[0] != rows:
        raise ConversionError(f"constant {name!r} ({like.dtype}) cannot hold the row count {rows}")
    return value


def _check_no_leftover(path: list[onnx.NodeProto], consts: dict[str, TensorProto], k: int,
                       gather: onnx.NodeProto) -> None:
    for node in path:
        for name in node.input:
            if name in consts and numpy_helper.to_array(consts[name]).reshape(-1)[0] in (k, k - 1, -k):
                raise ConversionError(
                    f"the index path of Gather {gather.name!r} holds constant {name!r} (read by {node.op_type}) "
                    f"derived from the skeleton's row count {k}; the large-table path cannot tell which real "
                    "value it stands for; convert with large=False or another skeleton_rows"
                )


def patch_gathers(model: onnx.ModelProto, ref: TableRef, entry: ShrunkTable) -> int:
    """:func:`patch_row_count` on every Gather reading ``ref``; returns the inputs re-pointed."""
    graphs = dict(iter_graphs(model))
    patched = 0
    for use in ref.gathers:
        graph = graphs[use.graph]
        gather = next(n for i, n in enumerate(graph.node) if node_label(n, i) == use.node)
        patched += patch_row_count(graph, gather, entry.skeleton_rows, entry.rows)
    return patched
