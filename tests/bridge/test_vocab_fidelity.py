"""Vocabularies that the one-token-per-line text cannot hold alone: a CategoryMapper's aliases, repeated
strings and unnamed ids, tokens that are not UTF-8; each token must reach the row onnxruntime's model gives it,
also after a store round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bridge
from bridge.errors import IdError, InputError, StoreError, VocabularyError
from bridge.extract import tables_from_onnx
from bridge.onnx_vocab import attach_onnx_vocabularies
from bridge.parity import compare
from bridge.vocab import Vocabulary, escape_token, unescape_token
from tests.bridge.test_onnx_vocab import lookup_model

RNG = np.random.default_rng(11)


def _store_tokens(tmp_path, onnx_kit, model, tokens: list[str]) -> np.ndarray:
    """The rows ``bridge`` serves for ``tokens`` after extracting ``model``'s table and vocabulary to a store."""
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    store = bridge.write_store(tmp_path / "store", tables)
    reopened = bridge.open_store(tmp_path / "store")
    (name,) = list(reopened)
    assert reopened[name].vocab == store[name].vocab
    return bridge.lookup(reopened[name], "numpy", policy="error").tokens(tokens)


def _model_rows(onnx_kit, model, tokens: list[str]) -> np.ndarray:
    (got,) = onnx_kit.run_ort(model, {"tokens": np.array(tokens, dtype=object)})
    return got


@pytest.mark.parametrize(("cats", "ids"), [
    (["[unused0]", "hello", "world"], [2, 3, 4]),  # a real token spelled like the gap filler of id 0
    (["colour", "color", "cat"], [2, 2, 3]),  # two tokens, one id
    (["a", "a", "b"], [2, 3, 4]),  # a repeated string: onnxruntime takes the last id
    (["a", "a", "b"], [3, 2, 4]),
    (["x", "[UNK]", "y"], [2, 3, 4]),  # [UNK] is a category elsewhere than the default id
])
def test_every_token_reaches_the_row_the_model_gives_it(tmp_path, onnx_kit, cats, ids) -> None:
    table = RNG.standard_normal((6, 3)).astype(np.float32)
    model = lookup_model(onnx_kit, table, cats, ids, 1)
    probes = [*dict.fromkeys(cats), "[unused0]", "[unused2]", "[unused5]", "[UNK]", "nope", ""]
    want = _model_rows(onnx_kit, model, probes)
    assert _store_tokens(tmp_path, onnx_kit, model, probes).tobytes() == want.tobytes()


def test_unnamed_ids_and_aliases_are_kept_in_the_manifest(tmp_path, onnx_kit) -> None:
    table = RNG.standard_normal((5, 2)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["colour", "color"], [2, 2], 1)
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    bridge.write_store(tmp_path / "s", tables)
    (entry,) = json.loads((tmp_path / "s" / "manifest.json").read_text())["vocabularies"]
    assert entry["aliases"] == {"color": 2} and entry["unnamed"] == [0]
    vocab = bridge.open_store(tmp_path / "s")[tables[0].name].vocab
    assert vocab.tokens == ["[unused0]", "[UNK]", "colour"]
    assert vocab.ids(["colour", "color", "[unused0]", "[UNK]"]).tolist() == [2, 2, 1, 1]


def test_manifest_with_an_alias_beyond_the_vocabulary_is_refused(tmp_path) -> None:
    vocab = Vocabulary(["a", "b"], aliases={"c": 1}, unnamed=(0,))
    bridge.write_store(tmp_path / "s", [bridge.EmbeddingTable("t", np.ones((2, 2), np.float32), vocab=vocab)])
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["vocabularies"][0]["aliases"] = {"c": 2}
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="aliases.c"):
        bridge.open_store(tmp_path / "s", verify=False)


def test_vocabulary_refuses_alias_and_unnamed_ids_out_of_range() -> None:
    with pytest.raises(InputError, match="alias 'c'=5"):
        Vocabulary(["a", "b"], aliases={"c": 5})
    with pytest.raises(InputError, match="unnamed id=-1"):
        Vocabulary(["a", "b"], unnamed=(-1,))


