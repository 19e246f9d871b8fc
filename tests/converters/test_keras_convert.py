"""End-to-end: Keras model -> tf2onnx -> store, checked against Keras and onnxruntime.

Each model kind is converted once per module (``converted`` caches by case name). Tables must
equal ``layer.embeddings`` byte for byte and name the right layer(s); the ONNX model must give
Keras's outputs in onnxruntime: exactly where the output is the embedding itself, within
atol=1e-6, rtol=1e-5 where pooling, Add or Dense follow.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from bridge.errors import ConversionError, InputError, OutputExistsError, UnsupportedError
from bridge.store import open_store
from converters.keras import ConversionResult, convert, embedding_layers, keras_embedding_outputs, prepare

ATOL, RTOL = 1e-6, 1e-5
IDS = [[1, 2, 3], [4, 0, 5]]


@dataclass
class Case:
    """A model, the tables it must yield (name -> source layer paths), and a feed to compare outputs."""

    build: Callable[[Any], Any]
    tables: dict[str, list[str]]
    feed: dict[str, np.ndarray]
    structure: str = "single"
    exact: bool = False
    signature: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "functional": Case(lambda km: km.functional("int32"), {"tok_emb": ["tok_emb"]},
                       {"ids": np.array(IDS, np.int32)}),
    "sequential": Case(lambda km: km.sequential(), {"seq_emb": ["seq_emb"]},
                       {"input": np.array(IDS, np.int64)}, exact=True),
    "subclassed": Case(lambda km: km.subclassed(), {"sub_emb": ["block/sub_emb"]},
                       {"ids": np.array(IDS, np.int32)}, signature={"ids": "int32"}),
    "nested": Case(lambda km: km.nested(), {"tok_emb": ["encoder/tok_emb"], "outer_emb": ["outer_emb"]},
                   {"ids": np.array(IDS, np.int32)}),
    "two_inputs": Case(lambda km: km.two_inputs(), {"word_emb": ["word_emb"], "char_emb": ["char_emb"]},
                       {"words": np.array(IDS, np.int32), "chars": np.array([[6, 1]], np.int64)},
                       structure="dict", exact=True),
    "shared": Case(lambda km: km.shared(), {"shared_emb": ["shared_emb"]},
                   {"left": np.array(IDS, np.int64), "right": np.array([[7, 6, 5], [0, 1, 2]], np.int64)},
                   structure="list"),
    "twins": Case(lambda km: km.twins(), {"twin_a": ["twin_a", "twin_b"]}, {"ids": np.array(IDS, np.int32)},
                  exact=True),
    "mask_zero": Case(lambda km: km.mask_zero(), {"masked_emb": ["masked_emb"]},
                      {"ids": np.array([[1, 2, 0], [5, 0, 0]], np.int64)}, exact=True),
    "string_lookup": Case(lambda km: km.string_lookup(), {"tok_emb": ["tok_emb"], "inner_emb": ["encoder/inner_emb"]},
                          {"tokens": np.array([["red", "nope", "blue"], ["", "green", "red"]], object)}, exact=True),
}


@dataclass
class Converted:
    model: Any
    result: ConversionResult
    case: Case


@pytest.fixture(scope="module")
def converted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Converted]:
    """``converted(name)``: the case's model converted once per module into its own store."""
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            case = CASES[name]
            model = case.build(kmodels)
            out = tmp_path_factory.mktemp(name) / "store"
            cache[name] = Converted(model, convert(model, out, input_signature=case.signature), case)
        return cache[name]

    return get


def keras_outputs(kmodels: Any, model: Any, case: Case) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Keras's outputs for the case feed: a dict for dict outputs, else a list."""
    tf = kmodels.tf
    feed = {k: tf.constant(v.astype(str)) if v.dtype == object else v for k, v in case.feed.items()}
    if case.structure == "dict":
        arg: Any = feed
    elif case.structure == "list":
        arg = list(feed.values())
    else:
        arg = next(iter(feed.values()))
    out = model(arg)
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    return [np.asarray(v) for v in (out if isinstance(out, (list, tuple)) else [out])]


