"""String vocabularies: TextVectorization (integer sub-model + bridge.text) and StringLookup (CategoryMapper).

bridge.text must give exactly the ids Keras's TextVectorization gives (compared on strings chosen to hit
the differences between TensorFlow's and Python's string functions: non-ASCII case, Unicode spaces,
punctuation); the converted models must run in onnxruntime and pass conversion parity.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.errors import UnsupportedError
from bridge.extract import tables_from_onnx
from bridge.onnx_vocab import attach_onnx_vocabularies
from bridge.store import open_store
from bridge.text import TextPipeline, TextSettings, tokenize_batch, tokens
from bridge.vocab import Vocabulary
from converters.keras import ConversionResult, convert
from converters.keras_parity import conversion_parity
from converters.keras_text import text_settings

CORPUS = ["The cat sat on the mat.", "Dogs, cats & birds!", "the END", "école ÉCOLE straße", "x-y_z mat.mat"]
TRICKY = [
    "The CAT, sat!", "  many   spaces\ttab\nnl\r\x0bvt\x0cff ", "Hello\u00a0World", "a\x1cb the", "ÄBC Straße",
    "İstanbul dogs", "", "x-y_z", "mat.mat", "[UNK]", "the\u2003end", "cats & birds", "ÉCOLE école",
    "(the)[cat]{sat}",
    "it's a \"quote\"", "é\u0301", "END end End",
]


def keras_ids(layer: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(layer(np.array([[t] for t in texts], dtype=object)))


def adapted(kmodels: Any, **kwargs: Any) -> Any:
    layer = kmodels.keras.layers.TextVectorization(**kwargs)
    layer.adapt(CORPUS)
    return layer


# ----------------------------------------------------------------------------- bridge.text against Keras


SETTINGS = {
    "default": {},
    "lower_character": {"standardize": "lower", "split": "character"},
    "strip_only": {"standardize": "strip_punctuation"},
    "raw_whole": {"standardize": None, "split": None},
    "fixed_length": {"output_sequence_length": 4},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_bridge_text_gives_keras_ids(kmodels: Any, name: str) -> None:
    layer = adapted(kmodels, **SETTINGS[name])
    settings = text_settings(layer)
    vocab = Vocabulary([str(t) for t in layer.get_vocabulary()], oov_id=1)
    want = keras_ids(layer, TRICKY)
    got = tokenize_batch(TRICKY, settings, vocab)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert np.array_equal(got, want), [
        (t, g, w) for t, g, w in zip(TRICKY, got.tolist(), want.tolist(), strict=True) if g != w]


def test_lowercasing_and_splitting_are_ascii_only() -> None:
    settings = TextSettings()
    assert tokens("ÄBC Straße İX", settings) == ["Äbc", "straße", "İx"]
    assert tokens("a\u00a0b c\x1cd e\u2003f", settings) == ["a\u00a0b", "c\x1cd", "e\u2003f"]
    assert tokens("(a)-[b].{c}!", settings) == ["abc"]


def test_settings_keras_cannot_be_matched_are_refused(kmodels: Any) -> None:
    with pytest.raises(UnsupportedError, match="ngrams"):
        text_settings(adapted(kmodels, ngrams=2))
    with pytest.raises(UnsupportedError, match="custom split"):
        text_settings(adapted(kmodels, split=lambda t: kmodels.tf.strings.split(t, sep="-")))
    with pytest.raises(UnsupportedError, match="output_mode"):
        text_settings(adapted(kmodels, output_mode="multi_hot"))
    with pytest.raises(UnsupportedError, match="ragged=True"):
        text_settings(adapted(kmodels, ragged=True))
    with pytest.raises(UnsupportedError, match="split="):
        TextSettings(split="regex")
    with pytest.raises(UnsupportedError, match="unknown text pipeline settings"):
        TextSettings.from_json({"standardize": "lower", "ngrams": 2})


# ----------------------------------------------------------------------------- TextVectorization models


def text_model(kmodels: Any, **kwargs: Any) -> Any:
    k = kmodels.keras
    kmodels.seed(30)
    layer = adapted(kmodels, name="tv", **kwargs)
    text = k.Input((1,), dtype="string", name="text")
    x = k.layers.Embedding(len(layer.get_vocabulary()), 4, name="tok_emb")(layer(text))
    return k.Model(text, k.layers.Dense(2, name="head")(k.layers.GlobalAveragePooling1D(name="mean")(x)), name="text")


@pytest.fixture(scope="module")
def text_conversion(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ConversionResult]:
    model = text_model(kmodels, output_sequence_length=6)
    return model, convert(model, tmp_path_factory.mktemp("text") / "store")


def test_text_model_converts_its_integer_part(text_conversion: tuple[Any, ConversionResult]) -> None:
    import onnxruntime as ort

    model, result = text_conversion
    (text_input,) = result.provenance["text_inputs"]
    assert (text_input["input"], text_input["layer"], text_input["onnx_input"]) == ("text", "tv", "text_ids")
    assert any("TextVectorization 'tv'" in w for w in result.warnings)
    assert not any("could not convert" in w for w in result.warnings)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("text_ids", "tensor(int64)")]
    table = open_store(result.store_path)["tok_emb"]
    ids = TextPipeline.from_table(table).batch(TRICKY)
    assert np.array_equal(ids, keras_ids(model.get_layer("tv"), TRICKY))
    (got,) = session.run(None, {"text_ids": ids})
    want = np.asarray(model(np.array([[t] for t in TRICKY], dtype=object)))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_text_table_carries_vocabulary_and_pipeline(text_conversion: tuple[Any, ConversionResult]) -> None:
    model, result = text_conversion
    table = open_store(result.store_path)["tok_emb"]
    assert table.vocab is not None and table.vocab.tokens == [str(t) for t in model.get_layer("tv").get_vocabulary()]
    assert table.vocab.oov_id == 1 and table.vocab.reserved == {"mask": 0, "oov": 1}
    meta = table.metadata["vocabulary"]
    assert meta["keras_class"] == "TextVectorization"
    assert meta["text_pipeline"] == {"standardize": "lower_and_strip_punctuation", "split": "whitespace",
                                     "output_sequence_length": 6}


def test_text_model_parity_passes(text_conversion: tuple[Any, ConversionResult]) -> None:
    _, result = text_conversion
    report = conversion_parity(result)
    assert report, report.to_text()
    assert {"keras", "onnx-model", "numpy", "onnxruntime", "torch"} <= {c.backend for c in report.comparisons}


def test_unsupported_text_settings_still_convert_but_refuse_tokens(kmodels: Any, tmp_path: Path) -> None:
    result = convert(text_model(kmodels, ngrams=2), tmp_path / "store")
    table = open_store(result.store_path)["tok_emb"]
    assert table.metadata["vocabulary"]["text_pipeline"] is None
    assert "ngrams" in table.metadata["vocabulary"]["text_pipeline_unsupported"]
    assert any("cannot be reproduced" in w for w in result.warnings)
    with pytest.raises(UnsupportedError, match="text pipeline"):
        TextPipeline.from_table(table)


# ----------------------------------------------------------------------------- StringLookup


@pytest.fixture(scope="module")
def lookups(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, ConversionResult]]:
    cache: dict[str, tuple[Any, ConversionResult]] = {}

    def get(name: str) -> tuple[Any, ConversionResult]:
        if name not in cache:
            model = kmodels.string_lookup_masked() if name == "masked" else kmodels.string_lookup()
            cache[name] = (model, convert(model, tmp_path_factory.mktemp(name) / "store"))
        return cache[name]

    return get


def test_masked_string_lookup_runs_in_onnxruntime(kmodels: Any, lookups: Any) -> None:
    import onnxruntime as ort

    model, result = lookups("masked")
    assert any("'stoll'" in w and "CategoryMapper" in w for w in result.warnings)
    tokens_in = np.array([["a", "", "zz", "b"], ["", "", "b", "a"]], dtype=object)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tokens": tokens_in.astype(str)})
    want = np.asarray(model(kmodels.tf.constant(tokens_in.astype(str))))
    assert got.tobytes() == want.tobytes()  # the output is the embedding itself: exact
    report = conversion_parity(result)
    assert report, report.to_text()


def test_masked_string_lookup_vocabulary_agrees_with_the_onnx_mapper(lookups: Any) -> None:
    _, result = lookups("masked")
    table = open_store(result.store_path)["tok_emb"]
    assert table.vocab is not None and table.vocab.tokens == ["", "[UNK]", "a", "b"]
    assert "agrees" in table.metadata["vocabulary"]["onnx_check"]


def test_onnx_file_alone_recovers_the_lookup_vocabulary(lookups: Any) -> None:
    import onnx

    model, result = lookups("plain")
    onnx_model = onnx.load(str(result.onnx_path))
    tables = {t.initializer: t for t in attach_onnx_vocabularies(onnx_model, tables_from_onnx(onnx_model, None))}
    keras_vocab = [str(t) for t in model.get_layer("lookup").get_vocabulary()]
    for stored in result.tables:
        recovered = tables[stored.initializer]
        assert recovered.vocab is not None and recovered.vocab.tokens == keras_vocab
        assert recovered.oov_id == stored.oov_id == 0


def string_equal_model() -> Any:
    """tf2onnx's mask test: ``is_mask = Equal(Cast(tokens, to=INT32), -1)`` (onnxruntime fails with 'stoll')."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["tokens"], ["as_int"], to=TensorProto.INT32, name="cast"),
             helper.make_node("Equal", ["as_int", "folded"], ["is_mask"], name="eq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("is_mask", TensorProto.BOOL, ["n"])],
                              initializer=[helper.make_tensor("folded", TensorProto.INT32, [], [-1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_string_equal_with_an_unknown_mask_is_left_and_reported() -> None:
    from converters.keras_strings import MaskedLookup, fix_string_equals, string_equal_casts

    model = string_equal_model()
    assert [(c.name, e.name) for c, e in string_equal_casts(model)] == [("cast", "eq")]
    masks = [MaskedLookup("a", "", ("x",)), MaskedLookup("b", "<pad>", ("y",))]
    assert fix_string_equals(model, masks) == ([], ["eq"])  # two mask tokens, no neighbouring mapper: unknown
    assert [n.op_type for n in model.graph.node] == ["Cast", "Equal"]


def test_string_equal_with_the_only_mask_token_runs_in_onnxruntime() -> None:
    import onnxruntime as ort

    from converters.keras_strings import MaskedLookup, fix_string_equals

    model = string_equal_model()
    assert fix_string_equals(model, [MaskedLookup("lookup", "<pad>", ("a",))]) == (["eq"], [])
    assert [n.op_type for n in model.graph.node] == ["CategoryMapper", "Cast"]
    assert [i.name for i in model.graph.initializer] == []  # the folded integer is gone
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tokens": np.array(["<pad>", "a", "", "12", "<pad>"])})
    assert got.tolist() == [True, False, False, False, True]
