"""Fixes from the Keras converter review, each on a tiny model converted for real (TensorFlow, tf2onnx).

* a position table looked up with constant ids (keras.io's float ``Input(shape=(maxlen,))``, static length):
  on the large-table path it is kept whole in the skeleton (TensorFlow would fold rows of the small stand-in
  into model.onnx), in memory and streamed from a ``.keras`` file; folded whole (``maxlen == rows``) it is
  still found and stored; parity names the constant the rows were folded into;
* a recurrent layer's ``Loop`` is no "invalid ONNX model", while a real problem in its body still is;
* a quantized layer with LoRA: its int8 table keeps the layer's name, the unmapped LoRA factor does not take it;
* a small ``.keras`` file whose layout cannot be streamed converts without a Python warning; on the large
  path the fallback is one conversion warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from test_keras_corrupt_files import _run  # the CLI runner of test_keras_corrupt_files.py
from test_keras_large import ATOL, RTOL, run_onnx  # the large-path helpers of test_keras_large.py

from bridge.store_parity import store_parity
from converters.keras import convert, prepare
from converters.keras_onnx import check_problem
from converters.keras_parity import conversion_parity
from converters.keras_quant import integer_table

MAXLEN = 12


@pytest.fixture(scope="module")
def position_layers(kmodels: Any) -> tuple[Any, Any]:
    """``Positions`` (``arange(length)`` of its input) and ``AddPositions`` (``a + b``), registered for saving."""
    k = kmodels.keras

    @k.saving.register_keras_serializable(package="review_fixes")
    class Positions(k.layers.Layer):
        def call(self, x: Any) -> Any:
            return k.ops.arange(0, k.ops.shape(x)[-1])

    @k.saving.register_keras_serializable(package="review_fixes")
    class AddPositions(k.layers.Layer):
        def call(self, a: Any, b: Any) -> Any:
            return a + b

    return Positions, AddPositions


def position_model(kmodels: Any, layers: tuple[Any, Any], pos_rows: int) -> Any:
    """keras.io's token + position embedding: float ids of static length -> tok(ids) + pos(arange) -> Dense."""
    k = kmodels.keras
    positions, add = layers
    kmodels.seed(0)
    ids = k.Input((MAXLEN,), name="ids")  # float32, as in the keras.io tutorials
    tok, pos = k.layers.Embedding(300, 8, name="tok"), k.layers.Embedding(pos_rows, 8, name="pos")
    x = add(name="add_pos")(tok(ids), pos(positions(name="positions")(ids)))
    return k.Model(ids, k.layers.Dense(2, name="head")(k.layers.GlobalAveragePooling1D(name="mean")(x)), name="tpe")


def float_ids(rows: int = 300) -> np.ndarray:
    return np.random.default_rng(0).integers(0, rows, (2, MAXLEN)).astype(np.float32)


def assert_tables_are_the_layers(result: Any, model: Any, names: tuple[str, ...]) -> None:
    """Each store table ``names[i]`` equals ``model``'s layer of that name, bit for bit."""
    assert sorted(result.store) == sorted(names)
    for name in names:
        weight = np.asarray(model.get_layer(name).embeddings)
        data = np.asarray(result.store[name].data)
        assert data.dtype == weight.dtype and data.shape == weight.shape and data.tobytes() == weight.tobytes()


def onnx_model_row(report: Any, table: str) -> Any:
    (row,) = [c for c in report.comparisons if c.table == table and c.backend == "onnx-model"]
    return row


# ----------------------------------------------------------------------------- 1. the large path, folded positions


def check_large_fold(result: Any, model: Any) -> None:
    """pos kept whole (not shrunk), tok external; both stored as the layers; model.onnx serves what Keras does."""
    info = result.provenance["large_tables"]
    assert "threshold" in info["reason"] and set(info["tables"]) == {"tok"}
    assert info["kept_whole"] == {"pos": {"layers": ["pos"], "rows": 40}}
    assert_tables_are_the_layers(result, model, ("tok", "pos"))
    assert any("'pos'" in w and "kept it whole in the skeleton" in w for w in result.warnings)
    assert any("truncated to 12 of 40 rows" in w for w in result.warnings)
    (got,) = run_onnx(result.onnx_path, float_ids()).values()
    np.testing.assert_allclose(got, np.asarray(model(float_ids())), atol=ATOL, rtol=RTOL)


def test_large_path_keeps_a_constant_folded_position_table_whole(kmodels: Any, position_layers: tuple[Any, Any],
                                                                   tmp_path: Path) -> None:
    model = position_model(kmodels, position_layers, 40)
    result = convert(model, tmp_path / "s", large_threshold=1000)
    check_large_fold(result, model)
    report = conversion_parity(result, backends=("numpy",))
    assert report, report.to_text()
    row = onnx_model_row(report, "pos")  # 2. the skip reason names the folded constant, not an empty name
    initializer = result.store["pos"].metadata["truncated_in_onnx"]["initializer"]
    assert row.skipped and "''" not in row.detail and repr(initializer) in row.detail


