"""Model files: .keras (safe mode), legacy .h5, SavedModel directories, and bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.errors import InputError, ModelFormatError
from bridge.store import open_store
from converters.keras import ConversionResult, convert, embedding_layers, keras_embedding_outputs

ATOL, RTOL = 1e-6, 1e-5
IDS = np.array([[1, 2, 3], [4, 0, 5]], np.int32)


def run_onnx(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def assert_tables_equal_layers(result: ConversionResult, original: Any, by_name: bool = False) -> None:
    """Every Embedding of ``original`` is a table byte-equal to its weights, sourced to its path (or name)."""
    by_layer = {s.layer: t for t in result.tables for s in t.sources}
    for path, layer in embedding_layers(original).items():
        expected = layer.embeddings.numpy()
        table = by_layer[layer.name if by_name else path]
        assert table.data.dtype == expected.dtype
        assert np.array_equal(table.data, expected)


@pytest.fixture(scope="module")
def functional(kmodels: Any) -> Any:
    return kmodels.functional("int32")


@pytest.fixture(scope="module")
def keras_file(functional: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    functional.save(path)
    return path


@pytest.fixture(scope="module")
def keras_result(keras_file: Path, tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    return convert(keras_file, tmp_path_factory.mktemp("keras_out") / "store")


def test_keras_file_tables_equal_the_saved_layers(keras_result: ConversionResult, functional: Any) -> None:
    assert_tables_equal_layers(keras_result, functional)
    assert [(t.name, [s.layer for s in t.sources]) for t in keras_result.tables] == [("tok_emb", ["tok_emb"])]


def test_keras_file_onnx_matches_the_original_model(keras_result: ConversionResult, functional: Any) -> None:
    (got,) = run_onnx(keras_result.onnx_path, {"ids": IDS})
    np.testing.assert_allclose(got, np.asarray(functional(IDS)), atol=ATOL, rtol=RTOL)


def test_keras_file_provenance_has_its_sha256(keras_result: ConversionResult, keras_file: Path) -> None:
    source = open_store(keras_result.store_path).manifest["provenance"]["source"]
    assert source["kind"] == "keras"
    assert source["path"] == str(keras_file)
    assert source["sha256"] == hashlib.sha256(keras_file.read_bytes()).hexdigest()


def test_keras_embedding_outputs_from_a_file(keras_file: Path, keras_result: ConversionResult) -> None:
    outs = keras_embedding_outputs(keras_file, {"tok_emb": IDS})
    assert np.array_equal(outs["tok_emb"], np.take(keras_result.tables[0].data, IDS, axis=0))


def test_h5_file(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.nested()
    path = tmp_path / "model.h5"
    model.save(path)
    result = convert(path, tmp_path / "out")
    assert_tables_equal_layers(result, model)
    assert sorted((t.name, s.layer) for t in result.tables for s in t.sources) == [
        ("outer_emb", "outer_emb"), ("tok_emb", "encoder/tok_emb")]
    (got,) = run_onnx(result.onnx_path, {"ids": IDS})
    np.testing.assert_allclose(got, np.asarray(model(IDS)), atol=ATOL, rtol=RTOL)
    assert result.provenance["source"]["kind"] == "h5"


def test_saved_model_directory(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.two_inputs()
    path = tmp_path / "saved"
    model.export(str(path), verbose=False)
    result = convert(path, tmp_path / "out")
    # tables map to the SavedModel's variables by value: "<layer>/embeddings"
    got = sorted((t.name, s.layer, s.weight) for t in result.tables for s in t.sources)
    assert got == [("char_emb", "char_emb", "char_emb/embeddings"), ("word_emb", "word_emb", "word_emb/embeddings")]
    assert_tables_equal_layers(result, model)
    feed = {"words": IDS, "chars": np.array([[6, 1]], np.int64)}
    session_out = dict(zip(["char_vec", "word_vec"], run_onnx(result.onnx_path, feed), strict=True))
    want = model(feed)
    for key in ("word_vec", "char_vec"):
        assert np.array_equal(session_out[key], np.asarray(want[key]))
    source = result.provenance["source"]
    assert source["kind"] == "saved_model" and len(source["sha256"]) == 64
    assert result.warnings == []


def test_saved_model_refuses_an_input_signature(kmodels: Any, tmp_path: Path) -> None:
    path = tmp_path / "saved"
    kmodels.sequential().export(str(path), verbose=False)
    with pytest.raises(InputError, match="serving signature"):
        convert(path, tmp_path / "out", input_signature={"x": "int64"})


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_needs_safe_mode_off(kmodels: Any, tmp_path: Path, suffix: str) -> None:
    model = kmodels.with_lambda()
    path = tmp_path / f"lam{suffix}"
    model.save(path)
    with pytest.raises(InputError, match="arbitrary code.*safe_mode=False"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if suffix == ".keras":
        result = convert(path, tmp_path / "out", safe_mode=False)
        (got,) = run_onnx(result.onnx_path, {"ids": IDS})
        assert np.array_equal(got, np.asarray(model(IDS)))
        assert_tables_equal_layers(result, model)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        convert(tmp_path / "nope.keras", tmp_path / "out")


@pytest.mark.parametrize("name", ["model.pt", "model.onnx", "model"])
def test_unknown_suffix_lists_supported_inputs(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=r"\.keras file, a legacy \.h5/\.hdf5 file, or a TensorFlow SavedModel"):
        convert(path, tmp_path / "out")


def test_directory_without_saved_model(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="not a SavedModel"):
        convert(tmp_path / "d", tmp_path / "out")


@pytest.mark.parametrize("name", ["bad.keras", "bad.h5"])
def test_corrupt_file_is_a_model_format_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not a model at all")
    with pytest.raises(ModelFormatError, match="could not load"):
        convert(path, tmp_path / "out")


def test_object_that_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot convert a builtins.dict"):
        convert({"a": 1}, tmp_path / "out")


def test_h5_that_keras_cannot_rebuild_says_how_to_fix(kmodels: Any, tmp_path: Path) -> None:
    # Keras 3 writes mask_zero -> pooling as a TensorFlow "NotEqual" op layer it cannot read back
    k = kmodels.keras
    ids = k.Input((None,), dtype="int32", name="ids")
    x = k.layers.Embedding(6, 2, mask_zero=True, name="tok_emb")(ids)
    model = k.Model(ids, k.layers.GlobalAveragePooling1D()(x))
    model.save(tmp_path / "masked.h5")
    with pytest.raises(ModelFormatError, match="re-save it as .keras"):
        convert(tmp_path / "masked.h5", tmp_path / "out")


def test_saved_model_with_a_string_lookup(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.string_lookup()
    path = tmp_path / "saved"
    model.export(str(path), verbose=False)
    result = convert(path, tmp_path / "out")
    # the SavedModel knows variable paths, not the nesting: "inner_emb", not "encoder/inner_emb"
    assert sorted(s.layer for t in result.tables for s in t.sources) == ["inner_emb", "tok_emb"]
    assert_tables_equal_layers(result, model, by_name=True)
    # no Keras layers: the vocabulary is recovered from the ONNX CategoryMapper instead
    assert all(t.vocab is not None and t.vocab.tokens == ["[UNK]", "red", "green", "blue"] and t.oov_id == 0
               for t in result.tables)
    tokens = np.array([["red", "nope", "blue"]], object)
    (got,) = run_onnx(result.onnx_path, {"tokens": tokens})
    assert np.array_equal(got, np.asarray(model(kmodels.tf.constant(tokens.astype(str)))))
