"""Repair tf2onnx's string comparison so onnxruntime can run a ``StringLookup(mask_token=...)`` model.

ONNX ``Equal`` takes no strings before opset 19, and tf2onnx 1.17 converts TensorFlow's string
``Equal`` (a StringLookup's mask test ``token == mask_token``) into ``Equal(Cast(token, to=INT32),
<constant>)``: onnxruntime fails at run time with ``stoll`` (it parses the strings as integers) and the
mask token itself is lost (folded to an integer). :func:`fix_string_equals` replaces each such pair by
``Cast(CategoryMapper(token, cats_strings=[mask], cats_int64s=[1], default_int64=0), to=BOOL)``,
which onnxruntime's CPU provider runs.

The mask token is read from the graph when tf2onnx kept it: for a non-empty token (``"[PAD]"``) it
writes ``Equal(Cast(token), Cast(<string constant>))``, two casts of strings feeding one ``Equal``,
and the constant is the token compared with. When the constant was folded to an integer (``""``
becomes ``-1``), the mask token comes from the Keras StringLookup layer whose vocabulary the
neighbouring CategoryMapper holds (or the only mask token of the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper

from bridge.onnx_bf16 import value_types
from bridge.onnx_io import iter_graphs
from converters.keras_env import import_keras
from converters.keras_layers import iter_layers

_ML = "ai.onnx.ml"
_NUMERIC = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                   TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.FLOAT,
                   TensorProto.DOUBLE})


@dataclass(frozen=True)
class MaskedLookup:
    """A Keras StringLookup with a mask token, and its vocabulary without the special tokens."""

    layer: str
    mask_token: str
    vocabulary: tuple[str, ...]


def masked_lookups(model: Any) -> list[MaskedLookup]:
    """The StringLookup layers of ``model`` that have a mask token."""
    _, keras = import_keras()
    cls = getattr(keras.layers, "StringLookup", None)
    out = []
    for entry in iter_layers(model) if hasattr(model, "layers") else []:
        layer = entry.layer
        if cls is None or not isinstance(layer, cls) or layer.mask_token is None:
            continue
        vocab = tuple(_text(t) for t in layer.get_vocabulary(include_special_tokens=False))
        out.append(MaskedLookup(entry.path, _text(layer.mask_token), vocab))
    return out


def _text(token: Any) -> str:
    if hasattr(token, "item") and not isinstance(token, (str, bytes)):
        token = token.item()
    return token.decode("utf-8") if isinstance(token, bytes) else str(token)


def _mapper_strings(graph: onnx.GraphProto, source: str) -> set[tuple[str, ...]]:
    return {tuple(s.decode("utf-8") for a in n.attribute if a.name == "cats_strings" for s in a.strings)
            for n in graph.node if n.op_type == "CategoryMapper" and n.domain == _ML and list(n.input[:1]) == [source]}


def _mask_for(graph: onnx.GraphProto, source: str, lookups: Sequence[MaskedLookup]) -> str | None:
    neighbours = _mapper_strings(graph, source)
    by_vocab = {lk.mask_token for lk in lookups if lk.vocabulary in neighbours}
    if len(by_vocab) == 1:
        return by_vocab.pop()
    masks = {lk.mask_token for lk in lookups}
    return masks.pop() if len(masks) == 1 and not by_vocab else None


def _has_strings(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return (any(v.type.tensor_type.elem_type == TensorProto.STRING for v in graph.input)
            or any(t.data_type == TensorProto.STRING for t in graph.initializer))


def string_equal_casts(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(Cast, Equal)`` pairs of the main graph where a string is cast to a number and compared."""
    if not _has_strings(model):
        return []  # skip shape inference (a serialization of the whole model) for models without strings
    types = value_types(model)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in graph.node:
        if node.op_type != "Cast" or not node.input or types.get(node.input[0]) != TensorProto.STRING:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to not in _NUMERIC:
            continue
        pairs += [(node, eq) for eq in consumers.get(node.output[0], []) if eq.op_type == "Equal"]
    return pairs


_EqualCasts = tuple[onnx.NodeProto, list[onnx.NodeProto]]  # an Equal and the string casts it reads


def _string_constant(graph: onnx.GraphProto, name: str) -> bytes | None:
    """The string a scalar STRING initializer or ``Constant`` named ``name`` holds, else None."""
    tensor = next((t for t in graph.initializer if t.name == name), None)
    if tensor is None:
        tensor = next((a.t for n in graph.node if n.op_type == "Constant" and list(n.output) == [name]
                       for a in n.attribute if a.name == "value"), None)
    if tensor is None or tensor.data_type != TensorProto.STRING or list(tensor.dims) or len(tensor.string_data) != 1:
        return None
    return bytes(tensor.string_data[0])


