"""``StringLookup(mask_token=...)`` in front of an Embedding, with any mask token.

tf2onnx writes the mask test ``token == mask_token`` as ``Equal(Cast(token), <folded integer>)`` for
``""`` and as ``Equal(Cast(token), Cast("[PAD]"))`` for a non-empty token: two casts of strings feeding
one Equal. Both must become a CategoryMapper comparing the token tensor with the mask token, so that
onnxruntime runs the model and gives Keras's outputs; the store's token lookups give Keras's rows.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge import lookup, open_store
from bridge.cli import main
from converters.keras import convert
from converters.keras_parity import MODEL_ATOL, MODEL_RTOL
from converters.keras_strings import MaskedLookup, fix_string_equals, string_equal_casts

VOCAB = ["red", "green", "blue"]
# in-vocabulary, both candidate mask tokens and OOV tokens in every row; no row is all mask
TOKENS = [["red", "[PAD]", "nope", "blue"], ["", "green", "red", "[PAD]"]]
CASES = [("[PAD]", True), ("[PAD]", False), ("", True), ("", False)]


@dataclass
class Converted:
    """A saved Keras model and the store ``embridge convert`` made from it."""

    model: Any
    keras_path: Path
    store: Path
    convert_code: int
    convert_json: dict[str, Any]


def _build(kmodels: Any, mask_token: str, mask_zero: bool) -> Any:
    """tokens -> StringLookup(mask_token) -> Embedding(mask_zero) -> mean -> Dense."""
    k = kmodels.keras
    kmodels.seed(12)
    tokens = k.Input((None,), dtype="string", name="tokens")
    lookup_layer = k.layers.StringLookup(vocabulary=VOCAB, mask_token=mask_token, name="lookup")
    emb = k.layers.Embedding(lookup_layer.vocabulary_size(), 3, mask_zero=mask_zero, name="tok_emb")
    pooled = k.layers.GlobalAveragePooling1D(name="mean")(emb(lookup_layer(tokens)))
    return k.Model(tokens, k.layers.Dense(2, name="head")(pooled), name="masked_lookup")


@pytest.fixture(scope="module")
def converted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Converted]:
    """``converted(mask_token, mask_zero)``: the model saved as .keras and converted by the CLI, once per case."""
    cache: dict[tuple[str, bool], Converted] = {}

    def get(mask_token: str, mask_zero: bool) -> Converted:
        key = (mask_token, mask_zero)
        if key not in cache:
            root = tmp_path_factory.mktemp("mask_token")
            model = _build(kmodels, mask_token, mask_zero)
            model.save(root / "model.keras")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = main(["convert", str(root / "model.keras"), "-o", str(root / "store"), "--json"])
            cache[key] = Converted(model, root / "model.keras", root / "store", code, json.loads(printed.getvalue()))
        return cache[key]

    return get


@pytest.mark.parametrize(("mask_token", "mask_zero"), CASES)
def test_convert_and_cli_parity_pass(converted: Callable[[str, bool], Converted], mask_token: str,
                                     mask_zero: bool) -> None:
    conv = converted(mask_token, mask_zero)
    assert conv.convert_code == 0  # convert runs parity (the whole model included) and exits 3 on a difference
    whole = [c for c in conv.convert_json["parity"]["comparisons"] if c["table"] == "(whole model)"]
    assert whole and all(c["passed"] and c["case"] != "skipped" for c in whole), whole  # it ran in onnxruntime
    assert [w for w in conv.convert_json["warnings"] if "mask test" in w and "1 mask test(s)" not in w] == []
    assert main(["parity", str(conv.store), "--keras", str(conv.keras_path)]) == 0


@pytest.mark.parametrize(("mask_token", "mask_zero"), CASES)
def test_onnx_model_gives_keras_outputs(kmodels: Any, converted: Callable[[str, bool], Converted], mask_token: str,
                                        mask_zero: bool) -> None:
    import onnxruntime as ort

    conv = converted(mask_token, mask_zero)
    proto = onnx.load(str(conv.store / "model.onnx"))
    assert string_equal_casts(proto) == []  # no string is cast to a number any more
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tokens": np.array(TOKENS, dtype=object)})
    expected = np.asarray(conv.model(kmodels.tf.constant(TOKENS)))
    np.testing.assert_allclose(got, expected, atol=MODEL_ATOL, rtol=MODEL_RTOL)


@pytest.mark.parametrize(("mask_token", "mask_zero"), CASES)
@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torch"])
def test_token_lookups_give_keras_rows(kmodels: Any, converted: Callable[[str, bool], Converted], mask_token: str,
                                       mask_zero: bool, backend: str) -> None:
    conv = converted(mask_token, mask_zero)
    table = open_store(conv.store)["tok_emb"]
    flat = [t for row in TOKENS for t in row]
    keras_ids = np.asarray(conv.model.get_layer("lookup")(kmodels.tf.constant(flat)))
    assert table.vocab is not None
    assert table.vocab.ids(flat).tolist() == keras_ids.tolist()  # in-vocabulary, mask and OOV tokens
    expected = np.asarray(conv.model.get_layer("tok_emb")(keras_ids))
    got = lookup(table, backend=backend).tokens(flat)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()


def _equal_of_two_casts(mask: bytes, *, as_constant_node: bool = False) -> onnx.ModelProto:
    """tf2onnx's mask test for a non-empty token: ``Equal(Cast(tokens), Cast(mask))``, mask a scalar string."""
    value = numpy_helper.from_array(np.array(mask, dtype=object), "mask")
    nodes = [helper.make_node("Cast", ["tokens"], ["tokens_int"], to=TensorProto.INT32, name="cast_tokens"),
             helper.make_node("Cast", ["mask"], ["mask_int"], to=TensorProto.INT32, name="cast_mask"),
             helper.make_node("Equal", ["tokens_int", "mask_int"], ["is_mask"], name="eq")]
    if as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["mask"], value=value, name="mask_const"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("is_mask", TensorProto.BOOL, ["n"])],
                              initializer=[] if as_constant_node else [value])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: onnx.ModelProto, tokens: list[str]) -> list[bool]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tokens": np.array(tokens, dtype=object)})
    return [bool(v) for v in got.tolist()]


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_two_string_casts_compare_with_the_graphs_own_token(as_constant_node: bool) -> None:
    model = _equal_of_two_casts(b"[PAD]", as_constant_node=as_constant_node)
    assert len(string_equal_casts(model)) == 2
    # the token comes from the graph: no Keras lookups needed, and a different one listed does not matter
    assert fix_string_equals(model, [MaskedLookup("other", "<unk>", ("x",))]) == (["eq"], [])
    assert [n.op_type for n in model.graph.node if n.op_type != "Constant"] == ["CategoryMapper", "Cast"]
    (mapper,) = [n for n in model.graph.node if n.op_type == "CategoryMapper"]
    assert list(mapper.input) == ["tokens"]
    assert list(model.graph.initializer) == []  # the string constant is read by nothing any more
    assert _run(model, ["[PAD]", "red", "", "12", "[PAD]"]) == [True, False, False, False, True]


