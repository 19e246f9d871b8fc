"""Same-named tables in different subgraphs: each is its own table, with its own ties and vocabulary.

Both branches of an ``If`` define their own initializer ``W`` (different values). A table is known by
``(graph path, initializer)`` (:attr:`bridge.scan.TableRef.key`); keyed by name only, one table's ties,
data or vocabulary ended up on the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bridge import onnx_vocab, ties
from bridge.cli import main
from bridge.extract import tables_from_onnx
from bridge.onnx_vocab import attach_onnx_vocabularies
from bridge.scan import scan
from bridge.table import EmbeddingTable

V, D = 10, 4
ML = "ai.onnx.ml"
THEN, ELSE = "if/then_branch", "if/else_branch"
RNG = np.random.default_rng(11)
W_THEN = RNG.standard_normal((V, D)).astype(np.float32)
W_ELSE = RNG.standard_normal((V, D)).astype(np.float32)
PROJ = RNG.standard_normal((D, V)).astype(np.float32)  # fits a [V, D] table transposed, equals neither
IDS = np.array([0, 3, V - 1, 3], dtype=np.int64)


def _if_model(onnx_kit, then_graph: onnx.GraphProto, else_graph: onnx.GraphProto, inputs: list[onnx.ValueInfoProto],
              out_shape: list[str | int], ml: bool = False) -> onnx.ModelProto:
    node = helper.make_node("If", ["cond"], ["out"], name="if", then_branch=then_graph, else_branch=else_graph)
    graph = onnx_kit.graph([node], [onnx_kit.value("cond", TensorProto.BOOL, []), *inputs],
                           [onnx_kit.value("out", shape=out_shape)])
    opsets = [helper.make_opsetid("", onnx_kit.OPSET)] + ([helper.make_opsetid(ML, 2)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=onnx_kit.IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _tied_model(onnx_kit) -> onnx.ModelProto:
    """then: ``W_THEN[ids] @ P`` (untied head); else: ``W_ELSE[ids] @ WT`` with ``WT = W_ELSE.T`` (tied)."""

    def branch(tag: str, table: np.ndarray, head: str, head_value: np.ndarray) -> onnx.GraphProto:
        nodes = [helper.make_node("Gather", ["W", "ids"], [f"h_{tag}"], name=f"gather_{tag}"),
                 helper.make_node("MatMul", [f"h_{tag}", head], [f"logits_{tag}"], name=f"head_{tag}")]
        return onnx_kit.graph(nodes, [], [onnx_kit.value(f"logits_{tag}", shape=["n", V])],
                              [onnx_kit.init("W", table), onnx_kit.init(head, head_value)], name=tag)

    return _if_model(onnx_kit, branch("t", W_THEN, "P", PROJ), branch("e", W_ELSE, "WT", W_ELSE.T.copy()),
                     [onnx_kit.ids()], ["n", V])


def _mapper(name: str, out: str, cats: list[str], ids: list[int], default: int) -> onnx.NodeProto:
    return helper.make_node("CategoryMapper", ["tokens"], [out], domain=ML, name=name,
                            cats_strings=[c.encode() for c in cats], cats_int64s=ids, default_int64=default)


THEN_VOCAB = (["red", "green", "blue"], [1, 2, 3], 0)
ELSE_VOCAB = (["cat", "dog"], [4, 6], 9)


def _vocab_model(onnx_kit) -> onnx.ModelProto:
    """Each branch maps the outer ``tokens`` with its own CategoryMapper into its own ``W``."""

    def branch(tag: str, table: np.ndarray, vocab: tuple[list[str], list[int], int]) -> onnx.GraphProto:
        nodes = [_mapper(f"lookup_{tag}", f"ids_{tag}", *vocab),
                 helper.make_node("Gather", ["W", f"ids_{tag}"], [f"vec_{tag}"], name=f"gather_{tag}")]
        return onnx_kit.graph(nodes, [], [onnx_kit.value(f"vec_{tag}", shape=["n", D])], [onnx_kit.init("W", table)],
                              name=tag)

    return _if_model(onnx_kit, branch("t", W_THEN, THEN_VOCAB), branch("e", W_ELSE, ELSE_VOCAB),
                     [onnx_kit.value("tokens", TensorProto.STRING, ["n"])], ["n", D], ml=True)


def _by_graph(tables: list[EmbeddingTable]) -> dict[str, EmbeddingTable]:
    return {t.metadata["onnx"]["graph"]: t for t in tables}


# ----------------------------------------------------------------------------- ties


def test_the_model_is_what_the_tests_assume(onnx_kit) -> None:
    model = _tied_model(onnx_kit)
    assert sorted((r.graph, r.initializer) for r in scan(model)) == [(ELSE, "W"), (THEN, "W")]
    for flag, table, head in ((True, W_THEN, PROJ), (False, W_ELSE, W_ELSE.T)):
        (logits,) = onnx_kit.run_ort(model, {"cond": np.array(flag), "ids": IDS})
        np.testing.assert_allclose(logits, table[IDS] @ head, rtol=1e-5, atol=1e-5)


def test_each_same_named_table_gets_its_own_ties(onnx_kit) -> None:
    model = _tied_model(onnx_kit)
    found = ties.find_ties(model, scan(model))
    assert set(found) == {(THEN, "W"), (ELSE, "W")}
    assert found[(THEN, "W")] == ()
    (tie,) = found[(ELSE, "W")]
    assert (tie.initializer, tie.graph, tie.layout) == ("WT", ELSE, "transposed")
    assert [(u.node, u.graph) for u in tie.consumers] == [("head_e", ELSE)]


def test_arrays_are_matched_by_table_key_not_by_name(onnx_kit) -> None:
    """Each table is compared with its own data: given the other branch's array, the tie is lost."""
    model = _tied_model(onnx_kit)
    refs = scan(model)
    own = {r.key: (W_THEN if r.graph == THEN else W_ELSE) for r in refs}
    assert len(ties.find_ties(model, refs, arrays=own)[(ELSE, "W")]) == 1
    swapped = {key: (W_ELSE if key[0] == THEN else W_THEN) for key in own}
    assert ties.find_ties(model, refs, arrays=swapped)[(ELSE, "W")] == ()


