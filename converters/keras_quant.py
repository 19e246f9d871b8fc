"""Quantized Keras Embedding layers (``layer.quantize("int8" | "int4")``) against what the ONNX model holds.

tf2onnx writes a quantized layer's table as an integer initializer (int4 already unpacked to int8,
equal to ``layer.embeddings``) and the dequantization as ONNX ops after the Gather;
:func:`bridge.quantization_onnx.quantization_from_ref` reads the scale / zero point from the model.
Here the parameters are checked against the layer's own weights, by value:

=====================  =====================================  ===============================
Keras                  layer weights                          bridge scheme
=====================  =====================================  ===============================
int8                   ``_embeddings`` int8, ``embeddings_scale`` [V]     ``row_div``
int4, block_size -1    packed ``_embeddings``, ``embeddings_scale`` [V]   ``row_div``
int4, block_size B     + ``embeddings_zero`` int8 [V, G], ``g_idx``       ``group_affine``, group_size B
=====================  =====================================  ===============================

(``layer.quantize("int4")`` without a config uses ``block_size=128``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bridge.quantization import Quantization
from converters.keras_env import import_keras, to_numpy
from converters.keras_map import same_bytes


def integer_table(layer: Any) -> Any:
    """The integer table a quantized layer gathers from: ``_embeddings`` (int8), unpacked for int4.

    Equal to ``layer.embeddings`` unless LoRA is enabled (then that is the float sum).
    """
    if getattr(layer, "quantization_mode", None) == "int4":
        _, keras = import_keras()
        return keras.quantizers.unpack_int4(layer._embeddings, layer._orig_output_dim, axis=-1)
    return layer._embeddings


def expected_scheme(layer: Any) -> tuple[str, int | None] | None:
    """``(scheme, group_size)`` the layer's quantization mode computes with; None if it is not quantized."""
    mode = getattr(layer, "quantization_mode", None)
    if mode == "int8":
        return "row_div", None
    if mode == "int4":
        block = getattr(layer, "_int4_block_size", None)
        if block in (None, -1):
            return "row_div", None
        return "group_affine", min(int(block), int(layer.output_dim))  # a block past the last column: one group
    return None


def quantization_problems(name: str, quant: Quantization | None, layers: Sequence[Any]) -> list[str]:
    """Warnings where ``quant`` (read from the ONNX model) is not what a source layer computes with."""
    problems = []
    for layer in layers:
        expected = expected_scheme(layer)
        if expected is None:
            if quant is not None:
                problems.append(f"table {name!r} is dequantized ({quant.scheme}) in the ONNX model, but its Keras "
                                f"layer {layer.name!r} is not quantized")
            continue
        mode = layer.quantization_mode
        if quant is None:
            problems.append(f"Keras layer {layer.name!r} is quantized ({mode}) but no dequantization of table "
                            f"{name!r} was found in the ONNX model: lookups serve its raw integers")
            continue
        if getattr(layer, "lora_enabled", False):
            problems.append(f"Keras layer {layer.name!r} is quantized ({mode}) with LoRA enabled: Keras adds the "
                            f"LoRA term after dequantizing, table {name!r} serves the dequantized rows without it")
        why = _mismatch(quant, layer, expected)
        if why:
            problems.append(f"table {name!r}: the ONNX model's dequantization differs from Keras layer "
                            f"{layer.name!r} ({mode}): {why}")
    return problems


def _mismatch(quant: Quantization, layer: Any, expected: tuple[str, int | None]) -> str:
    scheme, group_size = expected
    if (quant.scheme, quant.group_size) != (scheme, group_size):  # from g_idx: at most the table's dim
        return f"scheme {quant.scheme} (group_size {quant.group_size}), Keras computes {scheme} ({group_size})"
    if not same_bytes(keras_scale(layer), quant.scale):
        return "the scale differs from layer.embeddings_scale"
    zero = getattr(layer, "embeddings_zero", None) if scheme == "group_affine" else None
    if zero is not None and (quant.zero_point is None or not same_bytes(to_numpy(zero), quant.zero_point)):
        return "the zero point differs from layer.embeddings_zero"
    return ""


def keras_scale(layer: Any) -> np.ndarray:
    """``layer.embeddings_scale`` as the layer computes with it: a float variable read inside ``call`` is cast to
    the layer's compute dtype (autocast: float16 under ``mixed_float16``), which tf2onnx folds into the model."""
    variable = layer.embeddings_scale
    stored, compute = str(variable.dtype), str(getattr(layer, "compute_dtype", "") or "")
    if "float" in stored and "float" in compute and stored != compute and getattr(variable, "autocast", True):
        _, keras = import_keras()
        return to_numpy(keras.ops.cast(variable, compute))
    return to_numpy(variable)
