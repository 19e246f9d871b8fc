"""Run a model's own Gather for one table in onnxruntime: the "converted ONNX model" reference.

The sub-model keeps the table's initializer, the link chain in front of the Gather
(Identity, Cast, DequantizeLinear, Mul by a scale, ...) and the Gather node itself, with the
Gather's indices fed from a new ``ids`` input. So parity compares adapters against what the
converted model itself computes, not against a re-implementation of it.

Where the model dequantizes the rows *after* the Gather (Keras int8 / int4:
``Cast(Gather(q, ids)) / Unsqueeze(Gather(scale, ids))``, or ``(... - zero) * scale`` per group),
the sub-model also keeps those nodes, the scale / zero point Gathers reading the same ids and their
constants, and its output is the dequantized vector. Such a sub-model takes ids of the rank the model's
own ids input has (its ``Unsqueeze`` axes may depend on it); the callable reshapes other ids to it.

A table the model only reads with ``Slice`` (``W[:n]``, a position table read by sequence length) has
no Gather to cut out: :func:`slice_submodel` keeps its link chain and its own Slice with every end
opened, so onnxruntime returns all rows exactly as the model reads them, and the reference indexes
those rows with the ids (:func:`onnx_slice_reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from bridge.errors import BridgeError, IdError, ParityError, UnsupportedError
from bridge.onnx_io import initializer_array, iter_graphs, node_label
from bridge.scan import TableRef, Use

IR_VERSION = 10
#: doc_string marking a sub-model whose bfloat16 output is widened to float32 (exact) for onnxruntime
BF16_WIDENED = "bfloat16 output widened to float32"


def _find_gather(graph: onnx.GraphProto, ref: TableRef) -> onnx.NodeProto:
    return _find_reader(graph, ref, ref.gathers, "Gather")


def _find_reader(graph: onnx.GraphProto, ref: TableRef, uses: tuple[Use, ...], op_type: str) -> onnx.NodeProto:
    """The first of ``uses`` (nodes of type ``op_type``) that sits in the table's own graph."""
    labels = {use.node for use in uses if use.graph == ref.graph}
    for i, node in enumerate(graph.node):
        if node_label(node, i) in labels and node.op_type == op_type:
            return node
    raise UnsupportedError(
        f"table {ref.initializer!r}: no {op_type} reading it is in the table's own graph (e.g. it is inside a "
        "Loop body); no stand-alone ONNX reference can be cut out for it"
    )


