"""Make a bfloat16 ONNX model runnable on onnxruntime's CPU provider.

onnxruntime 1.31's CPU provider moves bfloat16 data (Gather, Reshape, Concat, Cast, ...) but has no
bfloat16 kernel for arithmetic: a model with a bfloat16 ``MatMul``, ``Add`` or ``ReduceMean`` fails
to load with ``NOT_IMPLEMENTED``. :func:`upcast_bfloat16` wraps each such node in Casts: its bfloat16
inputs become float32 (exact), it computes in float32, and its bfloat16 outputs are rounded back
to bfloat16 (round to nearest even). TensorFlow's CPU kernels compute bfloat16 element-wise ops the
same way (float32, one rounding), so element-wise results match bit for bit; a MatMul or a
reduction may differ in the last bfloat16 bit (summation order). Tables are not touched: the
Gather that reads a bfloat16 table stays bfloat16.

Only the main graph is rewritten (not Loop/If bodies). Nothing here imports onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from bridge.names import unique_name

#: Ops onnxruntime 1.31's CPU provider runs on bfloat16 (measured); every other op reading or
#: writing bfloat16 is upcast. Upcasting a data-movement op too would only cost time, never bits.
BFLOAT16_NATIVE = frozenset({
    "Cast", "Concat", "Constant", "Flatten", "Gather", "GatherElements", "Identity", "Reshape", "Shape",
    "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
})
#: Ops whose output type an attribute or a second input fixes: they cannot be upcast by renaming.
_TYPED_ELSEWHERE = frozenset({
    "CastLike", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Multinomial",
})
_BF16, _F32 = TensorProto.BFLOAT16, TensorProto.FLOAT
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Upcast:
    """What :func:`upcast_bfloat16` changed: the upcast nodes (``"name (OpType)"``) and their op types."""

    nodes: tuple[str, ...]
    op_types: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.nodes)

    def describe(self) -> str:
        """One sentence for a conversion warning."""
        return (f"onnxruntime's CPU provider has no bfloat16 kernel for {', '.join(self.op_types)}: "
                f"{len(self.nodes)} node(s) now compute in float32 between Casts and round back to bfloat16 "
                "(element-wise ops match TensorFlow bit for bit; MatMul and reductions may differ in the last bit)")


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the main graph that ONNX shape inference (or the model) knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {t.name: int(t.data_type) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        if elem:
            types[value.name] = int(elem)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None:
                types[node.output[0]] = int(value.data_type)
    return types


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """True when a value of the main graph is bfloat16 (cheap: initializers, declared values, Cast targets)."""
    graph = model.graph
    if any(t.data_type == _BF16 for t in graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == _BF16 for v in [*graph.input, *graph.output, *graph.value_info]):
        return True
    return any(n.op_type == "Cast" and any(a.name == "to" and a.i == _BF16 for a in n.attribute) for n in graph.node)


def upcast_bfloat16(model: onnx.ModelProto) -> Upcast:
    """Rewrite ``model`` in place so onnxruntime's CPU provider can run it (see the module docstring)."""
    if not has_bfloat16(model):
        return Upcast((), ())
    types = value_types(model)
    graph = model.graph
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
    upcast_of: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    changed: list[onnx.NodeProto] = []
    for node in graph.node:
        if not _needs_upcast(node, types):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name and types.get(name) == _BF16:
                if name not in upcast_of:
                    upcast_of[name] = unique_name(f"{name}__f32", taken)
                    nodes.append(helper.make_node("Cast", [name], [upcast_of[name]], to=_F32,
                                                  name=unique_name(f"{name}__to_f32", taken)))
                node.input[i] = upcast_of[name]
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name and types.get(name) == _BF16:
                wide = unique_name(f"{name}__f32", taken)
                node.output[i] = wide
                back = unique_name(f"{name}__to_bf16", taken)
                nodes.append(helper.make_node("Cast", [wide], [name], to=_BF16, name=back))
        changed.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    labels = tuple(f"{n.name or '(unnamed)'} ({n.op_type})" for n in changed)
    return Upcast(labels, tuple(sorted({n.op_type for n in changed})))


def _needs_upcast(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    if node.domain not in _DEFAULT_DOMAINS or node.op_type in BFLOAT16_NATIVE or node.op_type in _TYPED_ELSEWHERE:
        return False
    return any(name and types.get(name) == _BF16 for name in (*node.input, *node.output))