def run_onnx(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_every_embedding_layer_is_stored_byte_equal(converted: Callable[[str], Converted], name: str) -> None:
    conv = converted(name)
    layers = embedding_layers(conv.model)
    assert layers, "the case has Embedding layers"
    for path, layer in layers.items():
        expected = np.asarray(layer.embeddings.numpy())
        holding = [t for t in conv.result.tables if path in [s.layer for s in t.sources]]
        assert len(holding) == 1, f"{path} is the source of exactly one table"
        table = holding[0]
        assert table.data.dtype == expected.dtype
        assert table.data.shape == expected.shape
        assert np.array_equal(table.data, expected)
        assert table.data.tobytes() == expected.tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_tables_name_their_source_layers(converted: Callable[[str], Converted], name: str) -> None:
    conv = converted(name)
    got = {t.name: [s.layer for s in t.sources] for t in conv.result.tables}
    assert got == conv.case.tables
    for table in conv.result.tables:
        assert all(s.framework == "keras" and s.weight == f"{s.layer}/embeddings" for s in table.sources)
        assert table.padding_id is None
    rows = {r["table"]: r["source"] for r in conv.result.summary}
    assert rows == {k: ", ".join(v) for k, v in conv.case.tables.items()}
    assert conv.result.warnings == []


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_model_matches_keras(kmodels: Any, converted: Callable[[str], Converted], name: str) -> None:
    conv = converted(name)
    got = run_onnx(conv.result.onnx_path, conv.case.feed)
    want = keras_outputs(kmodels, conv.model, conv.case)
    if isinstance(want, dict):
        assert set(got) == set(want)
        pairs = [(got[k], want[k]) for k in want]
    else:
        assert len(got) == len(want)
        pairs = list(zip(got.values(), want, strict=True))
    for onnx_out, keras_out in pairs:
        assert onnx_out.shape == keras_out.shape
        if conv.case.exact:
            assert np.array_equal(onnx_out, keras_out)
        else:
            np.testing.assert_allclose(onnx_out, keras_out, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_store_on_disk_holds_model_and_tables(converted: Callable[[str], Converted], name: str) -> None:
    result = converted(name).result
    store = open_store(result.store_path)  # verifies every sha256
    assert sorted(store) == sorted(t.name for t in result.tables)
    assert "model.onnx" in store.manifest["files"]
    model = onnx.load(str(result.onnx_path))
    assert model.ir_version <= 10
    for table in result.tables:
        assert np.array_equal(store[table.name].data, table.data)
    assert store.manifest["provenance"]["tools"].keys() == {"tensorflow", "keras", "tf2onnx", "onnx"}


def test_onnx_inputs_keep_int32_and_int64(converted: Callable[[str], Converted]) -> None:
    types = {}
    for name in ("functional", "sequential", "two_inputs"):
        model = onnx.load(str(converted(name).result.onnx_path))
        types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    assert types == {"ids": onnx.TensorProto.INT32, "input": onnx.TensorProto.INT64,
                     "words": onnx.TensorProto.INT32, "chars": onnx.TensorProto.INT64}


def test_input_and_output_dims_are_dynamic(converted: Callable[[str], Converted]) -> None:
    model = onnx.load(str(converted("functional").result.onnx_path))
    (ids,) = model.graph.input
    assert [d.HasField("dim_value") for d in ids.type.tensor_type.shape.dim] == [False, False]
    assert [o.name for o in model.graph.output] == ["head"]


def test_mask_zero_is_metadata_not_padding(converted: Callable[[str], Converted]) -> None:
    (table,) = converted("mask_zero").result.tables
    assert table.metadata["mask_zero"] is True
    assert table.padding_id is None
    (other,) = converted("functional").result.tables
    assert other.metadata["mask_zero"] is False
    assert converted("mask_zero").result.summary[0]["mask_zero"] is True


def test_string_lookup_vocabulary_is_saved(kmodels: Any, converted: Callable[[str], Converted]) -> None:
    conv = converted("string_lookup")
    lookup = conv.model.get_layer("lookup")
    expected = [str(t) for t in lookup.get_vocabulary()]
    assert expected == ["[UNK]", "red", "green", "blue"]
    store = open_store(conv.result.store_path)
    for name in ("tok_emb", "inner_emb"):
        table = store[name]
        assert table.vocab is not None
        assert table.vocab.tokens == expected
        assert table.vocab.oov_id == 0 and table.oov_id == 0
        assert table.vocab.reserved == {"oov": 0}
        assert table.metadata["vocabulary"]["layer"] == "lookup"
        assert table.metadata["vocabulary"]["token_type"] == "str"
    ids = store["tok_emb"].vocab.ids(["blue", "unseen", "red"])
    assert ids.tolist() == lookup(kmodels.tf.constant(["blue", "unseen", "red"])).numpy().tolist()


def test_integer_lookup_tokens_are_decimal_strings(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.integer_lookup()
    result = convert(model, tmp_path / "out")
    (table,) = result.tables
    assert [s.layer for s in table.sources] == ["code_emb"]
    assert table.vocab is not None and table.vocab.tokens == ["0", "-1", "10", "20", "30"]
    assert table.vocab.reserved == {"mask": 0, "oov": 1} and table.vocab.oov_id == 1 and table.oov_id == 1
    assert table.metadata["vocabulary"]["token_type"] == "int"
    assert "decimal strings" in table.metadata["vocabulary"]["note"]
    assert np.array_equal(table.data, model.get_layer("code_emb").embeddings.numpy())
    # tf2onnx converts only string->int64 lookup tables: the model keeps TF ops, and says so
    assert any("could not convert" in w and "LookupTableFindV2" in w for w in result.warnings)


def test_static_length_input_keeps_the_whole_position_table(kmodels: Any, tmp_path: Path) -> None:
    model = kmodels.positions(length=8, max_len=12)
    result = convert(model, tmp_path / "out")
    by_name = {t.name: t for t in result.tables}
    assert set(by_name) == {"tok_emb", "pos_emb"}
    pos = by_name["pos_emb"]
    assert pos.shape == (12, 4)
    assert [(s.layer, s.weight) for s in pos.sources] == [("pos_emb", "pos_emb/positions")]
    assert np.array_equal(pos.data, model.get_layer("pos_emb").positions.numpy())
    assert result.provenance["signature"]["inputs"][0]["shape"] == [None, None]
    ids = np.arange(16, dtype=np.int32).reshape(2, 8) % 10
    got = run_onnx(result.onnx_path, {"ids": ids})
    np.testing.assert_allclose(next(iter(got.values())), np.asarray(model(ids)), atol=ATOL, rtol=RTOL)


def test_table_matching_no_weight_is_unmapped(kmodels: Any, tmp_path: Path) -> None:
    result = convert(kmodels.constant_table(), tmp_path / "out")
    (table,) = result.tables
    assert table.sources == ()
    assert result.summary[0]["source"] == "unmapped"
    assert any("matches no Keras weight" in w for w in result.warnings)
    assert np.array_equal(table.data, np.arange(24, dtype=np.float32).reshape(6, 4) / 7.0)


def test_tf2onnx_failure_is_a_conversion_error_and_writes_nothing(kmodels: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="tf2onnx could not convert.*Opset 99") as info:
        convert(kmodels.sequential(), out, opset=99)
    assert info.value.__cause__ is not None
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_subclassed_model_needs_an_input_signature(kmodels: Any, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input_signature"):
        convert(kmodels.subclassed(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_input_signature_is_a_conversion_error(kmodels: Any) -> None:
    with pytest.raises(ConversionError, match="input signature") as info:
        prepare(kmodels.two_inputs(), input_signature={"words": "int32"})
    assert "input_signature" in str(info.value) and info.value.__cause__ is not None


def test_invalid_onnx_from_tf2onnx_is_reported(kmodels: Any) -> None:
    # tf2onnx 1.17 cannot resolve Concatenate's axis -1 after a StringLookup (unknown rank) and
    # writes a Concat without an axis; the conversion says so instead of failing silently.
    conv = prepare(kmodels.string_lookup_concat())
    assert sorted(t.name for t in conv.tables) == ["emb_a", "emb_b"]
    assert any("Failed to convert node" in w for w in conv.warnings)
    assert any("invalid" in w and "axis" in w for w in conv.warnings)


def test_existing_output_is_refused_before_converting_unless_forced(kmodels: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="force"):
        convert(kmodels.sequential(), out)
    assert (out / "keep.txt").exists()
    result = convert(kmodels.sequential(), out, force=True)
    assert not (out / "keep.txt").exists()
    assert result.onnx_path == out / "model.onnx" and result.onnx_path.is_file()


def test_convert_prints_nothing_on_stdout(kmodels: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    convert(kmodels.integer_lookup(), tmp_path / "out")  # tf2onnx logs errors for this one
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "tf2onnx" not in captured.err


def test_keras_embedding_outputs_equal_table_rows(converted: Callable[[str], Converted]) -> None:
    conv = converted("nested")
    ids = np.array([[0, 5, 2]], np.int32)
    outs = keras_embedding_outputs(conv.model, {"encoder/tok_emb": ids, "outer_emb": ids})
    tables = {t.name: t for t in conv.result.tables}
    assert np.array_equal(outs["encoder/tok_emb"], np.take(tables["tok_emb"].data, ids, axis=0))
    assert np.array_equal(outs["outer_emb"], np.take(tables["outer_emb"].data, ids, axis=0))
    by_name = keras_embedding_outputs(conv.model, {"tok_emb": ids})
    assert np.array_equal(by_name["tok_emb"], outs["encoder/tok_emb"])
    with pytest.raises(InputError, match="encoder/tok_emb"):
        keras_embedding_outputs(conv.model, {"missing": ids})


def test_provenance_names_source_and_tools(converted: Callable[[str], Converted]) -> None:
    prov = converted("functional").result.provenance
    import keras
    import tensorflow as tf
    import tf2onnx

    assert prov["tools"] == {"tensorflow": tf.__version__, "keras": keras.__version__,
                             "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__}
    assert prov["source"] == {"kind": "memory", "model_name": "functional_model"}
    assert prov["onnx"]["opsets"]["ai.onnx"] == 17


def test_saved_model_source_hash_covers_its_files(tmp_path: Path) -> None:
    from converters.keras_load import directory_sha256

    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"a")
    (tmp_path / "variables" / "v").write_bytes(b"b")
    first = directory_sha256(tmp_path)
    (tmp_path / "variables" / "v").write_bytes(b"c")
    assert directory_sha256(tmp_path) != first
    assert first == hashlib.sha256(b"saved_model.pb\0a" + b"variables/v\0b").hexdigest()


def test_bfloat16_table_keeps_its_dtype(kmodels: Any, tmp_path: Path) -> None:
    k = kmodels.keras
    kmodels.seed(12)
    ids = k.Input((None,), dtype="int32", name="ids")
    model = k.Model(ids, k.layers.Embedding(6, 2, dtype="bfloat16", name="bf_emb")(ids), name="bf")
    result = convert(model, tmp_path / "out")
    (table,) = result.tables
    expected = np.asarray(model.get_layer("bf_emb").embeddings.numpy())
    assert str(table.dtype) == "bfloat16" and table.dtype == expected.dtype
    assert table.data.tobytes() == expected.tobytes()
    assert [s.layer for s in table.sources] == ["bf_emb"]
    (got,) = run_onnx(result.onnx_path, {"ids": np.array(IDS, np.int32)}).values()
    assert np.array_equal(got, np.asarray(model(np.array(IDS, np.int32))))


def test_int8_quantized_table_maps_to_its_layer(kmodels: Any) -> None:
    k = kmodels.keras
    kmodels.seed(13)
    ids = k.Input((None,), dtype="int32", name="ids")
    model = k.Model(ids, k.layers.Embedding(5, 4, name="q_emb")(ids), name="quantized")
    with warnings.catch_warnings():  # "Layer InputLayer does not have a `quantize` method"
        warnings.simplefilter("ignore", UserWarning)
        model.quantize("int8")
    conv = prepare(model)
    (table,) = conv.tables
    layer = model.get_layer("q_emb")
    assert table.dtype == np.int8
    assert np.array_equal(table.data, layer.embeddings.numpy())
    assert [s.weight for s in table.sources] == ["q_emb/embeddings"]
    assert table.metadata["keras_quantization"] == ["int8"]


def test_nested_outputs_are_unsupported(kmodels: Any) -> None:
    k = kmodels.keras
    ids = k.Input((None,), dtype="int32", name="ids")
    x = k.layers.Embedding(4, 2, name="e")(ids)
    model = k.Model(ids, {"pair": [x, x]}, name="nested_out")
    with pytest.raises(UnsupportedError, match="nested structure"):
        prepare(model)
