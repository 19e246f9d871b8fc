"""Run a model's own Gather for one table in onnxruntime: the "converted ONNX model" reference.

The sub-model keeps the table's initializer, the link chain in front of the Gather
(Identity, Cast, DequantizeLinear, Mul by a scale, ...) and the Gather node itself, with the
Gather's indices fed from a new ``ids`` input. So parity compares adapters against what the
converted model itself computes, not against a re-implementation of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bridge.errors import ParityError, UnsupportedError
from bridge.onnx_io import initializer_array, iter_graphs, node_label
from bridge.scan import TableRef

IR_VERSION = 10


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


def gather_submodel(model: onnx.ModelProto, ref: TableRef) -> onnx.ModelProto:
    """A model ``ids -> vectors`` made of the table's own initializer, link chain and Gather."""
    graph = next(g for path, g in iter_graphs(model) if path == ref.graph)
    gather = _find_gather(graph, ref)
    chain, inits = _constant_chain(graph, gather.input[0])
    new_gather = onnx.NodeProto()
    new_gather.CopyFrom(gather)
    new_gather.input[1] = "ids"
    new_gather.output[0] = "vectors"
    sub = helper.make_graph(
        [*chain, new_gather], "gather_reference",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, None)],
        [onnx.ValueInfoProto(name="vectors")],
        initializer=inits,
    )
    opsets = list(model.opset_import)
    made = helper.make_model(sub, opset_imports=opsets, ir_version=min(model.ir_version or IR_VERSION, IR_VERSION))
    inferred = onnx.shape_inference.infer_shapes(made)
    elem = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == "vectors"), 0)
    if not elem:
        raise UnsupportedError(f"cannot infer the output type of table {ref.initializer!r}'s Gather")
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

    def run(ids: np.ndarray) -> np.ndarray:
        _ = keep_alive  # the session reads these buffers
        return session.run(None, {"ids": np.asarray(ids, dtype=np.int64)})[0]

    return run
