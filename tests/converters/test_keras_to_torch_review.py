"""keras_to_torch: LoRA under mixed precision served bit for bit, and the report of a store table says what its
metadata records (the compute dtype Keras casts to, LoRA, per-row int4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_keras_fidelity import global_policy  # sets Keras's global dtype policy for a block

from converters.keras import convert
from converters.torch import keras_to_torch


def _lora_layer(kmodels: Any, policy: str) -> Any:
    k = kmodels.keras
    kmodels.seed(0)
    layer = k.layers.Embedding(60, 24, dtype=policy, name="emb")
    layer.build((None,))
    layer.enable_lora(8)
    b = layer.lora_embeddings_b
    b.assign(np.random.default_rng(0).standard_normal(tuple(b.shape)).astype("float32"))
    return layer


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_lora_under_mixed_precision_is_served_bit_for_bit(kmodels: Any, policy: str) -> None:
    import torch

    layer = _lora_layer(kmodels, policy)
    emb, report = keras_to_torch(layer)
    ids = np.arange(60)
    want = np.asarray(kmodels.keras.ops.convert_to_numpy(layer(ids.astype("int32"))))
    got = emb(torch.from_numpy(ids)).detach()
    got_np = got.float().numpy().astype(want.dtype) if got.dtype == torch.bfloat16 else got.numpy()
    assert str(got.dtype).endswith(policy.split("_")[1]) and got_np.tobytes() == want.tobytes()
    assert {d.code for d in report.differences} == {"negative_ids", "lora"}


def _model(kmodels: Any, policy: str | None, lora: bool = False) -> Any:
    k = kmodels.keras
    kmodels.seed(1)
    with global_policy(k, policy):
        ids = k.Input((5,), dtype="int32", name="ids")
        layer = k.layers.Embedding(50, 8, name="tok_emb")
        out = k.layers.Dense(1, name="head")(k.layers.GlobalAveragePooling1D()(layer(ids)))
        model = k.Model(ids, out)
    if lora:
        layer.enable_lora(2)
    return model


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_store_report_says_keras_casts_the_rows(kmodels: Any, tmp_path: Path, policy: str) -> None:
    result = convert(_model(kmodels, policy), tmp_path / "s")
    table = result.store["tok_emb"]
    _, report = keras_to_torch(table)
    (diff,) = [d for d in report.differences if d.code == "dtype_policy"]
    assert policy.split("_")[1] in diff.keras and "float32" in diff.keras


def test_store_report_lists_lora(kmodels: Any, tmp_path: Path) -> None:
    result = convert(_model(kmodels, None, lora=True), tmp_path / "s")
    _, report = keras_to_torch(result.store["tok_emb"])
    assert "lora" in {d.code for d in report.differences}


def test_per_row_int4_report_gives_its_formula(kmodels: Any) -> None:
    k = kmodels.keras
    kmodels.seed(2)
    layer = k.layers.Embedding(30, 8, name="emb")
    layer.build((None,))
    layer.quantize("int4", config=k.quantizers.Int4QuantizationConfig(block_size=-1))
    _, report = keras_to_torch(layer)
    (diff,) = [d for d in report.differences if d.code == "quantized"]
    assert "int4 rows / per-row scale" in diff.keras and "zero point" not in diff.keras
