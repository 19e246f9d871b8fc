"""Keras ``Embedding`` -> ``torch.nn.Embedding``: the weight transfer users do by hand, with a report.

    from converters.torch import keras_to_torch
    emb, report = keras_to_torch(model.get_layer("tok_emb"))
    print(report.to_text())        # mask_zero, negative ids, quantization, dtype policy, ...

TensorFlow/Keras and torch are imported inside the functions only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bridge.errors import InputError
from bridge.table import EmbeddingTable
from converters.semantics import SemanticsReport, keras_layer_semantics, table_semantics
from converters.torch_embedding import to_torch_embedding

_CHUNK = 1 << 16


def keras_to_torch(layer_or_table: Any, *, trainable: bool | None = None) -> tuple[Any, SemanticsReport]:
    """A ``torch.nn.Embedding`` holding the values a Keras ``Embedding`` serves, and what does not carry over.

    ``layer_or_table`` is a built ``keras.layers.Embedding`` or an :class:`EmbeddingTable` extracted
    from a Keras model (its metadata tells which differences apply). For a layer, the weight is
    ``layer.embeddings`` (LoRA folded in) in the variable dtype; a quantized layer (int8, int4, ...),
    and a LoRA layer under mixed precision (which adds its LoRA term in the compute dtype), is read by
    calling the layer itself on every id, so ``emb(ids)`` equals ``layer(ids)`` bit for bit. The module
    owns a copy of the values; ``padding_idx`` is never set (a ``mask_zero`` layer has a mask, not a
    padding row). ``trainable`` defaults to the layer's own flag (False for a
    table).
    """
    if isinstance(layer_or_table, EmbeddingTable):
        table = layer_or_table
        report = table_semantics(table)
        return to_torch_embedding(table, trainable=bool(trainable), copy=True), report
    layer = _check_layer(layer_or_table)
    weight = keras_weight(layer)
    report = keras_layer_semantics(layer, weight_dtype=str(weight.dtype))
    table = EmbeddingTable(name=str(layer.name), data=weight)
    keep = bool(layer.trainable) if trainable is None else trainable
    return to_torch_embedding(table, trainable=keep, copy=True), report


def _check_layer(layer: Any) -> Any:
    from converters.keras_env import import_keras

    _, keras = import_keras()
    if not isinstance(layer, keras.layers.Embedding):
        raise InputError(f"keras_to_torch takes a keras.layers.Embedding or an EmbeddingTable, "
                         f"not {type(layer).__name__}")
    if not layer.built:
        raise InputError(f"Keras layer {layer.name!r} is not built; call it once or build it "
                         "(layer.build((None,))) before transferring its weights")
    return layer


def keras_weight(layer: Any) -> np.ndarray:
    """The rows ``layer`` serves, as a NumPy array: ``layer.embeddings`` or, for a quantized layer and for
    LoRA under mixed precision, the layer's own output for ids ``0 .. rows-1`` (its dequantization, or its
    LoRA sum computed in the compute dtype, exactly: ``layer.embeddings`` adds the LoRA term in float32)."""
    from converters.keras_env import import_keras

    _, keras = import_keras()
    mixed_lora = getattr(layer, "lora_enabled", False) and layer.compute_dtype != layer.variable_dtype
    if not getattr(layer, "quantization_mode", None) and not mixed_lora:
        return np.array(keras.ops.convert_to_numpy(layer.embeddings), copy=True)
    rows = int(layer.input_dim)
    parts = [np.asarray(keras.ops.convert_to_numpy(layer(np.arange(start, min(rows, start + _CHUNK), dtype="int32"))))
             for start in range(0, rows, _CHUNK)]
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


__all__ = ["keras_to_torch", "keras_weight"]
