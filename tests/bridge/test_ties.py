"""bridge.ties: tied output projections found by value, in graphs built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bridge.errors import ModelFormatError
from bridge.scan import scan
from bridge.ties import Tie, find_ties, ties_json

V, D = 12, 5


def _table(rows: int = V, dim: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def _lm(kit, table: np.ndarray, head_nodes: list[onnx.NodeProto], extra_inits: list[TensorProto],
        check: bool = True) -> onnx.ModelProto:
    """ids -> Gather(W) -> h; ``head_nodes`` compute ``logits`` from ``h``."""
    nodes = [helper.make_node("Gather", ["W", "ids"], ["h"], name="gather"), *head_nodes]
    return kit.model(nodes, [kit.ids()], [kit.value("logits", TensorProto.FLOAT, ("n", table.shape[0]))],
                     [kit.init("W", table), *extra_inits], check=check)


def _only_tie(model: onnx.ModelProto, base_dir: Path | None = None) -> Tie:
    refs = scan(model)
    assert [r.initializer for r in refs] == ["W"]
    ties = find_ties(model, refs, base_dir)
    assert len(ties[("", "W")]) == 1, ties
    return ties[("", "W")][0]


def test_folded_transposed_copy_like_tf2onnx(onnx_kit) -> None:
    table = _table()
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_T", np.ascontiguousarray(table.T))])
    tie = _only_tie(model)
    assert (tie.initializer, tie.layout, tie.graph) == ("W_T", "transposed", "")
    assert [(u.node, u.op_type, u.input_index, u.via) for u in tie.consumers] == [("head", "MatMul", 1, ())]
    ids = np.array([0, 3, V - 1], dtype=np.int64)
    (logits,) = onnx_kit.run_ort(model, {"ids": ids})
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=1e-5, atol=1e-5)  # arithmetic: MatMul


def test_gemm_transb_copy_and_transpose_copy(onnx_kit) -> None:
    table = _table()
    head = [
        helper.make_node("Gemm", ["h", "W_copy"], ["a"], name="gemm", transB=1),
        helper.make_node("Transpose", ["W_copy2"], ["w_t"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w_t"], ["b"], name="mm"),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
    ]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_copy", table.copy()), onnx_kit.init("W_copy2", table.copy())])
    ties = find_ties(model, scan(model))[("", "W")]
    found = {(t.initializer, t.layout, t.consumers[0].node, t.consumers[0].via) for t in ties}
    assert found == {("W_copy", "copy", "gemm", ()), ("W_copy2", "copy", "mm", ("Transpose",))}


def test_shared_initializer_like_torch_exporters(onnx_kit) -> None:
    """torch on 2-D activations: Gemm(transB=1) reads the table itself; dynamo without folding: Transpose -> MatMul."""
    table = _table()
    head = [
        helper.make_node("Gemm", ["h", "W"], ["a"], name="gemm", transB=1),
        helper.make_node("Transpose", ["W"], ["w_t"], name="tr"),
        helper.make_node("MatMul", ["h", "w_t"], ["b"], name="mm"),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
    ]
    model = _lm(onnx_kit, table, head, [])
    (tie,) = find_ties(model, scan(model))[("", "W")]
    assert (tie.initializer, tie.layout) == ("W", "shared")
    assert sorted((u.node, u.via) for u in tie.consumers) == [("gemm", ()), ("mm", ("Transpose",))]
    assert ties_json([tie])[0]["consumers"][0]["role"] == "tied"


@pytest.mark.parametrize("table_dtype, compute", [(np.float16, TensorProto.FLOAT), (np.float32, TensorProto.FLOAT16)])
def test_tie_through_cast_like_a_mixed_precision_head(onnx_kit, table_dtype: type, compute: int) -> None:
    """The head casts the table to the dtype it computes in (Transpose -> Cast -> MatMul): a shared tie."""
    table = _table().astype(table_dtype)
    head = [
        helper.make_node("Cast", ["h"], ["h_c"], name="cast_h", to=compute),
        helper.make_node("Transpose", ["W"], ["w_t"], name="tr", perm=[1, 0]),
        helper.make_node("Cast", ["w_t"], ["w_c"], name="cast_w", to=compute),
        helper.make_node("MatMul", ["h_c", "w_c"], ["l_c"], name="head"),
        helper.make_node("Cast", ["l_c"], ["logits"], name="back", to=TensorProto.FLOAT),
    ]
    model = _lm(onnx_kit, table, head, [])
    tie = _only_tie(model)
    assert (tie.initializer, tie.layout) == ("W", "shared")
    assert [(u.node, u.via) for u in tie.consumers] == [("head", ("Transpose", "Cast"))]
    ids = np.array([1, V - 1], dtype=np.int64)
    (logits,) = onnx_kit.run_ort(model, {"ids": ids})
    want = table[ids].astype(np.float32) @ table.T.astype(np.float32)
    np.testing.assert_allclose(logits, want, rtol=2e-2, atol=5e-2)  # arithmetic, partly in float16


def test_cast_of_a_copy_is_a_copy_tie_and_other_ops_stop_the_walk(onnx_kit) -> None:
    table = _table()
    head = [
        helper.make_node("Cast", ["W_T"], ["w16"], name="c", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["w16"], ["w32"], name="c2", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w32"], ["a"], name="mm"),
        helper.make_node("Neg", ["W_T2"], ["neg"], name="neg"),
        helper.make_node("MatMul", ["h", "neg"], ["b"], name="mm2"),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add"),
    ]
    inits = [onnx_kit.init("W_T", np.ascontiguousarray(table.T)), onnx_kit.init("W_T2", np.ascontiguousarray(table.T))]
    tie = _only_tie(_lm(onnx_kit, table, head, inits))
    assert (tie.initializer, tie.layout, tie.consumers[0].node, tie.consumers[0].via) == (
        "W_T", "transposed", "mm", ("Cast", "Cast"))


def test_wrong_orientation_is_not_a_tie(onnx_kit) -> None:
    """A square table: a copy equal to W (not W.T) fed as MatMul's right operand is h @ W, not h @ W.T."""
    table = _table(D, D)
    head = [helper.make_node("MatMul", ["h", "W_same"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_same", table.copy())])
    assert find_ties(model, scan(model)) == {("", "W"): ()}
    head_t = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model_t = _lm(onnx_kit, table, head_t, [onnx_kit.init("W_T", np.ascontiguousarray(table.T))])
    assert _only_tie(model_t).layout == "transposed"


@pytest.mark.parametrize("row", [0, 7])  # with samples=2 rows 0 and 11 are sampled: 0 fails early, 7 in the full check
def test_one_differing_value_is_not_a_tie(onnx_kit, row: int) -> None:
    table = _table()
    copy = np.ascontiguousarray(table.T).copy()
    copy[2, row] = np.nextafter(copy[2, row], np.float32(np.inf))
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_T", copy)])
    assert find_ties(model, scan(model), samples=2) == {("", "W"): ()}  # samples=2: rows 0 and 11 only


def test_comparison_is_bitwise(onnx_kit) -> None:
    """-0.0 == 0.0 as numbers, but a tie means the same bytes."""
    table = _table()
    table[3, 1] = 0.0
    copy = np.ascontiguousarray(table.T).copy()
    copy[1, 3] = -0.0
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_T", copy)])
    assert find_ties(model, scan(model)) == {("", "W"): ()}


def test_other_dtype_is_not_a_tie(onnx_kit) -> None:
    table = _table()
    head = [helper.make_node("Cast", ["h"], ["h16"], name="cast", to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["h16", "W_T"], ["l16"], name="head"),
            helper.make_node("Cast", ["l16"], ["logits"], name="back", to=TensorProto.FLOAT)]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_T", np.ascontiguousarray(table.T).astype(np.float16))])
    assert find_ties(model, scan(model)) == {("", "W"): ()}


def test_tie_inside_a_loop_body_reading_an_outer_initializer(onnx_kit) -> None:
    table = _table()
    body = onnx_kit.graph(
        [helper.make_node("MatMul", ["h", "W_T"], ["y"], name="inner_mm"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep")],
        [onnx_kit.value("i", TensorProto.INT64, []), onnx_kit.value("cond_in", TensorProto.BOOL, [])],
        [onnx_kit.value("cond_out", TensorProto.BOOL, []), onnx_kit.value("y", TensorProto.FLOAT)],
        name="body",
    )
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["h"], name="gather"),
        helper.make_node("Loop", ["trip", "cond"], ["logits"], name="loop", body=body),
    ]
    model = onnx_kit.model(
        nodes, [onnx_kit.ids()], [onnx_kit.value("logits", TensorProto.FLOAT, (1, "n", V))],
        [onnx_kit.init("W", table), onnx_kit.init("W_T", np.ascontiguousarray(table.T)),
         onnx_kit.init("trip", np.array(1, dtype=np.int64)), onnx_kit.init("cond", np.array(True))],
    )
    tie = _only_tie(model)
    assert (tie.initializer, tie.graph, tie.layout) == ("W_T", "", "transposed")
    assert tie.consumers[0].graph == "loop/body"


def _external(tensor: TensorProto, location: str) -> TensorProto:
    """Turn ``tensor`` into an external-data reference to ``location`` (the file is not written)."""
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_tensors_of_other_shapes_are_never_read(onnx_kit, tmp_path: Path) -> None:
    """An unrelated [D, 7] weight whose external file is missing: reading it would raise; nothing reads it."""
    table = _table()
    other = _external(onnx_kit.init("P", _table(D, 7, seed=1)), "missing.bin")
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head"),
            helper.make_node("MatMul", ["h", "P"], ["proj"], name="proj")]
    nodes = [helper.make_node("Gather", ["W", "ids"], ["h"], name="gather"), *head]
    outputs = [onnx_kit.value("logits", TensorProto.FLOAT, None), onnx_kit.value("proj", TensorProto.FLOAT, None)]
    inits = [onnx_kit.init("W", table), onnx_kit.init("W_T", np.ascontiguousarray(table.T)), other]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], outputs, inits, check=False)
    ties = find_ties(model, scan(model), tmp_path)
    assert [t.initializer for t in ties[("", "W")]] == ["W_T"]

    # the same missing file behind a constant whose shape fits *is* read, and the error says so
    model.graph.initializer[1].CopyFrom(_external(onnx_kit.init("W_T", np.ascontiguousarray(table.T)), "gone.bin"))
    with pytest.raises(ModelFormatError, match="gone.bin"):
        find_ties(model, scan(model), tmp_path)


