"""Whole-model parity pairs Keras and ONNX outputs by name (tf2onnx orders graph outputs by name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.keras import convert
from converters.keras_env import import_keras
from converters.keras_parity import conversion_parity


def _model(as_dict: bool):  # type: ignore[no-untyped-def]
    _, keras = import_keras()
    keras.utils.set_random_seed(5)
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    vec = keras.layers.Embedding(40, 6, name="emb")(ids)
    zeta = keras.layers.Dense(3, name="zeta")(keras.layers.GlobalAveragePooling1D()(vec))  # sorts last
    alpha = keras.layers.Dense(5, name="alpha")(vec)  # sorts first, different shape
    outputs = {"zeta": zeta, "alpha": alpha} if as_dict else [zeta, alpha]
    return keras.Model(ids, outputs, name="two_heads")


@pytest.mark.parametrize("as_dict", [False, True])
def test_outputs_in_non_sorted_order_pass(tmp_path: Path, as_dict: bool) -> None:
    result = convert(_model(as_dict), tmp_path / "out")
    report = conversion_parity(result, backends=("numpy",))
    model_rows = [c for c in report.comparisons if c.table == "(whole model)"]
    assert sorted(c.case for c in model_rows) == ["output alpha", "output zeta"]
    assert report, report.to_text()


def test_a_wrong_head_is_caught(tmp_path: Path) -> None:
    model = _model(False)
    result = convert(model, tmp_path / "out")
    dense = model.get_layer("zeta")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + np.float32(0.5)])  # Keras now differs from the converted model
    rows = [c for c in conversion_parity(result, backends=("numpy",)).comparisons if c.table == "(whole model)"]
    assert {c.case: c.passed for c in rows} == {"output alpha": True, "output zeta": False}
