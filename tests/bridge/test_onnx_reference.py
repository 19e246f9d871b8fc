"""The ONNX Gather reference: the model's own initializer, link chain and Gather, cut out and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.onnx_reference import gather_submodel, onnx_gather_reference
from bridge.scan import scan


def _model(table: np.ndarray, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_plain_gather_equals_take() -> None:
    table = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    model = _model(table, [helper.make_node("Gather", ["w", "ids"], ["out"], name="g")],
                   [numpy_helper.from_array(table, "w")])
    (ref,) = scan(model)
    run = onnx_gather_reference(model, ref)
    ids = np.array([[0, 29], [-1, 5]])
    assert run(ids).tobytes() == np.take(table, ids % 30, axis=0).tobytes()


def test_mul_cast_dequant_chain_is_kept() -> None:
    q = np.random.default_rng(1).integers(-127, 127, (20, 3)).astype(np.int8)
    scale = np.float32(0.125)
    nodes = [
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT, name="c"),
        helper.make_node("Mul", ["qf", "s"], ["w"], name="m"),
        helper.make_node("Gather", ["w", "ids"], ["out"], name="g"),
    ]
    model = _model(q, nodes, [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.array(scale), "s")])
    (ref,) = scan(model)
    sub = gather_submodel(model, ref)
    assert [n.op_type for n in sub.graph.node] == ["Cast", "Mul", "Gather"]
    ids = np.arange(20)
    assert np.array_equal(onnx_gather_reference(model, ref)(ids), q.astype(np.float32) * scale)


def test_external_table_is_not_copied_into_the_graph(tmp_path: Path) -> None:
    table = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    model = _model(table, [helper.make_node("Gather", ["w", "ids"], ["out"], name="g")],
                   [numpy_helper.from_array(table, "w")])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    loaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    (ref,) = scan(loaded)
    run = onnx_gather_reference(loaded, ref, tmp_path)
    assert run(np.arange(64)).tobytes() == table.tobytes()


def test_gather_outside_the_table_graph_is_refused_with_reason() -> None:
    from bridge.errors import UnsupportedError
    from bridge.scan import TableRef, Use

    table = np.ones((5, 2), np.float32)
    model = _model(table, [helper.make_node("Identity", ["w"], ["out"], name="id")],
                   [numpy_helper.from_array(table, "w")])
    ref = TableRef("w", (5, 2), "float32", "", (Use("inner", "Gather", "loop/body", 0),))
    with pytest.raises(UnsupportedError, match="Loop body"):
        gather_submodel(model, ref)


# --- tables the model only reads with Slice (W[:n], position tables) -----------------------------------


def _slice_model(table: np.ndarray, *, name: str = "pos", opset: int = 17,
                 index: type = np.int64) -> onnx.ModelProto:
    """``out = Slice(Identity(W), starts=[0, 0], ends=Concat(n, [dim]), axes=[0, 1])`` (opset >= 10), or
    ``Slice(W)`` with attribute starts/ends/axes reading 4 rows (opset 9)."""
    inits = [numpy_helper.from_array(table, name)]
    if opset < 10:
        nodes = [helper.make_node("Slice", [name], ["out"], name="s", starts=[0], ends=[4], axes=[0])]
    else:
        inits += [numpy_helper.from_array(np.array([0, 0], index), "starts"),
                  numpy_helper.from_array(np.array([table.shape[1]], index), "dim"),
                  numpy_helper.from_array(np.array([0, 1], index), "axes")]
        to = TensorProto.INT32 if index is np.int32 else TensorProto.INT64  # tf2onnx writes int32 starts/ends
        nodes = [helper.make_node("Cast", ["n"], ["n_index"], to=to, name="n_index"),
                 helper.make_node("Identity", [name], ["w_id"], name="link"),
                 helper.make_node("Concat", ["n_index", "dim"], ["ends"], axis=0, name="ends"),
                 helper.make_node("Slice", ["w_id", "starts", "ends", "axes"], ["out"], name="s")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize(("opset", "index"), [(17, np.int64), (17, np.int32), (9, np.int64)],
                         ids=["int64", "int32", "opset9"])
def test_slice_reference_reads_every_row_through_the_models_own_slice(opset: int, index: type) -> None:
    from bridge.errors import IdError
    from bridge.onnx_reference import onnx_slice_reference, slice_submodel

    table = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    table[2, 1] = -0.0
    model = _slice_model(table, opset=opset, index=index)
    (ref,) = scan(model)
    assert ref.gathers == () and [u.node for u in ref.slices] == ["s"]
    sub = slice_submodel(model, ref)
    assert len(sub.graph.input) == 0 and "Slice" in [n.op_type for n in sub.graph.node]
    run = onnx_slice_reference(model, ref)
    for ids in (np.arange(10), np.array([[0, 9], [3, 3]]), np.array(7), np.zeros((0,), np.int64)):
        assert run(ids).tobytes() == np.take(table, ids, axis=0).tobytes()
    for bad in (10, -1):
        with pytest.raises(IdError, match="rows 0..9 only"):
            run(np.array([1, bad]))


def _two_table_model(emb: np.ndarray, pos: np.ndarray) -> onnx.ModelProto:
    """A token table read by Gather and a position table read only by Slice."""
    model = _slice_model(pos)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["k"]))
    graph.initializer.append(numpy_helper.from_array(emb, "tok"))
    graph.node.append(helper.make_node("Gather", ["tok", "ids"], ["tok_out"], name="g"))
    graph.output.append(helper.make_tensor_value_info("tok_out", TensorProto.FLOAT, None))
    return model


def test_store_parity_compares_a_slice_only_table_with_the_model(tmp_path: Path) -> None:
    from bridge.extract import extract
    from bridge.store_parity import ONNX_REFERENCE, store_parity

    rng = np.random.default_rng(4)
    emb, pos = rng.standard_normal((30, 4)).astype(np.float32), rng.standard_normal((12, 4)).astype(np.float32)
    onnx.save(_two_table_model(emb, pos), tmp_path / "model.onnx")
    extract(tmp_path / "model.onnx", tmp_path / "store")
    report = store_parity(tmp_path / "store", onnx_model=tmp_path / "model.onnx")
    assert report, report.to_text()
    rows = {(c.table, c.backend) for c in report.comparisons}
    assert {("tok", ONNX_REFERENCE), ("pos", ONNX_REFERENCE)} <= rows

    changed = pos.copy()
    changed[5, 2] = np.nextafter(changed[5, 2], np.float32(np.inf))  # one ulp in row 5
    onnx.save(_two_table_model(emb, changed), tmp_path / "other.onnx")
    report = store_parity(tmp_path / "store", onnx_model=tmp_path / "other.onnx")
    failed = [c for c in report.comparisons if not c.passed]
    assert failed and {(c.table, c.backend) for c in failed} == {("pos", ONNX_REFERENCE)}
    assert {c.first_mismatch_id for c in failed} == {5}


def test_store_parity_reports_a_lookup_it_cannot_cut_out_as_skipped(tmp_path: Path) -> None:
    """A Gather inside a Loop body cannot be run on its own: a skipped row says so, instead of no row at all."""
    from bridge.extract import extract
    from bridge.store_parity import ONNX_REFERENCE, store_parity

    table = np.random.default_rng(5).standard_normal((20, 4)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Gather", ["W", "ids"], ["rows"], name="body_gather"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond"], ["stacked"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("stacked", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "W"), numpy_helper.from_array(np.array(1, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
              tmp_path / "model.onnx")
    extract(tmp_path / "model.onnx", tmp_path / "store")
    report = store_parity(tmp_path / "store", onnx_model=tmp_path / "model.onnx")
    (row,) = [c for c in report.comparisons if c.backend == ONNX_REFERENCE]
    assert row.skipped and "cannot be run on its own" in row.detail
    assert report and len(report.skipped) == 1 and "could not run" in report.summary()