def test_category_strings_that_are_not_utf8_survive_the_store(tmp_path, onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["ok", "x"], [2, 3], 1)
    (strings,) = [a for a in model.graph.node[0].attribute if a.name == "cats_strings"]
    strings.strings[1] = b"caf\xe9"  # latin-1, not UTF-8
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    bridge.write_store(tmp_path / "s", tables)
    vocab = bridge.open_store(tmp_path / "s")[tables[0].name].vocab
    assert vocab.tokens[3] == "caf\udce9" and vocab.ids(["caf\udce9", "ok"]).tolist() == [3, 2]
    assert "caf\\uDCE9" in (tmp_path / "s" / "vocab" / f"{tables[0].name}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("token", ["caf\udce9", "\ud800", "a\\uDCE9", "\\", "\udfff\n\\"])
def test_escaping_round_trips_lone_surrogates(token) -> None:
    escaped = escape_token(token)
    escaped.encode("utf-8")  # writable
    assert unescape_token(escaped) == token


@pytest.mark.parametrize("line", ["\\u0041", "\\uDC", "\\uZZZZ"])
def test_u_escapes_name_only_surrogates(line) -> None:
    with pytest.raises(InputError, match="u escapes only name lone surrogates"):
        unescape_token(line)


@pytest.mark.parametrize(("tokens", "kind"), [([b"x", b"y"], "bytes"), (["a", 1], "int")])
def test_tokens_that_are_not_strings_are_refused_and_nothing_is_written(tmp_path, tokens, kind) -> None:
    table = bridge.EmbeddingTable("t", np.ones((2, 2), np.float32), vocab=Vocabulary(tokens))
    with pytest.raises(VocabularyError, match=f"is a {kind}, not str"):
        bridge.write_store(tmp_path / "s", [table])
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_table_name_with_a_lone_surrogate_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="not a valid Unicode string"):
        bridge.write_store(tmp_path / "s", [bridge.EmbeddingTable("emb\udce9", np.ones((2, 2), np.float32))])
    assert list(tmp_path.iterdir()) == []


def test_metadata_with_a_lone_surrogate_is_a_clear_error(tmp_path) -> None:
    table = bridge.EmbeddingTable("t", np.ones((2, 2), np.float32), metadata={"note": "x\udce9"})
    with pytest.raises(InputError, match="not valid Unicode"):
        bridge.write_store(tmp_path / "s", [table])
    assert list(tmp_path.iterdir()) == []


def test_ids_mixing_negatives_and_huge_values_get_a_true_message() -> None:
    lookup = bridge.lookup(np.ones((4, 2), np.float32), "numpy", policy="zero")
    with pytest.raises(IdError, match=r"mix a negative id \(-1\) with an id >= 2\*\*63"):
        lookup([-1, 2**63])
    assert lookup([2**63]).tolist() == [[0.0, 0.0]] and lookup([-1]).tolist() == [[0.0, 0.0]]
    with pytest.raises(IdError, match="does not fit in 64 bits"):
        lookup([-1, 2**64])


def test_tolerance_comparison_counts_nan_on_both_sides_as_agreement() -> None:
    ids = np.arange(3)
    ref = np.array([[np.nan, 1.0], [np.inf, -np.inf], [2.0, 3.0]], np.float32)
    same = compare(ref, ref.copy(), ids, atol=1e-6, rtol=1e-6)
    assert same.passed and same.max_abs_diff == 0.0
    cand = ref.copy()
    cand[1, 0] = -np.inf  # a different infinity
    cand[2, 1] = np.nan  # NaN on one side only
    differ = compare(ref, cand, ids, atol=1e-6, rtol=1e-6)
    assert not differ.passed and differ.mismatches == 2 and differ.max_abs_diff == np.inf


def test_a_non_utf8_alias_survives_the_manifest(tmp_path, onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["a", "x", "b"], [1, 1, 2], 0)
    (strings,) = [a for a in model.graph.node[0].attribute if a.name == "cats_strings"]
    strings.strings[1] = b"\xff"  # shares id 1 with "a": an alias that is not UTF-8
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    bridge.write_store(tmp_path / "s", tables)
    (entry,) = json.loads((tmp_path / "s" / "manifest.json").read_text(encoding="utf-8"))["vocabularies"]
    assert entry["aliases"] == {"\\uDCFF": 1}
    vocab = bridge.open_store(tmp_path / "s")[tables[0].name].vocab
    assert vocab.aliases == {"\udcff": 1} and vocab.ids(["\udcff", "a", "b"]).tolist() == [1, 1, 2]


def test_mappers_that_differ_only_in_their_aliases_give_no_vocabulary(onnx_kit) -> None:
    from onnx import helper

    from bridge.onnx_vocab import onnx_vocabularies
    from tests.bridge.test_onnx_vocab import mapper

    table = RNG.standard_normal((3, 2)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["a", "b"], [1, 1], 0)  # b -> 1 here ...
    second = mapper("lookup2", "tokens", "mapped2", ["a", "c"], [1, 1], 0)  # ... but 0 through this one
    model.graph.node.extend([second, helper.make_node("Gather", ["W", "mapped2"], ["vectors2"], name="gather2")])
    model.graph.output.extend([onnx_kit.value("vectors2", shape=["n", 2])])
    assert onnx_vocabularies(model) == {}


def test_a_non_ascii_vocabulary_with_one_lone_surrogate_round_trips(tmp_path) -> None:
    vocab = Vocabulary([f"\u8bcd{i}" for i in range(50_000)] + ["caf\udce9"])
    vocab.save(tmp_path / "v.txt")
    assert Vocabulary.load(tmp_path / "v.txt").tokens == vocab.tokens