def test_two_string_tensors_compared_are_left_and_reported() -> None:
    model = _equal_of_two_casts(b"[PAD]")
    model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.STRING, ["n"]))
    model.graph.node[1].input[0] = "other"
    del model.graph.initializer[:]
    assert fix_string_equals(model, [MaskedLookup("lookup", "[PAD]", ("x",))]) == ([], ["eq"])
    assert [n.op_type for n in model.graph.node] == ["Cast", "Cast", "Equal"]


def test_two_masked_lookups_in_one_model(kmodels: Any, tmp_path: Path) -> None:
    """Each mask test is rewritten on its own (nodes were matched by id(), which protobuf reuses: two masked
    lookups replaced unrelated nodes and left a model onnxruntime refused)."""
    import onnxruntime as ort

    keras, tf = kmodels.keras, kmodels.tf
    la = keras.layers.StringLookup(vocabulary=["x", "y", "z"], mask_token="<m1>", name="la")
    lb = keras.layers.StringLookup(vocabulary=["x", "q"], mask_token="<m2>", name="lb")
    a = keras.Input((None,), dtype="string", name="a")
    b = keras.Input((None,), dtype="string", name="b")
    pool = keras.layers.GlobalAveragePooling1D
    pa = pool()(keras.layers.Embedding(la.vocabulary_size(), 3, mask_zero=True, name="e1")(la(a)))
    pb = pool()(keras.layers.Embedding(lb.vocabulary_size(), 3, mask_zero=True, name="e2")(lb(b)))
    model = keras.Model([a, b], keras.layers.Dense(2, name="head")(keras.layers.Add()([pa, pb])))
    result = convert(model, tmp_path / "out")
    graph = onnx.load(str(result.onnx_path)).graph
    assert sum(n.op_type == "CategoryMapper" for n in graph.node) == 4  # two lookups, two mask tests
    feeds = {"a": np.array([["x", "<m1>", "<m2>", "y", ""]], dtype=object),
             "b": np.array([["<m2>", "x", "<m1>", "q", ""]], dtype=object)}
    got = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = np.asarray(model([tf.constant(feeds["a"].astype(str)), tf.constant(feeds["b"].astype(str))]))
    np.testing.assert_allclose(got, want, atol=MODEL_ATOL, rtol=MODEL_RTOL)
