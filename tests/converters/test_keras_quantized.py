"""Quantized Keras Embeddings (``layer.quantize("int8" | "int4")``) through convert -> store -> lookup -> parity.

The store keeps the integer table (int4 unpacked to int8) with its scale / zero point; every backend
must return exactly what the Keras layer itself returns (``layer(ids)``), bit for bit, for every id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.backends import lookup
from bridge.cli import main
from bridge.errors import ChecksumError
from bridge.quantization import dense
from bridge.store import open_store
from bridge.store_parity import ONNX_REFERENCE
from converters.keras import ConversionResult, convert
from converters.keras_parity import conversion_parity

V, D = 61, 40
BACKENDS = ("numpy", "torch", "onnxruntime")
#: case -> (mode, int4 block_size or None for no config, expected scheme, expected group size)
CASES: dict[str, tuple[str, int | None, str, int | None]] = {
    "int8": ("int8", None, "row_div", None),
    "int4_per_row": ("int4", -1, "row_div", None),
    "int4_blocks": ("int4", 16, "group_affine", 16),  # 3 groups, the last one partial
    "int4_default": ("int4", None, "group_affine", D),  # Keras's default block_size=128 > D: one group
}


def build(kmodels: Any, case: str) -> tuple[Any, Any]:
    """ids -> quantized Embedding(tok_emb) -> Dense(head); returns (model, layer)."""
    k = kmodels.keras
    mode, block, _, _ = CASES[case]
    kmodels.seed(21)
    ids = k.Input((None,), dtype="int32", name="ids")
    layer = k.layers.Embedding(V, D, name="tok_emb", embeddings_initializer=k.initializers.RandomNormal(stddev=2.0))
    model = k.Model(ids, k.layers.Dense(3, name="head")(layer(ids)), name=f"quantized_{case}")
    config = None if block is None else k.quantizers.Int4QuantizationConfig(block_size=block)
    layer.quantize(mode, config=config)
    return model, layer


@pytest.fixture(scope="module")
def converted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[[str], tuple[ConversionResult, Any]]:
    """``case -> (conversion result, quantized layer)``, converted once per module."""
    cache: dict[str, tuple[ConversionResult, Any]] = {}

    def get(case: str) -> tuple[ConversionResult, Any]:
        if case not in cache:
            model, layer = build(kmodels, case)
            cache[case] = (convert(model, tmp_path_factory.mktemp(case) / "out"), layer)
        return cache[case]

    return get


def _keras(layer: Any, ids: np.ndarray) -> np.ndarray:
    return np.asarray(layer(ids))


@pytest.mark.parametrize("case", CASES)
def test_table_is_mapped_with_the_layers_scale_and_zero_point(case: str, converted: Any) -> None:
    result, layer = converted(case)
    (table,) = result.tables
    _, _, scheme, group_size = CASES[case]
    assert result.warnings == []
    assert table.name == "tok_emb" and [s.layer for s in table.sources] == ["tok_emb"]
    assert table.dtype == np.int8 and table.served_dtype == np.float32
    assert table.data.tobytes() == np.asarray(layer.embeddings).tobytes()  # int4: unpacked to int8
    quant = table.quantization
    assert quant is not None and (quant.scheme, quant.group_size) == (scheme, group_size)
    assert quant.scale.tobytes() == np.asarray(layer.embeddings_scale).tobytes()
    if scheme == "group_affine":
        assert quant.zero_point is not None
        assert quant.zero_point.tobytes() == np.asarray(layer.embeddings_zero).tobytes()
    assert table.metadata["keras_quantization"] == [CASES[case][0]]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_serves_the_layers_own_output(case: str, backend: str, converted: Any) -> None:
    result, layer = converted(case)
    fn = lookup(result.tables[0], backend, "wrap")
    rng = np.random.default_rng(3)
    for ids in (np.arange(V), rng.integers(0, V, (4, 9)), np.array([-1, -V, 0])):
        expected = _keras(layer, ids.astype(np.int32))
        got = fn(ids)
        assert got.dtype == expected.dtype == np.float32
        assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("case", CASES)
def test_dense_table_is_what_keras_serves(case: str, converted: Any) -> None:
    result, layer = converted(case)
    assert dense(result.tables[0]).tobytes() == _keras(layer, np.arange(V, dtype=np.int32)).tobytes()


@pytest.mark.parametrize("case", CASES)
def test_conversion_parity_passes_with_keras_and_the_onnx_model(case: str, converted: Any) -> None:
    result, _ = converted(case)
    report = conversion_parity(result)
    assert report, report.to_text()
    tables = {c.backend for c in report.comparisons if c.table == "tok_emb"}
    assert {*BACKENDS, "keras", ONNX_REFERENCE} <= tables


def test_flipped_scale_byte_is_a_checksum_error(converted: Any, tmp_path: Path) -> None:
    result, _ = converted("int4_blocks")
    entry = result.store.entry("tok_emb")
    for key in ("scale", "zero_point"):
        path = result.store_path / entry["quantization"][key]["file"]
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0x80]))
        try:
            with pytest.raises(ChecksumError, match=key):
                open_store(result.store_path)
        finally:
            path.write_bytes(original)
    open_store(result.store_path)


def test_embridge_parity_with_the_saved_keras_model(kmodels: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = build(kmodels, "int4_blocks")
    model.save(tmp_path / "model.keras")
    assert main(["convert", str(tmp_path / "model.keras"), "-o", str(tmp_path / "out"), "--no-parity"]) == 0
    capsys.readouterr()
    code = main(["parity", str(tmp_path / "out"), "--keras", str(tmp_path / "model.keras"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["passed"], doc
    assert {"keras", ONNX_REFERENCE, *BACKENDS} <= {c["backend"] for c in doc["comparisons"]}
