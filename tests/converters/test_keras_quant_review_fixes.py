"""Quantized Keras layers from the quantization review, converted for real (TensorFlow, tf2onnx):

* two int8 layers whose int8 codes coincide (tf2onnx merges them into one table read with two scales) are
  refused, not served with the first layer's scale;
* an int8 layer under ``mixed_bfloat16`` (dequantized in bfloat16) is refused, not stored as raw integers;
* an int4 layer under ``mixed_float16`` converts without a false "scale differs" warning, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_keras_quantized import BACKENDS, _keras  # the helpers of test_keras_quantized.py

from bridge.backends import lookup
from bridge.errors import UnsupportedError
from converters.keras import convert

V, D = 50, 12


def _layers(kmodels: Any, count: int, dtype: str | None = None) -> tuple[Any, list[Any]]:
    """ids -> ``count`` Embedding layers (one output each), weights ``w``, ``2 * w``, ..."""
    k = kmodels.keras
    kmodels.seed(0)
    ids = k.Input((None,), dtype="int32", name="ids")
    layers = [k.layers.Embedding(V, D, name=f"emb{i}", **({"dtype": dtype} if dtype else {})) for i in range(count)]
    model = k.Model(ids, [layer(ids) for layer in layers] if count > 1 else layers[0](ids))
    weights = np.random.default_rng(0).standard_normal((V, D)).astype("float32") * 3
    for i, layer in enumerate(layers):
        layer.embeddings.assign(weights * (i + 1))
    return model, layers


def test_int8_layers_sharing_their_codes_are_refused(kmodels: Any, tmp_path: Path) -> None:
    model, layers = _layers(kmodels, 2)
    for layer in layers:
        layer.quantize("int8")
    assert np.array_equal(np.asarray(layers[0]._embeddings), np.asarray(layers[1]._embeddings))
    with pytest.raises(UnsupportedError, match="dequantized two ways") as info:
        convert(model, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_int8_layer_under_mixed_bfloat16_is_refused(kmodels: Any, tmp_path: Path) -> None:
    model, (layer,) = _layers(kmodels, 1, "mixed_bfloat16")
    layer.quantize("int8")
    with pytest.raises(UnsupportedError, match="bfloat16") as info:
        convert(model, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_int4_layer_under_mixed_float16_has_no_false_warning(kmodels: Any, tmp_path: Path) -> None:
    model, (layer,) = _layers(kmodels, 1, "mixed_float16")
    layer.quantize("int4", config=kmodels.keras.quantizers.Int4QuantizationConfig(block_size=5))
    result = convert(model, tmp_path / "out")
    assert result.warnings == []
    (table,) = result.tables
    ids = np.arange(V)
    expected = _keras(layer, ids.astype(np.int32))
    assert expected.dtype == np.float16
    for backend in BACKENDS:
        assert lookup(table, backend)(ids).tobytes() == expected.tobytes(), backend
