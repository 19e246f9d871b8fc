"""Keras ``TextVectorization``: convert the integer sub-model, keep the text pipeline as data.

tf2onnx leaves TextVectorization's string ops (``StaticRegexReplace``, ``StringSplitV2``, ...)
unconverted, so onnxruntime cannot run a model that starts with one. :func:`split_text_inputs`
replaces each model input that feeds a TextVectorization layer by that layer's output (token ids):
the ONNX model takes ``<input>_ids`` (int64), the layer's vocabulary becomes the vocabulary of the
table(s) it feeds, and its settings (:func:`text_settings`) go to the table metadata, so
:mod:`bridge.text` gives the ids Keras gives, without TensorFlow. Settings it cannot reproduce
raise :class:`UnsupportedError`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bridge.errors import UnsupportedError
from bridge.text import TextSettings
from converters.keras_env import import_keras
from converters.keras_layers import node_tensors
from converters.keras_load import LoadedModel
from converters.keras_signature import DICT, LIST, SINGLE, InputSpec, Signature


@dataclass(frozen=True)
class TextInput:
    """A model input replaced by the ids of the TextVectorization layer it fed.

    ``settings`` is None when the layer's settings cannot be reproduced; ``problem`` then says why.
    """

    input: str
    layer: str
    onnx_input: str
    settings: TextSettings | None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "layer": self.layer, "onnx_input": self.onnx_input,
                "settings": self.settings.to_json() if self.settings else None, "unsupported": self.problem}


def is_text_vectorization(layer: Any) -> bool:
    """True for a Keras ``TextVectorization`` layer (Keras 3 or 2)."""
    _, keras = import_keras()
    cls = getattr(keras.layers, "TextVectorization", None)
    return cls is not None and isinstance(layer, cls)


def text_settings(layer: Any) -> TextSettings:
    """The settings of a TextVectorization ``layer``; :class:`UnsupportedError` for what cannot be reproduced."""
    config = layer.get_config()
    name = getattr(layer, "name", "?")
    standardize, split = config.get("standardize"), config.get("split")
    problems = []
    if not (standardize is None or isinstance(standardize, str)):
        problems.append("a custom standardize callable")
    if not (split is None or isinstance(split, str)):
        problems.append("a custom split callable")
    if config.get("ngrams") is not None:
        problems.append(f"ngrams={config.get('ngrams')!r}")
    if config.get("ragged"):
        problems.append("ragged=True (Keras returns ragged ids; the converted model pads them)")
    if config.get("output_mode", "int") != "int":
        problems.append(f"output_mode={config.get('output_mode')!r} (only 'int' gives ids for an Embedding)")
    lookup = getattr(layer, "_lookup_layer", None)
    if lookup is not None and int(getattr(lookup, "num_oov_indices", 1)) != 1:
        problems.append(f"num_oov_indices={lookup.num_oov_indices} (OOV tokens are hashed)")
    if str(config.get("encoding", "utf-8")).lower().replace("_", "-") not in ("utf-8", "utf8"):
        problems.append(f"encoding={config.get('encoding')!r}")
    if problems:
        raise UnsupportedError(
            f"TextVectorization {name!r} uses {', '.join(problems)}, which bridge.text cannot reproduce bit for bit; "
            "use standardize in (None, 'lower', 'strip_punctuation', 'lower_and_strip_punctuation'), split in "
            "(None, 'whitespace', 'character'), no ngrams, ragged=False, output_mode='int', or convert the model "
            "after the layer (keras.Model(text_layer_output, model.output)) and tokenize yourself"
        )
    return TextSettings(standardize=standardize, split=split,
                        output_sequence_length=config.get("output_sequence_length"))


def _input_layers(model: Any) -> tuple[dict[int, tuple[Any, Any]], list[str]]:
    """``{id(input tensor): (layer, node)}`` for TextVectorization layers called on a model input, and the
    reasons the model cannot be split (a layer applied elsewhere, or twice to one input)."""
    found: dict[int, tuple[Any, Any]] = {}
    problems: list[str] = []
    inputs = {id(t) for t in _flat(getattr(model, "inputs", None) or [])}
    for layer in getattr(model, "layers", []):
        if not is_text_vectorization(layer):
            continue
        for node in getattr(layer, "_inbound_nodes", []):
            given = node_tensors(node)
            if len(given) == 1 and id(given[0]) in inputs and id(given[0]) not in found:
                found[id(given[0])] = (layer, node)
            else:
                problems.append(f"TextVectorization {layer.name!r} is not applied once, directly to a model input")
    return found, problems


def _flat(struct: Any) -> list[Any]:
    if isinstance(struct, dict):
        return list(struct.values())
    if isinstance(struct, (list, tuple)):
        return list(struct)
    return [struct]


def split_text_inputs(loaded: LoadedModel) -> tuple[LoadedModel, Signature | None, list[TextInput], list[str]]:
    """``loaded`` with every TextVectorization input replaced by its ids (see the module docstring).

    Returns ``(loaded, signature, text inputs, warnings)``; the model is returned unchanged (signature
    None) when no TextVectorization layer is applied to a model input, for a SavedModel, or when a
    layer sits elsewhere (a warning says so: the string ops then stay in the ONNX model).
    """
    if loaded.kind == "saved_model" or not hasattr(loaded.model, "inputs"):
        return loaded, None, [], []
    model = loaded.model
    layers, problems = _input_layers(model)
    if problems:
        return loaded, None, [], [f"{problems[0]}: the model is converted with its string ops, which onnxruntime "
                                  "cannot run; convert keras.Model(<its output>, model.output) and tokenize with "
                                  "bridge.text instead"]
    if not layers:
        return loaded, None, [], []
    _, keras = import_keras()
    structure = model.input
    keys = list(structure.keys()) if isinstance(structure, dict) else None
    new_inputs, specs, texts = [], [], []
    for i, tensor in enumerate(_flat(structure)):
        name = keys[i] if keys else str(getattr(tensor, "name", "input")).split(":")[0]
        entry = layers.get(id(tensor))
        if entry is None:
            new_inputs.append(tensor)
            specs.append(InputSpec(name, tuple(None for _ in tensor.shape), _dtype(tensor)))
            continue
        layer, node = entry
        out = node_tensors(node, "output_tensors")[0]
        onnx_name = name if keys else f"{name}_ids"  # a dict model is called by its keys
        texts.append(_text_input(name, layer, onnx_name))
        new_inputs.append(out)
        specs.append(InputSpec(onnx_name, tuple(None for _ in out.shape), _dtype(out)))
    kind = DICT if keys else (LIST if isinstance(structure, (list, tuple)) else SINGLE)
    arg: Any = dict(zip(keys, new_inputs, strict=True)) if keys else (new_inputs if kind == LIST else new_inputs[0])
    outputs = model.outputs if len(model.outputs) > 1 else model.outputs[0]
    sub = keras.Model(arg, outputs, name=f"{model.name}_from_ids")
    warnings = [f"input {t.input!r} feeds TextVectorization {t.layer!r}, whose string ops onnxruntime cannot run: "
                f"the ONNX model takes its token ids as {t.onnx_input!r}; "
                + ("bridge.text.TextPipeline.from_table(table) gives Keras's ids" if t.settings else
                   f"its settings cannot be reproduced ({t.problem})") for t in texts]
    return replace(loaded, model=sub), Signature(tuple(specs), kind), texts, warnings


def _text_input(name: str, layer: Any, onnx_name: str) -> TextInput:
    try:
        return TextInput(input=name, layer=str(layer.name), onnx_input=onnx_name, settings=text_settings(layer))
    except UnsupportedError as exc:
        return TextInput(input=name, layer=str(layer.name), onnx_input=onnx_name, settings=None, problem=str(exc))


def _dtype(tensor: Any) -> str:
    raw = getattr(tensor, "dtype", "")
    return str(getattr(raw, "name", raw))