def _constant_chain(graph: onnx.GraphProto, *values: str, reader: str = "Gather"
                    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``values`` (inputs of the table's ``reader``) from constants only,
    each once, in graph order."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    nodes: dict[int, onnx.NodeProto] = {}
    needed_inits: dict[str, onnx.TensorProto] = {}
    stack = list(values)
    while stack:
        name = stack.pop()
        if not name or name in needed_inits:
            continue
        if name in inits:
            needed_inits[name] = inits[name]
        elif name in producers:
            node = producers[name]
            if id(node) not in nodes:
                nodes[id(node)] = node
                stack.extend(node.input)
        else:
            raise UnsupportedError(f"the {reader} input(s) {', '.join(map(repr, values))} depend on the "
                                   f"non-constant value {name!r}")
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(nodes.values(), key=lambda n: order[id(n)]), list(needed_inits.values())


#: after-gather dequantization (scan scheme) -> the ops from the gathered rows to the vectors
_AFTER_GATHER = {"row_scale": ("Cast", "{op}"), "group_affine": ("Cast", "Sub", "Mul")}


def _dequantized_output(graph: onnx.GraphProto, gather: onnx.NodeProto, quant: dict[str, object]) -> str | None:
    """The value holding the dequantized rows of ``gather``, or None when the model dequantizes before it."""
    steps = _AFTER_GATHER.get(str(quant.get("scheme")))
    if steps is None:
        return None
    name = gather.output[0]
    for op in (s.format(op=quant.get("op", "Div")) for s in steps):
        node = next((n for n in graph.node if n.op_type == op and name in n.input), None)
        if node is None:
            raise UnsupportedError(f"the {quant.get('scheme')} dequantization after Gather {gather.name!r} "
                                   f"has no {op} node reading {name!r}")
        name = node.output[0]
    return name


def _slice(graph: onnx.GraphProto, output: str, ids: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``output`` from constants and the value ``ids`` (graph order)."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    nodes: dict[int, onnx.NodeProto] = {}
    needed: dict[str, onnx.TensorProto] = {}
    stack, seen = [output], {ids}
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in inits:
            needed[name] = inits[name]
        elif name in producers:
            nodes.setdefault(id(producers[name]), producers[name])
            stack.extend(producers[name].input)
        else:
            raise UnsupportedError(f"the dequantized rows {output!r} depend on the non-constant value {name!r}")
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(nodes.values(), key=lambda n: order[id(n)]), list(needed.values())


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i, name in enumerate(copy.input):
        copy.input[i] = names.get(name, name)
    for i, name in enumerate(copy.output):
        copy.output[i] = names.get(name, name)
    return copy


def _nodes_and_inits(graph: onnx.GraphProto, ref: TableRef) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The sub-model's nodes (``ids`` in, ``vectors`` out) and initializers."""
    gather = _find_gather(graph, ref)
    dequantized = _dequantized_output(graph, gather, ref.quantization) if ref.quantization else None
    if dequantized is None:
        chain, inits = _constant_chain(graph, gather.input[0])
        return [*chain, _renamed(gather, {gather.input[1]: "ids", gather.output[0]: "vectors"})], inits
    nodes, inits = _slice(graph, dequantized, gather.input[1])
    names = {gather.input[1]: "ids", dequantized: "vectors"}
    return [_renamed(node, names) for node in nodes], inits


def _ids_rank(graph: onnx.GraphProto, ids: str) -> int | None:
    """The rank of the graph input ``ids`` is computed from (elementwise, as Keras's negative wrap), if one.

    The dequantization after a Gather may depend on it (tf2onnx folds ``expand_dims(x, -1)`` into
    ``Unsqueeze(axes=[rank])``), so the sub-model is fed ids of that rank.
    """
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {v.name: v for v in graph.input}
    stack, seen, found = [ids], set(), []
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            found.append(inputs[name])
        elif name in producers:
            stack.extend(producers[name].input)
    shapes = {len(v.type.tensor_type.shape.dim) for v in found if v.type.tensor_type.HasField("shape")}
    return shapes.pop() if len(found) == 1 and len(shapes) == 1 else None


def gather_submodel(model: onnx.ModelProto, ref: TableRef) -> onnx.ModelProto:
    """A model ``ids -> vectors`` made of the table's own initializer, link chain and Gather (and the
    dequantization after the Gather, where the model has one)."""
    graph = next(g for path, g in iter_graphs(model) if path == ref.graph)
    nodes, inits = _nodes_and_inits(graph, ref)
    after = ref.quantization is not None and ref.quantization.get("scheme") in _AFTER_GATHER
    rank = _ids_rank(graph, _find_gather(graph, ref).input[1]) if after else None
    shape = None if rank is None else [f"ids_{i}" for i in range(rank)]
    sub = helper.make_graph(
        nodes, "gather_reference",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, shape)],
        [onnx.ValueInfoProto(name="vectors")],
        initializer=inits,
    )
    return _typed_model(model, sub, ref, "Gather")


def _typed_model(model: onnx.ModelProto, sub: onnx.GraphProto, ref: TableRef, op_type: str) -> onnx.ModelProto:
    """``sub`` as a model with ``model``'s opsets and a typed ``vectors`` output (bfloat16 widened to float32)."""
    opsets = list(model.opset_import)
    made = helper.make_model(sub, opset_imports=opsets, ir_version=min(model.ir_version or IR_VERSION, IR_VERSION))
    inferred = onnx.shape_inference.infer_shapes(made)
    elem = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == "vectors"), 0)
    if not elem:
        raise UnsupportedError(f"cannot infer the output type of table {ref.initializer!r}'s {op_type}")
    if elem == onnx.TensorProto.BFLOAT16:  # session.run cannot return bfloat16: widen exactly, narrow in run()
        made.graph.node.append(helper.make_node("Cast", ["vectors"], ["vectors_f32"], to=onnx.TensorProto.FLOAT))
        made.graph.output[0].CopyFrom(helper.make_tensor_value_info("vectors_f32", onnx.TensorProto.FLOAT, None))
        made.doc_string = BF16_WIDENED
    else:
        made.graph.output[0].CopyFrom(helper.make_tensor_value_info("vectors", elem, None))
    return made