def test_streamed_large_path_keeps_a_constant_folded_position_table_whole(
        kmodels: Any, position_layers: tuple[Any, Any], tmp_path: Path) -> None:
    model = position_model(kmodels, position_layers, 40)
    path = tmp_path / "tpe.keras"
    model.save(path)
    result = convert(path, tmp_path / "s", large_threshold=1000)
    assert "streamed" in result.provenance["large_tables"]
    check_large_fold(result, model)


# ----------------------------------------------------------------------------- 2. a position table folded whole


def test_position_table_folded_whole_is_found_and_stored(kmodels: Any, position_layers: tuple[Any, Any],
                                                         tmp_path: Path) -> None:
    model = position_model(kmodels, position_layers, MAXLEN)  # static length == the table's rows
    result = convert(model, tmp_path / "s")
    assert_tables_are_the_layers(result, model, ("tok", "pos"))
    folded = result.store["pos"].metadata["truncated_in_onnx"]
    assert (folded["rows"], folded["of"], folded["read_by"]) == (MAXLEN, MAXLEN, ["Add"])
    (warning,) = [w for w in result.warnings if "'pos'" in w]
    assert "has no lookup in the ONNX model" in warning and f"all {MAXLEN} rows" in warning
    assert repr(folded["initializer"]) in warning and "\n" not in warning
    for report in (conversion_parity(result, backends=("numpy",)),
                   store_parity(result.store.path, backends=("numpy",))):  # embridge parity STORE: the same reason
        assert report, report.to_text()
        row = onnx_model_row(report, "pos")
        assert row.skipped and repr(folded["initializer"]) in row.detail and "''" not in row.detail


# ----------------------------------------------------------------------------- 3. Loop nodes


def test_recurrent_layer_is_no_invalid_model_but_a_broken_loop_body_is(kmodels: Any) -> None:
    k = kmodels.keras
    kmodels.seed(0)
    ids = k.Input((None,), dtype="int64", name="ids")
    vectors = k.layers.Embedding(20, 4, mask_zero=True, name="mz")(ids)
    conv = prepare(k.Model(ids, k.layers.GRU(3, name="gru")(vectors), name="rnn"))
    assert not [w for w in conv.warnings if "invalid" in w], conv.warnings
    ort.InferenceSession(conv.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    loop = next(n for n in conv.onnx_model.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    body.node[0].input[0] = "undefined_tensor"
    problem = check_problem(conv.onnx_model)
    assert problem is not None and "undefined_tensor" in problem and "\n" not in problem


# ----------------------------------------------------------------------------- 4. names of quantized + LoRA tables


def test_quantized_lora_table_keeps_its_layer_name(kmodels: Any) -> None:
    k = kmodels.keras
    kmodels.seed(0)
    ids = k.Input((None,), dtype="int32", name="ids")
    emb = k.layers.Embedding(40, 8, name="tok")
    model = k.Model(ids, k.layers.Dense(2, name="head")(k.layers.GlobalAveragePooling1D(name="mean")(emb(ids))))
    emb.quantize("int8")
    emb.enable_lora(2)
    rng = np.random.default_rng(1)
    emb.lora_embeddings_a.assign(rng.standard_normal((40, 2)).astype("float32"))
    emb.lora_embeddings_b.assign(rng.standard_normal((2, 8)).astype("float32"))
    tables = {t.name: t for t in prepare(model).tables}
    assert sorted(tables) == ["tok", "tok_unmapped"]
    table, weight = tables["tok"], np.asarray(integer_table(emb))
    assert [s.layer for s in table.sources] == ["tok"]
    assert table.data.dtype == weight.dtype == np.int8 and table.data.tobytes() == weight.tobytes()
    assert tables["tok_unmapped"].sources == () and tables["tok_unmapped"].shape == (40, 2)


# ----------------------------------------------------------------------------- 5. the stream fallback


@pytest.fixture(scope="module")
def bidirectional_file(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-row Embedding and a Bidirectional GRU (sub-layers: a layout the stream reader does not map)."""
    k = kmodels.keras
    kmodels.seed(0)
    ids = k.Input((None,), dtype="int64", name="ids")
    x = k.layers.Bidirectional(k.layers.GRU(2), name="bidirectional")(k.layers.Embedding(40, 4, name="tok")(ids))
    path = tmp_path_factory.mktemp("bidi") / "bidi.keras"
    k.Model(ids, x, name="bidi").save(path)
    return path


def test_small_unstreamable_file_converts_without_a_warning(bidirectional_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _run(["convert", str(bidirectional_file), "-o", str(tmp_path / "s"), "--no-parity"], capsys)
    assert code == 0, err
    assert "cannot stream" not in out + err and "UserWarning" not in err
    assert not [w for w in caught if "cannot stream" in str(w.message)]


def test_unstreamable_file_on_the_large_path_is_one_warning_line(bidirectional_file: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _run(["convert", str(bidirectional_file), "-o", str(tmp_path / "s"), "--no-parity",
                               "--large"], capsys)
    assert code == 0, err
    assert not [w for w in caught if "cannot stream" in str(w.message)] and "UserWarning" not in err
    lines = [line for line in (out + err).splitlines() if "cannot stream" in line]  # the conversion's warnings
    assert len(lines) == 1 and lines[0].startswith(f"warning: {str(bidirectional_file)!r}: cannot stream")
