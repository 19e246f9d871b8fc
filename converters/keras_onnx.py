"""Keras model -> ONNX ModelProto with tf2onnx.

Every model (Functional, Sequential, subclassed, nested, a SavedModel signature layer) is
first called on fresh ``keras.Input``s inside a new Functional wrapper whose outputs are
named ``Identity`` layers. That one shape suits ``tf2onnx.convert.from_keras``, which fails
on a Keras 3 ``Sequential`` (``KeyError: 'keras_tensor_N'``) and needs a Functional model to
initialize lookup tables (a ``StringLookup`` becomes ``ai.onnx.ml.CategoryMapper``);
``from_function`` leaves lookup tables uninitialized.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from bridge.errors import ConversionError, UnsupportedError
from bridge.onnx_bf16 import upcast_bfloat16
from bridge.onnx_io import iter_graphs
from converters.keras_env import captured_logs, import_keras, import_tf2onnx
from converters.keras_precision import bfloat16_typing
from converters.keras_signature import LIST, SINGLE, Signature, tf_specs
from converters.keras_strings import repair_string_equals

#: Default ONNX opset (tf2onnx's own default is 15).
DEFAULT_OPSET = 17
#: Highest IR version written (onnxruntime 1.31 reads <= 13; onnx.helper defaults to 14).
MAX_IR_VERSION = 10
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_VALID_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


@dataclass
class OnnxConversion:
    """tf2onnx's result: the model, its output names, and what tf2onnx complained about."""

    model: onnx.ModelProto
    outputs: list[str]
    warnings: list[str] = field(default_factory=list)


def _as_tuple(out: Any) -> tuple[list[str] | None, list[Any]]:
    if isinstance(out, Mapping):
        return [str(k) for k in out], list(out.values())
    if isinstance(out, (list, tuple)):
        return None, list(out)
    return None, [out]


def output_names(model: Any, out: Any, taken: set[str]) -> dict[str, Any]:
    """Name the model's symbolic outputs: dict keys, else Keras ``output_names``, else ``output[_i]``."""
    keys, tensors = _as_tuple(out)
    if keys is None:
        declared = list(getattr(model, "output_names", None) or [])
        if len(declared) == len(tensors) and len(set(declared)) == len(declared):
            keys = [str(k) for k in declared]
        else:
            keys = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
    named: dict[str, Any] = {}
    for i, (key, tensor) in enumerate(zip(keys, tensors, strict=True)):
        name = key if _VALID_NAME.match(key) else f"output_{i}"
        while name in taken or name in named:
            name = f"{name}_out"
        named[name] = tensor
    return named


def wrap_model(model: Any, signature: Signature) -> Any:
    """A Functional model: fresh inputs -> ``model`` -> one ``Identity`` layer per named output."""
    _, keras = import_keras()
    inputs = {s.name: keras.Input(batch_shape=s.shape, dtype=s.dtype, name=s.name) for s in signature.inputs}
    if signature.structure == SINGLE:
        arg: Any = next(iter(inputs.values()))
    elif signature.structure == LIST:
        arg = list(inputs.values())
    else:
        arg = inputs
    name = str(getattr(model, "name", "model"))
    try:
        out = model(arg, training=False)
    except Exception as exc:  # noqa: BLE001 - any failure here is the model rejecting the signature
        raise ConversionError(
            f"calling model {name!r} on its input signature {signature.to_json()['inputs']} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}; pass a matching input_signature"
        ) from exc
    named = output_names(model, out, set(signature.names) | {name})
    if not all(keras.backend.is_keras_tensor(t) for t in named.values()):
        raise UnsupportedError(f"model {name!r} returns a nested structure or non-tensors; only a tensor, "
                               "a list or a dict of tensors converts to ONNX outputs")
    try:
        outputs = {k: keras.layers.Identity(name=k, **_keep_dtype(v))(v) for k, v in named.items()}
        return keras.Model(inputs, outputs, name=f"{name}_onnx")
    except ValueError as exc:  # e.g. an input named like the model itself
        raise ConversionError(f"cannot wrap model {name!r} for tf2onnx: {_first_line(exc)}") from exc


def _keep_dtype(tensor: Any) -> dict[str, Any]:
    """``{"dtype": ...}`` for a float output, so the output Identity layer does not cast it (under
    ``mixed_float16`` the default policy would round a float32 output to float16).

    A bfloat16 output becomes float32 (exact): onnxruntime's ``session.run`` cannot return bfloat16
    arrays ("No corresponding Numpy type for Tensor Type. bfloat16").
    """
    raw = getattr(tensor, "dtype", "")
    dtype = str(getattr(raw, "name", raw))  # Keras 3: a string; Keras 2: a tf.DType
    if dtype == "bfloat16":
        return {"dtype": "float32"}
    return {"dtype": dtype} if dtype in ("float16", "float32", "float64") else {}