def test_extracted_tables_keep_their_own_data_and_ties(onnx_kit) -> None:
    model = _tied_model(onnx_kit)
    tables = _by_graph(tables_from_onnx(model, None))
    assert set(tables) == {THEN, ELSE}
    assert np.array_equal(tables[THEN].data, W_THEN) and np.array_equal(tables[ELSE].data, W_ELSE)
    assert tables[THEN].metadata["ties"] == []
    assert [(t["initializer"], t["graph"], t["layout"]) for t in tables[ELSE].metadata["ties"]] == \
        [("WT", ELSE, "transposed")]


def test_extract_cli_writes_each_tables_ties(onnx_kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(_tied_model(onnx_kit), tmp_path / "m.onnx")
    assert main(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entries = {t["metadata"]["onnx"]["graph"]: t for t in manifest["tables"]}
    assert [t["initializer"] for t in entries[ELSE]["metadata"]["ties"]] == ["WT"]
    assert entries[THEN]["metadata"]["ties"] == []
    data = {g: np.load(tmp_path / "out" / e["file"]) for g, e in entries.items()}
    assert np.array_equal(data[THEN], W_THEN) and np.array_equal(data[ELSE], W_ELSE)


# ----------------------------------------------------------------------------- vocabularies


def test_each_same_named_table_gets_its_own_vocabulary(onnx_kit) -> None:
    model = _vocab_model(onnx_kit)
    found = onnx_vocab.onnx_vocabularies(model)
    assert found[(THEN, "W")].vocabulary.tokens == ["[UNK]", "red", "green", "blue"]
    assert found[(ELSE, "W")].vocabulary.tokens[4:] == ["cat", "[unused5]", "dog", "[unused7]", "[unused8]", "[UNK]"]
    assert found[(ELSE, "W")].vocabulary.oov_id == 9


def test_attached_vocabularies_serve_the_models_rows(onnx_kit) -> None:
    model = _vocab_model(onnx_kit)
    tables = _by_graph(attach_onnx_vocabularies(model, tables_from_onnx(model, None)))
    vocabs = {graph: table.vocab for graph, table in tables.items() if table.vocab is not None}
    assert vocabs[THEN].tokens[1:] == ["red", "green", "blue"] and tables[THEN].oov_id == 0
    assert vocabs[ELSE].tokens[4] == "cat" and tables[ELSE].oov_id == 9
    for flag, graph, tokens in ((True, THEN, ["blue", "nope", "red"]), (False, ELSE, ["dog", "cat", "nope"])):
        (got,) = onnx_kit.run_ort(model, {"cond": np.array(flag), "tokens": np.array(tokens, dtype=object)})
        assert got.tobytes() == np.take(tables[graph].data, vocabs[graph].ids(tokens), axis=0).tobytes()


def test_a_table_without_graph_metadata_is_matched_only_by_a_unique_name(onnx_kit) -> None:
    model = _vocab_model(onnx_kit)
    bare = [EmbeddingTable(name=t.name, data=t.data, initializer=t.initializer) for t in tables_from_onnx(model, None)]
    assert all(t.vocab is None for t in attach_onnx_vocabularies(model, bare))


def test_parity_compares_each_same_named_table_with_its_own_gather(onnx_kit, tmp_path: Path) -> None:
    """The onnx-model reference is matched by graph and initializer (by name, both tables met one branch's W)."""
    from bridge.extract import extract
    from bridge.store_parity import ONNX_REFERENCE, store_parity

    onnx.save(_tied_model(onnx_kit), tmp_path / "m.onnx")
    extract(tmp_path / "m.onnx", tmp_path / "store")
    report = store_parity(tmp_path / "store", onnx_model=tmp_path / "m.onnx")
    assert report, report.to_text()
    ran = {c.table for c in report.comparisons if c.backend == ONNX_REFERENCE and not c.skipped}
    assert len(ran) == 2