def _by_equal(pairs: Sequence[tuple[onnx.NodeProto, onnx.NodeProto]]) -> list[_EqualCasts]:
    """Group ``(Cast, Equal)`` pairs by Equal (first-seen order), each cast once."""
    groups: dict[int, _EqualCasts] = {}
    for cast, equal in pairs:
        casts = groups.setdefault(id(equal), (equal, []))[1]
        if all(c is not cast for c in casts):
            casts.append(cast)
    return list(groups.values())


def _compared(graph: onnx.GraphProto, casts: Sequence[onnx.NodeProto],
              lookups: Sequence[MaskedLookup]) -> tuple[str, bytes] | None:
    """``(string tensor, token it is compared with)`` for one Equal's string casts, or None if unknown.

    Two casts: one reads a string constant (the token), the other the tensor. One cast: the token
    was folded to a number, so it comes from the Keras lookups (:func:`_mask_for`).
    """
    if len(casts) == 1:
        mask = _mask_for(graph, casts[0].input[0], lookups)
        return None if mask is None else (casts[0].input[0], mask.encode("utf-8"))
    if len(casts) != 2:
        return None
    first, second = (_string_constant(graph, cast.input[0]) for cast in casts)
    if first is not None and second is None:
        return casts[1].input[0], first
    if second is not None and first is None:
        return casts[0].input[0], second
    return None  # two tensors, or two constants: nothing to map


def _mask_test(equal: onnx.NodeProto, source: str, token: bytes) -> list[onnx.NodeProto]:
    """``Cast(CategoryMapper(source == token), to=BOOL)`` writing the Equal's output."""
    mapped = f"{equal.output[0]}__is_mask"
    return [
        helper.make_node("CategoryMapper", [source], [mapped], domain=_ML, name=f"{equal.name}__mask_mapper",
                         cats_strings=[token], cats_int64s=[1], default_int64=0),
        helper.make_node("Cast", [mapped], [equal.output[0]], to=TensorProto.BOOL, name=f"{equal.name}__mask_bool"),
    ]


def fix_string_equals(model: onnx.ModelProto, lookups: Sequence[MaskedLookup]) -> tuple[list[str], list[str]]:
    """Rewrite the Equals of :func:`string_equal_casts` in place; return ``(fixed, unresolved)`` Equal names."""
    graph = model.graph
    # nodes are matched by id(): hold every node's Python object for the whole rewrite, or protobuf frees a
    # wrapper and a later one reuses its address (two masked lookups replaced unrelated nodes)
    alive = list(graph.node)
    fixed, unresolved = [], []
    replacements: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for equal, casts in _by_equal(string_equal_casts(model)):
        compared = _compared(graph, casts, lookups)
        if compared is None:
            unresolved.append(equal.name or equal.output[0])
            continue
        replacements[id(equal)] = _mask_test(equal, *compared)
        dropped.update(id(cast) for cast in casts)
        fixed.append(equal.name or equal.output[0])
    if replacements:
        _replace_nodes(graph, replacements, dropped)
        _drop_unread_initializers(model)
        _ensure_ml_opset(model)
    del alive
    return fixed, unresolved


def _replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]], dropped: set[int]) -> None:
    """Put each replaced node's new nodes in its place; remove dropped nodes no other node still reads."""
    kept = [node for node in graph.node if id(node) not in replacements and id(node) not in dropped]
    still_read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        if id(node) not in dropped or node.output[0] in still_read:
            nodes.extend(replacements.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Remove main-graph initializers no node (of any graph) reads any more (the integer or string the
    tokens were compared with)."""
    graph = model.graph
    read = {name for _, g in iter_graphs(model) for node in g.node for name in node.input}
    read |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _ensure_ml_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == _ML for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_ML, 2))


def repair_string_equals(model: onnx.ModelProto, keras_model: Any) -> list[str]:
    """:func:`fix_string_equals` with the mask tokens of ``keras_model``; returns conversion warnings."""
    if not any(n.op_type == "Equal" for n in model.graph.node):
        return []
    fixed, unresolved = fix_string_equals(model, masked_lookups(keras_model))
    warnings = []
    if fixed:
        warnings.append(f"tf2onnx compared strings by casting them to integers (onnxruntime fails with 'stoll'): "
                        f"{len(fixed)} mask test(s) now use a CategoryMapper ({', '.join(fixed)})")
    if unresolved:
        warnings.append(f"tf2onnx compared strings by casting them to integers in {', '.join(unresolved)}: "
                        "onnxruntime will fail with 'stoll' when it runs the model, and the token compared with is "
                        "not known (no unique StringLookup mask token); the tables are still extracted")
    return warnings