def _first_line(exc: BaseException) -> str:
    """The informative line of an exception message (TensorFlow's start with "in user code:")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def to_onnx(model: Any, signature: Signature, *, opset: int | None = None) -> OnnxConversion:
    """Convert ``model`` called with ``signature`` to ONNX (IR version <= 10); tf2onnx failures -> ConversionError."""
    tf, _ = import_keras()
    tf2onnx = import_tf2onnx()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    with captured_logs() as logs:
        wrapper = wrap_model(model, signature)
        specs = tf_specs(signature, tf)
        try:
            with bfloat16_typing():
                proto, _ = tf2onnx.convert.from_keras(wrapper, input_signature=[specs], opset=opset)
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises anything; the cause is kept
            raise _tf2onnx_error(model, exc, logs) from exc
    warnings = [f"tf2onnx: {line}" for line in logs]
    warnings += repair_string_equals(proto, model)
    upcast = upcast_bfloat16(proto)
    if upcast:
        warnings.append(upcast.describe())
    unconverted = unconverted_ops(proto)
    if unconverted:
        warnings.append(
            f"the ONNX model keeps {len(unconverted)} op type(s) tf2onnx could not convert "
            f"({', '.join(unconverted)}): onnxruntime cannot run it, but its tables are still extracted"
        )
    problem = check_problem(proto) if not unconverted else None
    if problem:
        warnings.append(f"the ONNX model tf2onnx wrote is invalid ({problem}): onnxruntime will not load it, "
                        "but its tables are still extracted")
    _limit_ir_version(proto)
    return OnnxConversion(model=proto, outputs=[o.name for o in proto.graph.output], warnings=warnings)


def _tf2onnx_error(model: Any, exc: Exception, logs: list[str]) -> ConversionError:
    text = f"{type(exc).__name__}: {_first_line(exc)}"
    detail = f"; tf2onnx said: {logs[-1]}" if logs else ""
    if any(s in f"{type(exc).__name__} {exc}" for s in ("2GB", "2 GB", "protobuf size", "EncodeError")):
        detail += "; a model over 2 GiB exceeds the protobuf limit tf2onnx writes into"
    return ConversionError(f"tf2onnx could not convert model {getattr(model, 'name', '?')!r}: {text}{detail}")


def unconverted_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in the main graph that no ONNX (or ai.onnx.ml) schema defines, sorted."""
    bad = set()
    for node in model.graph.node:
        if node.domain not in _ONNX_DOMAINS or not onnx.defs.has(node.op_type, node.domain):
            bad.add(node.op_type if not node.domain else f"{node.domain}.{node.op_type}")
    return sorted(bad)


def check_problem(model: onnx.ModelProto) -> str | None:
    """The ONNX checker's first complaint about a node of the main graph, or None.

    Nodes without subgraphs are checked one by one. A node holding a subgraph (the ``Loop`` of a
    recurrent layer) reads names of the graph around it, which a node checked alone cannot see: when
    there is one, the whole model is checked too, outer scopes known (:func:`_model_problem`).
    """
    try:
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version = model.ir_version
        ctx.opset_imports = {o.domain: int(o.version) for o in model.opset_import}
    except (AttributeError, TypeError):  # the checker's context is not public API; skip if it moved
        return None
    for node in model.graph.node:
        if _holds_graph(node):
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except (onnx.checker.ValidationError, ValueError) as exc:
            return f"node {node.name!r} ({node.op_type}): {_first_line(exc)}"
    return _model_problem(model) if any(_holds_graph(node) for node in model.graph.node) else None


def _holds_graph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _model_problem(model: onnx.ModelProto) -> str | None:
    """``onnx.checker.check_model``'s complaint, or None; a model past 2 GiB is not checked.

    tf2onnx leaves some graph outputs without a shape, which onnxruntime accepts but the checker
    rejects: such outputs get an empty shape for the check and lose it again afterwards.
    """
    shapeless = [o.type.tensor_type for _, g in iter_graphs(model) for o in g.output
                 if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    for tensor_type in shapeless:
        tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # several lines: the problem, then "==> Context: <node>"
        return " ".join(str(exc).replace("==> Context:", "in").split())
    except ValueError:  # past protobuf's 2 GiB: check_model needs a path, the node checks above stand
        return None
    finally:
        for tensor_type in shapeless:
            tensor_type.ClearField("shape")
    return None


def _limit_ir_version(model: onnx.ModelProto) -> None:
    """Lower the IR version to :data:`MAX_IR_VERSION` when the opsets allow it."""
    if model.ir_version <= MAX_IR_VERSION:
        return
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(needed, MAX_IR_VERSION)