def test_arrays_given_are_used_instead_of_reading_the_table(onnx_kit, tmp_path: Path) -> None:
    """With the table's data passed in, an external table file that is not there is never opened."""
    table = _table()
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("W_T", np.ascontiguousarray(table.T))])
    model.graph.initializer[0].CopyFrom(_external(onnx_kit.init("W", table), "table.bin"))
    refs = scan(model)
    assert find_ties(model, refs, tmp_path, arrays={("", "W"): table})[("", "W")][0].initializer == "W_T"
    with pytest.raises(ModelFormatError):
        find_ties(model, refs, tmp_path)


def test_external_candidate_is_compared_through_a_memory_map(onnx_kit, tmp_path: Path) -> None:
    table = _table()
    (tmp_path / "wt.bin").write_bytes(np.ascontiguousarray(table.T).tobytes())
    head = [helper.make_node("MatMul", ["h", "W_T"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [_external(onnx_kit.init("W_T", np.ascontiguousarray(table.T)), "wt.bin")],
                check=False)
    assert _only_tie(model, tmp_path).layout == "transposed"


def test_untied_model_and_every_table_listed(onnx_kit) -> None:
    table = _table()
    head = [helper.make_node("MatMul", ["h", "P"], ["logits"], name="head")]
    model = _lm(onnx_kit, table, head, [onnx_kit.init("P", _table(D, V, seed=3))])
    assert find_ties(model, scan(model)) == {("", "W"): ()}
