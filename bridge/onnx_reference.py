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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from bridge.errors import ParityError, UnsupportedError
from bridge.onnx_io import initializer_array, iter_graphs, node_label
from bridge.scan import TableRef

IR_VERSION = 10
#: doc_string marking a sub-model whose bfloat16 output is widened to float32 (exact) for onnxruntime
BF16_WIDENED = "bfloat16 output widened to float32"


def _find_gather(graph: onnx.GraphProto, ref: TableRef) -> onnx.NodeProto:
    labels = {use.node for use in ref.gathers if use.graph == ref.graph}
    for i, node in enumerate(graph.node):
        if node_label(node, i) in labels and node.op_type == "Gather":
            return node
    raise UnsupportedError(
        f"table {ref.initializer!r}: its Gather is not in the table's own graph (e.g. inside a Loop body); "
        "no stand-alone ONNX reference can be cut out for it"
    )


def _constant_chain(graph: onnx.GraphProto, data_input: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing ``data_input`` from constants only (in graph order)."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    nodes: dict[int, onnx.NodeProto] = {}
    needed_inits: dict[str, onnx.TensorProto] = {}
    stack = [data_input]
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
            raise UnsupportedError(f"the Gather data {data_input!r} depends on the non-constant value {name!r}")
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
    opsets = list(model.opset_import)
    made = helper.make_model(sub, opset_imports=opsets, ir_version=min(model.ir_version or IR_VERSION, IR_VERSION))
    inferred = onnx.shape_inference.infer_shapes(made)
    elem = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == "vectors"), 0)
    if not elem:
        raise UnsupportedError(f"cannot infer the output type of table {ref.initializer!r}'s Gather")
    if elem == onnx.TensorProto.BFLOAT16:  # session.run cannot return bfloat16: widen exactly, narrow in run()
        made.graph.node.append(helper.make_node("Cast", ["vectors"], ["vectors_f32"], to=onnx.TensorProto.FLOAT))
        made.graph.output[0].CopyFrom(helper.make_tensor_value_info("vectors_f32", onnx.TensorProto.FLOAT, None))
        made.doc_string = BF16_WIDENED
    else:
        made.graph.output[0].CopyFrom(helper.make_tensor_value_info("vectors", elem, None))
    return made


def _placeholder(tensor: onnx.TensorProto, array: np.ndarray) -> onnx.TensorProto:
    """A one-row stand-in for an external initializer (overridden by ``add_initializer``)."""
    small = np.zeros((1, *array.shape[1:]), dtype=array.dtype)
    return numpy_helper.from_array(small, tensor.name)


def onnx_gather_reference(
    model: onnx.ModelProto, ref: TableRef, base_dir: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable ``ids -> vectors`` running :func:`gather_submodel` in onnxruntime (CPU).

    Initializers stored as external data are memory-mapped and handed to onnxruntime with
    ``SessionOptions.add_initializer`` (no copy); the OrtValues live as long as the callable.
    """
    import onnxruntime as ort

    sub = gather_submodel(model, ref)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep_alive = []
    for i, tensor in enumerate(sub.graph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            array = initializer_array(tensor, base_dir)
            sub.graph.initializer[i].CopyFrom(_placeholder(tensor, array))
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            keep_alive.append(value)
            opts.add_initializer(tensor.name, value)
    try:
        session = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ParityError(f"onnxruntime cannot run the Gather of table {ref.initializer!r}: {exc}") from exc

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
