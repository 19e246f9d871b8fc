"""Walk a Keras model's layers with their paths; list the weights tables may come from.

A layer's path is the chain of layer names from the top model (excluded) down to it, joined
by ``/``: ``"encoder/tok_emb"`` for layer ``tok_emb`` inside the nested model ``encoder``. A
layer reachable along several paths (shared between sub-models) is listed once, under the
first path met depth-first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.errors import InputError
from converters.keras_env import import_keras, to_numpy
from converters.keras_map import Candidate
from converters.keras_quant import integer_table


@dataclass(frozen=True)
class LayerEntry:
    """One layer and its path inside the model."""

    path: str
    layer: Any


def _children(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if callable(flatten):
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", None) or [])


def iter_layers(model: Any) -> list[LayerEntry]:
    """Every layer under ``model`` (not ``model`` itself, no ``InputLayer``), depth-first, each once."""
    seen = {id(model)}
    entries: list[LayerEntry] = []

    def visit(layer: Any, prefix: str) -> None:
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}" if prefix else str(child.name)
            if type(child).__name__ != "InputLayer":
                entries.append(LayerEntry(path, child))
            visit(child, path)

    visit(model, "")
    return entries


def node_tensors(node: Any, attr: str = "input_tensors") -> list[Any]:
    """A Functional node's input (or output) tensors as a list: Keras 2 gives a lone tensor for one input."""
    value = getattr(node, attr, None)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def embedding_layers(model: Any) -> dict[str, Any]:
    """``{path: layer}`` for every ``keras.layers.Embedding`` (and subclass) in ``model``."""
    _, keras = import_keras()
    return {e.path: e.layer for e in iter_layers(model) if isinstance(e.layer, keras.layers.Embedding)}


def find_layer(model: Any, key: str) -> tuple[str, Any]:
    """The Embedding layer at path ``key``, or the only one whose name is ``key``."""
    layers = embedding_layers(model)
    if key in layers:
        return key, layers[key]
    by_name = [(p, layer) for p, layer in layers.items() if layer.name == key]
    if len(by_name) == 1:
        return by_name[0]
    hint = "several layers have that name; use the full path" if by_name else "no Embedding layer has that path or name"
    raise InputError(f"{key!r}: {hint}; Embedding layers: {', '.join(layers) or '(none)'}")


def _to_numpy(value: Any) -> np.ndarray:
    return to_numpy(value)


def _own_weights(layer: Any) -> list[Any]:
    inner = {id(w) for child in _children(layer) for w in getattr(child, "weights", [])}
    return [w for w in getattr(layer, "weights", []) if id(w) not in inner]


def _loader(value: Any) -> Any:
    return lambda: _to_numpy(value)


def keras_candidates(model: Any) -> list[Candidate]:
    """Each Embedding's ``embeddings`` (primary), then every other 2-D weight of the model.

    ``layer.embeddings`` is what the layer computes with: LoRA folded in, as tf2onnx writes it.
    A quantized layer's candidate is its integer table (int4 unpacked), which tf2onnx writes
    whether or not LoRA is enabled (:func:`converters.keras_quant.integer_table`).
    """
    _, keras = import_keras()
    primary: list[Candidate] = []
    others: list[Candidate] = []
    top = LayerEntry(str(model.name), model)
    for entry in [top, *iter_layers(model)]:
        layer = entry.layer
        is_embedding = isinstance(layer, keras.layers.Embedding)
        if is_embedding and layer.built:
            value = integer_table(layer) if getattr(layer, "quantization_mode", None) else layer.embeddings
            primary.append(Candidate(entry.path, f"{entry.path}/embeddings", tuple(value.shape),
                                     _loader(value), primary=True, obj=layer))
            continue
        for weight in _own_weights(layer):
            if len(weight.shape) == 2:
                wname = str(getattr(weight, "name", "weight"))
                others.append(Candidate(entry.path, f"{entry.path}/{wname}", tuple(weight.shape),
                                        _loader(weight), primary=False, obj=layer))
    return primary + others


def variable_candidates(variables: list[tuple[str, Any]]) -> list[Candidate]:
    """Candidates from named TensorFlow variables (a SavedModel): ``.../embeddings`` are primary."""
    out = []
    for name, var in variables:
        if len(var.shape) != 2:
            continue
        layer = name.rsplit("/", 1)[0] if "/" in name else name
        out.append(Candidate(layer, name, tuple(int(d) for d in var.shape), _loader(var),
                             primary=name.endswith("/embeddings"), obj=var))
    return sorted(out, key=lambda c: not c.primary)


def embedding_outputs(model: Any, ids_by_layer: dict[str, Any]) -> dict[str, np.ndarray]:
    """What each named Embedding layer itself returns for the given ids (calling the layer).

    Keys are layer paths (``"encoder/tok_emb"``) or unique layer names; the result is keyed
    by the same keys. A ``mask_zero`` layer returns its vectors (the mask travels separately).
    """
    out = {}
    for key, ids in ids_by_layer.items():
        _, layer = find_layer(model, key)
        out[key] = _to_numpy(layer(np.asarray(ids)))
    return out