_OPEN_END = int(np.iinfo(np.int64).max)


def _elem_type(model: onnx.ModelProto, graph: onnx.GraphProto, name: str) -> int:
    """The element type of value ``name``: an initializer's, a Constant node's, or shape inference's."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return int(tensor.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                return int(value.data_type)
    inferred = onnx.shape_inference.infer_shapes(model)
    found = (v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == name)
    return int(next(found, onnx.TensorProto.INT64))


def slice_submodel(model: onnx.ModelProto, ref: TableRef) -> onnx.ModelProto:
    """A model with no input and one output ``vectors``: every row of the table as the model reads it.

    It keeps the table's initializer, the link chain in front of its first ``Slice`` and that Slice with
    its own starts, axes and steps (constants: the scanner only accepts a Slice from row 0 with unit
    steps), its ends replaced by "open" (``INT64_MAX``, clamped to each axis).
    """
    graph = next(g for path, g in iter_graphs(model) if path == ref.graph)
    node = _find_reader(graph, ref, ref.slices, "Slice")
    # data, starts, axes, steps (the ends are replaced below)
    nodes, inits = _constant_chain(graph, *node.input[:2], *node.input[3:5], reader="Slice")
    sliced = _renamed(node, {node.output[0]: "vectors"})
    if len(node.input) > 2:  # opset >= 10: ends is an input, of the starts' type (tf2onnx writes int32)
        sliced.input[2] = "open_ends"
        int32 = _elem_type(model, graph, node.input[1]) == onnx.TensorProto.INT32
        end = np.array([np.iinfo(np.int32).max], np.int32) if int32 else np.array([_OPEN_END], np.int64)
        nodes += [helper.make_node("Shape", [node.input[1]], ["open_ends_shape"]),
                  helper.make_node("ConstantOfShape", ["open_ends_shape"], ["open_ends"],
                                   value=numpy_helper.from_array(end))]
    else:  # opset < 10: starts/ends/axes are attributes
        for attribute in sliced.attribute:
            if attribute.name == "ends":
                attribute.ints[:] = [_OPEN_END] * len(attribute.ints)
    sub = helper.make_graph([*nodes, sliced], "slice_reference", [], [onnx.ValueInfoProto(name="vectors")],
                            initializer=inits)
    return _typed_model(model, sub, ref, "Slice")


def _placeholder(tensor: onnx.TensorProto, array: np.ndarray) -> onnx.TensorProto:
    """A one-row stand-in for an external initializer (overridden by ``add_initializer``)."""
    small = np.zeros((1, *array.shape[1:]), dtype=array.dtype)
    return numpy_helper.from_array(small, tensor.name)


def onnx_gather_reference(
    model: onnx.ModelProto, ref: TableRef, base_dir: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable ``ids -> vectors`` running :func:`gather_submodel` in onnxruntime (CPU).

    Initializers stored as external data are memory-mapped and handed to onnxruntime with
    ``SessionOptions.add_initializer`` (no copy; bfloat16 and float8 over their bits with the ONNX type);
    the OrtValues live as long as the callable. Building fails with :class:`ParityError` (or
    :class:`UnsupportedError` where no Gather can be cut out), never a raw onnx/onnxruntime exception.
    """
    sub, session, keep_alive = _reference(gather_submodel, model, ref, base_dir, "Gather")
    ids_type = sub.graph.input[0].type.tensor_type
    rank = len(ids_type.shape.dim) if ids_type.HasField("shape") else None
    narrow = sub.doc_string == BF16_WIDENED

    def gather(ids: np.ndarray) -> np.ndarray:
        _ = keep_alive  # the session reads these buffers
        ids = np.asarray(ids, dtype=np.int64)
        if rank is None or ids.ndim == rank or rank == 0:
            return session.run(None, {"ids": ids})[0]
        vectors = session.run(None, {"ids": ids.reshape((1,) * (rank - 1) + (-1,))})[0]
        return vectors.reshape(ids.shape + vectors.shape[-1:])

    def run(ids: np.ndarray) -> np.ndarray:
        vectors = gather(ids)
        return vectors.astype(ml_dtypes.bfloat16) if narrow else vectors

    return run


