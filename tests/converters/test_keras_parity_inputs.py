"""Whole-model parity feeds Keras and onnxruntime by input name, derives inputs from the conversion's
signature (subclassed models), and reports a model onnxruntime cannot load or run as a skipped row.

tf2onnx lists a model's inputs sorted by name, so a model whose inputs are not in name order shows
whether they are paired by name or by position. The module is imported as ``kp`` and its new names
are read inside the tests, so that the file also runs against an older ``keras_parity``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import converters.keras_parity as kp
from bridge.errors import ParityError
from bridge.parity import ParityReport
from converters.keras import ConversionResult, convert
from converters.keras_parity import conversion_parity, model_comparisons

WHOLE = "(whole model)"


def whole_rows(report: ParityReport) -> list[Any]:
    return [c for c in report.comparisons if c.table == WHOLE]


def onnx_input_names(path: Path) -> list[str]:
    import onnxruntime as ort

    return [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]


def unsorted_inputs(keras: Any, rows: int = 9) -> Any:
    """Inputs ``b_ids`` then ``a_ids`` (tf2onnx lists them as ``a_ids, b_ids``) through different tables."""
    keras.utils.set_random_seed(12)
    b_ids = keras.Input((None,), dtype="int32", name="b_ids")
    a_ids = keras.Input((None,), dtype="int32", name="a_ids")
    pool = keras.layers.GlobalAveragePooling1D
    left = pool()(keras.layers.Embedding(rows, 4, name="b_emb")(b_ids))
    right = pool()(keras.layers.Embedding(rows, 4, name="a_emb")(a_ids))
    out = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([left, right]))
    return keras.Model([b_ids, a_ids], out, name="unsorted")


@pytest.fixture(scope="module")
def unsorted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ConversionResult]:
    model = unsorted_inputs(kmodels.keras)
    return model, convert(model, tmp_path_factory.mktemp("unsorted") / "store")


# ----------------------------------------------------------------------------- inputs paired by name


def test_inputs_out_of_name_order_are_fed_by_name(unsorted: tuple[Any, ConversionResult]) -> None:
    model, result = unsorted
    assert [t.name for t in model.inputs] == ["b_ids", "a_ids"]
    assert onnx_input_names(result.onnx_path) == ["a_ids", "b_ids"]  # the order that made position wrong
    report = conversion_parity(result, backends=("numpy",))
    assert [c.case for c in whole_rows(report)] == ["output head"]
    assert report, report.to_text()


def test_given_inputs_are_paired_by_name_in_any_order(unsorted: tuple[Any, ConversionResult]) -> None:
    model, result = unsorted
    b = np.array([[1, 2, 3], [8, 0, 4]], np.int32)
    a = np.array([[5, 5, 7], [0, 6, 1]], np.int32)
    rows = model_comparisons(model, result.onnx_path, {"a_ids": a, "b_ids": b})
    assert [(c.case, c.passed) for c in rows] == [("output head", True)], rows
    expected = np.asarray(model([b, a]))
    assert not np.allclose(expected, np.asarray(model([a, b])), atol=1e-4)  # swapping the inputs shows


def test_given_inputs_with_unknown_names_are_refused(unsorted: tuple[Any, ConversionResult]) -> None:
    model, result = unsorted
    ids = np.zeros((1, 2), np.int32)
    with pytest.raises(ParityError, match="cannot pair.*b_ids.*a_ids"):
        model_comparisons(model, result.onnx_path, {"x": ids, "y": ids})


def test_large_path_feeds_by_name(kmodels: Any, tmp_path: Path) -> None:
    # tables over SKELETON_ROWS rows (17) go to the large path
    result = convert(unsorted_inputs(kmodels.keras, rows=40), tmp_path / "store", large=True)
    assert "large_tables" in result.provenance
    assert onnx_input_names(result.onnx_path) == ["a_ids", "b_ids"]
    report = conversion_parity(result, backends=("numpy",))
    assert [c.case for c in whole_rows(report)] == ["output head"]
    assert report, report.to_text()


def test_pair_names_by_name_suffix_dtype_and_the_one_left() -> None:
    pair = kp.pair_names
    assert pair({"b": "int32", "a": "int32"}, {"a:0": "int32", "b:0": "int32"}, "k", "o") == {"b": "b:0", "a": "a:0"}
    assert pair({"x": "int32", "y": "string"}, {"s": "string", "i": "int32"}, "k", "o") == {"x": "i", "y": "s"}
    assert pair({"x": "int64"}, {"ids": "int32"}, "k", "o") == {"x": "ids"}
    with pytest.raises(ParityError, match="cannot pair k.*with o"):
        pair({"x": "int32", "y": "int32"}, {"p": "int32", "q": "int32"}, "k", "o")  # same dtypes: ambiguous
    with pytest.raises(ParityError, match="cannot pair"):
        pair({"x": "int32"}, {"x": "int32", "extra": "int32"}, "k", "o")


# ----------------------------------------------------------------------------- onnxruntime cannot run it


def skipped_rows(report: ParityReport) -> list[Any]:
    return [c for c in whole_rows(report) if c.case == "skipped"]


def test_model_onnxruntime_cannot_load_is_a_skipped_row(kmodels: Any, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    result = convert(kmodels.integer_lookup(), tmp_path / "out")  # IntegerLookup keeps TF's HashTableV2
    with caplog.at_level(logging.WARNING, logger="converters.keras_parity"):
        report = conversion_parity(result, backends=("numpy",))
    assert report, report.to_text()
    (row,) = whole_rows(report)
    assert row.case == "skipped" and row.passed and row.total == 0
    assert row.detail.startswith("skipped: the whole-model check could not run: ")
    assert "HashTableV2" in row.detail and "\n" not in row.detail
    assert any(c.table == "code_emb" and c.reference == "numpy.take" for c in report.comparisons)
    notes = [r.getMessage() for r in caplog.records if r.name == "converters.keras_parity"]
    assert len(notes) == 1 and "could not run" in notes[0] and "\n" not in notes[0]


def test_invalid_onnx_model_is_a_skipped_row(kmodels: Any, tmp_path: Path) -> None:
    # StringLookup -> two Embeddings -> Concatenate: tf2onnx writes a Concat without its axis
    result = convert(kmodels.string_lookup_concat(), tmp_path / "out")
    report = conversion_parity(result, backends=("numpy",))
    assert report, report.to_text()
    (row,) = skipped_rows(report)
    assert "axis" in row.detail
    assert {c.table for c in report.comparisons} == {"emb_a", "emb_b", WHOLE}


def test_model_onnxruntime_cannot_run_is_a_skipped_row(kmodels: Any, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["ids", "shape"], ["out"])], "bad",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [None, None])],
        [helper.make_tensor_value_info("out", TensorProto.INT32, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [5])],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    path = tmp_path / "bad.onnx"
    onnx.save(model_proto, path)
    rows = model_comparisons(kmodels.functional(), path, {"ids": np.zeros((3, 7), np.int32)})
    assert [(c.case, c.passed) for c in rows] == [("skipped", True)]
    assert "Reshape" in rows[0].detail and "\n" not in rows[0].detail


def test_cli_convert_exits_0_and_keeps_the_store(kmodels: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    source = tmp_path / "ints.keras"
    kmodels.integer_lookup().save(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "the whole-model check could not run" in captured.out
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()


# ----------------------------------------------------------------------------- subclassed models


def test_subclassed_model_takes_its_inputs_from_the_signature(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.subclassed()
    result = convert(model, tmp_path / "out", input_signature={"ids": "int32"})
    sample = kp.sample_inputs(model, result.store, signature=kp.conversion_signature(result))
    assert list(sample) == ["ids"] and sample["ids"].shape == (3, 7) and sample["ids"].dtype == np.int32
    report = conversion_parity(result, backends=("numpy",))
    assert [c.case for c in whole_rows(report)] == ["output output"]
    assert report, report.to_text()


def test_subclassed_model_called_with_a_dict(kmodels: Any, tmp_path: Path) -> None:
    k: Any = kmodels.keras
    k.utils.set_random_seed(13)

    class TwoTables(k.Model):
        def __init__(self) -> None:
            super().__init__(name="two_tables")
            self.b_emb, self.a_emb = k.layers.Embedding(6, 3, name="b_emb"), k.layers.Embedding(6, 3, name="a_emb")
            self.head = k.layers.Dense(2, name="head")

        def call(self, feed: Any) -> Any:
            both = k.ops.concatenate([self.b_emb(feed["b_ids"]), self.a_emb(feed["a_ids"])], axis=-1)
            return self.head(k.ops.mean(both, axis=1))

    result = convert(TwoTables(), tmp_path / "out", input_signature={"b_ids": "int32", "a_ids": "int32"})
    assert onnx_input_names(result.onnx_path) == ["a_ids", "b_ids"]
    report = conversion_parity(result, backends=("numpy",))
    assert [c.case for c in whole_rows(report)] == ["output output"]
    assert report, report.to_text()
