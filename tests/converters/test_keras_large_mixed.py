"""The large-table path on a mixed-precision model loaded from a ``.keras`` file.

Loaded from a file, a mixed-precision model casts its whole float32 table to the compute dtype
before the Gather and tf2onnx folds that cast into the constant: the skeleton's placeholder is then
the pattern cast to float16 (or bfloat16). It must still be found, the store must hold the real
table as the ONNX model reads it (the Keras weight cast to the compute dtype), and the model must
read it from the store's file. Tiny model: Embedding(40, 4) -> mean -> float32 Dense.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_keras_fidelity import global_policy  # the fidelity tests' policy switch

from bridge.onnx_io import external_data_info
from converters.keras import ConversionResult, convert
from converters.keras_large import SKELETON_ROWS
from converters.keras_parity import conversion_parity

ROWS, DIM = 40, 4
POLICIES = ["mixed_float16", "mixed_bfloat16"]
BACKENDS = ("numpy", "onnxruntime")


def mixed_model(k: Any) -> Any:
    """Built under a mixed global policy: float32 table, pooled, float32 Dense head."""
    ids = k.Input((None,), dtype="int64", name="ids")
    x = k.layers.Embedding(ROWS, DIM, name="emb")(ids)
    x = k.layers.GlobalAveragePooling1D(name="mean")(x)
    return k.Model(ids, k.layers.Dense(2, dtype="float32", name="head")(x), name="mixed")


Converted = tuple[Any, ConversionResult, ConversionResult]


@pytest.fixture(scope="module")
def converted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Converted]:
    """``policy -> (loaded Keras model, large=True result, large=False result)``, converted once per policy."""
    cache: dict[str, Converted] = {}

    def get(policy: str) -> Converted:
        if policy not in cache:
            tmp = tmp_path_factory.mktemp(policy)
            with global_policy(kmodels.keras, policy):
                kmodels.seed(7)
                model = mixed_model(kmodels.keras)
            model.save(tmp / "m.keras")
            large = convert(tmp / "m.keras", tmp / "large", large=True)
            ordinary = convert(tmp / "m.keras", tmp / "ordinary", large=False)
            cache[policy] = (model, large, ordinary)
        return cache[policy]

    return get


def _table_initializer(path: Path, name: str) -> onnx.TensorProto:
    model = onnx.load(str(path), load_external_data=False)
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("policy", POLICIES)
def test_store_holds_the_real_table_cast_to_the_compute_dtype(
    converted: Callable[[str], Converted], policy: str
) -> None:
    model, result, _ = converted(policy)
    table = result.store["emb"]
    compute = policy.removeprefix("mixed_")
    weight = np.asarray(model.get_layer("emb").embeddings.numpy())
    assert weight.dtype == np.float32
    assert table.dtype.name == compute and tuple(table.data.shape) == (ROWS, DIM)
    assert table.data.tobytes() == weight.astype(table.dtype).tobytes()
    assert [s.layer for s in table.sources] == ["emb"]
    assert table.metadata["keras_variable_dtype"] == "float32" and table.metadata["keras_dtype_policy"] == policy
    assert table.metadata["skeleton_rows"] == SKELETON_ROWS
    record = result.provenance["large_tables"]["tables"]["emb"]
    assert record["rows"] == ROWS and record["skeleton_rows"] == SKELETON_ROWS
    assert record["wrap_constants_patched"] >= 1


@pytest.mark.parametrize("policy", POLICIES)
def test_model_reads_the_table_from_the_store_file(converted: Callable[[str], Converted], policy: str) -> None:
    _, result, _ = converted(policy)
    table = result.store["emb"]
    entry = next(e for e in result.store.manifest["tables"] if e["name"] == "emb")
    assert table.initializer is not None
    tensor = _table_initializer(result.onnx_path, table.initializer)
    assert tensor.data_location == onnx.TensorProto.EXTERNAL and list(tensor.dims) == [ROWS, DIM]
    assert tensor.data_type == onnx.helper.np_dtype_to_tensor_dtype(table.dtype)
    info = external_data_info(tensor)
    assert info is not None
    assert (info.location, info.offset, info.length) == (entry["file"], entry["data_offset"], entry["nbytes"])
    assert entry["nbytes"] == ROWS * DIM * 2


@pytest.mark.parametrize("policy", POLICIES)
def test_parity_passes_including_the_whole_model(converted: Callable[[str], Converted], policy: str) -> None:
    _, result, _ = converted(policy)
    report = conversion_parity(result, backends=BACKENDS)
    assert report, report.to_text()
    whole = [c for c in report.comparisons if c.table == "(whole model)"]
    assert whole and all(whole)
    keras_rows = [c for c in report.comparisons if c.table == "emb" and c.backend == "keras"]
    assert keras_rows and all(keras_rows) and all(c.tolerance is None for c in keras_rows)


@pytest.mark.parametrize("policy", POLICIES)
def test_ordinary_path_stores_the_same_table(converted: Callable[[str], Converted], policy: str) -> None:
    _, large, ordinary = converted(policy)
    table, expected = large.store["emb"], ordinary.store["emb"]
    assert "large_tables" not in ordinary.provenance
    assert expected.dtype == table.dtype and expected.data.tobytes() == table.data.tobytes()
    keras_meta = [{k: v for k, v in t.metadata.items() if k.startswith("keras")} for t in (expected, table)]
    assert keras_meta[0] == keras_meta[1]
    assert conversion_parity(ordinary, backends=BACKENDS)