def onnx_slice_reference(
    model: onnx.ModelProto, ref: TableRef, base_dir: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable ``ids -> vectors``: the rows :func:`slice_submodel` reads in onnxruntime, indexed by ``ids``.

    onnxruntime runs once, on the first call; ids outside ``[0, rows)`` raise :class:`IdError` (the model
    itself can only read its first rows).
    """
    sub, session, keep_alive = _reference(slice_submodel, model, ref, base_dir, "Slice")
    narrow = sub.doc_string == BF16_WIDENED
    rows: list[np.ndarray] = []

    def run(ids: np.ndarray) -> np.ndarray:
        if not rows:
            _ = keep_alive  # the session reads these buffers
            values = session.run(None, {})[0]
            rows.append(values.astype(ml_dtypes.bfloat16) if narrow else values)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not (0 <= int(ids.min()) and int(ids.max()) < len(rows[0])):
            raise IdError(f"the model's Slice of table {ref.initializer!r} reads rows 0..{len(rows[0]) - 1} only")
        return np.take(rows[0], ids, axis=0)

    return run


def _reference(make: Callable[[onnx.ModelProto, TableRef], onnx.ModelProto], model: onnx.ModelProto,
               ref: TableRef, base_dir: Path | None, op_type: str) -> tuple[onnx.ModelProto, Any, list[Any]]:
    """The sub-model ``make`` cuts out, its session and the OrtValues the session reads.

    A failure that is not already a :class:`BridgeError` (onnx shape inference, onnxruntime refusing
    a value) becomes :class:`ParityError` naming the table: never a raw exception.
    """
    try:
        sub = make(model, ref)
        session, keep_alive = _session(sub, ref, base_dir, op_type)
    except BridgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise many unrelated exception types
        raise ParityError(f"cannot build the onnxruntime reference for the {op_type} of table "
                          f"{ref.initializer!r}: {type(exc).__name__}: {exc}") from exc
    return sub, session, keep_alive


def _session(sub: onnx.ModelProto, ref: TableRef, base_dir: Path | None, op_type: str) -> tuple[Any, list[Any]]:
    """An onnxruntime session of ``sub`` (one thread, no graph optimizations) and the OrtValues it reads.

    Initializers stored as external data are memory-mapped and handed over with ``add_initializer``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep_alive = []
    for i, tensor in enumerate(sub.graph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            array = initializer_array(tensor, base_dir)
            sub.graph.initializer[i].CopyFrom(_placeholder(tensor, array))
            value = _ort_value(ort, array, tensor)
            keep_alive.append(value)
            opts.add_initializer(tensor.name, value)
    try:
        session = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ParityError(f"onnxruntime cannot run the {op_type} of table {ref.initializer!r}: {exc}") from exc
    return session, keep_alive


def _ort_value(ort: Any, array: np.ndarray, tensor: onnx.TensorProto) -> Any:
    """An OrtValue over ``array`` (no copy) typed as ``tensor``: dtypes NumPy itself lacks (bfloat16, float8,
    from ml_dtypes) go over their unsigned-integer bits with the ONNX element type, as onnxruntime wants."""
    data = np.ascontiguousarray(array)
    if data.dtype.kind == "V":  # ml_dtypes: ortvalue_from_numpy refuses them
        bits = data.view(np.dtype(f"uint{8 * data.dtype.itemsize}"))
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, int(tensor.data_type))
    return ort.OrtValue.ortvalue_from_numpy(data)
