"""``embridge share`` review fixes: ids folded into the table are not cut, a Constant's external table is written
once, and an overridable table (an initializer also listed as a graph input) is never silently replaced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import convert_model_to_external_data
from test_share import D, V, _ids, _same, _save, _table

from bridge.cut import CutModel, feed_cut_model
from bridge.external import external_tensors
from bridge.onnx_io import load_model
from bridge.share import share
from bridge.share_check import ort_session
from bridge.store import open_store

_BIG = np.array([[3, 12345, V, -1, 2**40 + 5]], dtype=np.int64)  # ids in and far out of the table's range


def _folding_model(kit: Any, fold: str) -> onnx.ModelProto:
    """``out = Gather(W, fold(ids))``: each ``fold`` is the identity on ``[-V, V)`` but serves some larger ids."""
    scalar = lambda name, value: kit.init(name, np.array(value, dtype=np.int64))  # noqa: E731
    ids64 = kit.ids(shape=("b", None))
    if fold == "mod":  # the hashing trick
        nodes, inits = [helper.make_node("Mod", ["ids", "rows"], ["idx"])], [scalar("rows", V)]
    elif fold == "clip":
        nodes, inits = [helper.make_node("Clip", ["ids", "lo", "hi"], ["idx"])], [scalar("lo", -V), scalar("hi", V - 1)]
    elif fold == "min":
        nodes, inits = [helper.make_node("Min", ["ids", "hi"], ["idx"])], [scalar("hi", V - 1)]
    else:  # narrowing cast: 2**32 + 3 -> 3
        nodes, inits = [helper.make_node("Cast", ["ids"], ["idx"], to=TensorProto.INT32)], []
    nodes.append(helper.make_node("Gather", ["W", "idx"], ["out"], name="gather"))
    return kit.model(nodes, [ids64], [kit.value("out", shape=["b", None, D])], [kit.init("W", _table()), *inits])


@pytest.mark.parametrize("fold", ["mod", "clip", "min", "narrowing_cast"])
def test_cut_leaves_an_index_computation_that_folds_large_ids_in_the_model(tmp_path: Path, onnx_kit: Any,
                                                                          fold: str) -> None:
    src = _save(_folding_model(onnx_kit, fold), tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    assert not m.cut and m.check.verified
    (reason,) = m.kept
    assert "gather" in reason and "a cut lookup would refuse it" in reason
    ids = _BIG if fold != "narrowing_cast" else np.array([[3, 2**32 + 3, -1]], dtype=np.int64)
    served = feed_cut_model(ort_session(tmp_path / "out" / m.file), open_store(tmp_path / "out"), {"ids": ids})
    assert _same(served, onnx_kit.run_ort(src, {"ids": ids}))


def _constant_table_model(kit: Any) -> onnx.ModelProto:
    """``out = ReduceMax(Gather(W, ids))`` with ``W`` held in a Constant node (value tensor named ``Wvalue``)."""
    nodes = [helper.make_node("Constant", [], ["W"], value=kit.init("Wvalue", _table(5))),
             helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node("ReduceMax", ["emb"], ["out"], axes=[1], keepdims=0)]
    return kit.model(nodes, [kit.ids(shape=("b", 5))], [kit.value("out", shape=["b", D])])


@pytest.mark.parametrize("cut", [False, True])
def test_a_constant_table_with_external_data_is_not_written_again(tmp_path: Path, onnx_kit: Any, cut: bool) -> None:
    model = _constant_table_model(onnx_kit)
    convert_model_to_external_data(model, location="m.data", size_threshold=0, convert_attribute=True)
    src = _save(model, tmp_path / "src" / "m.onnx")
    assert [t.name for _, t, _ in external_tensors(load_model(src))] == ["Wvalue"]
    (m,) = share([src], tmp_path / "out", cut=cut).models
    assert m.check.verified and m.data_file is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "manifest.json", "tables"]
    ids = _ids()
    rewritten = tmp_path / "out" / m.file
    run = feed_cut_model(ort_session(rewritten), open_store(tmp_path / "out"), {"ids": ids})
    assert _same(run, onnx_kit.run_ort(src, {"ids": ids}))


def _overridable_model(kit: Any, ir_version: int = 10) -> onnx.ModelProto:
    """``out = Gather(U, ids) + Gather(W, ids)`` where ``W`` is also a graph input (callers may feed their own)."""
    nodes = [helper.make_node("Gather", ["U", "ids"], ["u"], name="gather_u"),
             helper.make_node("Gather", ["W", "ids"], ["w"], name="gather_w"),
             helper.make_node("Add", ["u", "w"], ["out"])]
    inputs = [kit.ids(shape=("b", 5)), kit.value("W", shape=[V, D])]
    model = kit.model(nodes, inputs, [kit.value("out", shape=["b", 5, D])],
                      [kit.init("U", _table(1)), kit.init("W", _table(2))], check=False)
    model.ir_version = ir_version
    return model


def test_an_overridable_table_is_not_cut_and_its_override_still_counts(tmp_path: Path, onnx_kit: Any) -> None:
    src = _save(_overridable_model(onnx_kit), tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    assert [s.table for s in m.cut] == ["U"] and m.check.verified
    (reason,) = m.kept
    assert "gather_w" in reason and "graph input" in reason
    (warning,) = m.warnings
    assert "'W'" in warning and "override" in warning and m.to_json()["warnings"] == [warning]
    cut = CutModel(ort_session(tmp_path / "out" / m.file), open_store(tmp_path / "out"))
    ids = _ids()
    for feeds in ({"ids": ids}, {"ids": ids, "W": _table(9)}):
        assert _same(cut.run(None, feeds), onnx_kit.run_ort(src, feeds))


def test_plain_share_warns_of_an_overridable_table(tmp_path: Path, onnx_kit: Any) -> None:
    src = _save(_overridable_model(onnx_kit), tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out").models
    assert len(m.warnings) == 1 and "'W'" in m.warnings[0] and not m.kept
    feeds = {"ids": _ids(), "W": _table(9)}
    assert _same(onnx_kit.run_ort(tmp_path / "out" / m.file, feeds), onnx_kit.run_ort(src, feeds))


def test_before_ir4_an_initializer_listed_as_input_cannot_be_fed_and_is_cut(tmp_path: Path, onnx_kit: Any) -> None:
    model = _overridable_model(onnx_kit, ir_version=3)
    model.graph.input.append(onnx_kit.value("U", shape=[V, D]))  # IR 3 lists every initializer as an input
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 9))
    src = _save(model, tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    assert sorted(s.table for s in m.cut) == ["U", "W"] and not m.kept and not m.warnings and m.check.verified


def test_an_overridable_constant_in_the_index_computation_is_not_cut(tmp_path: Path, onnx_kit: Any) -> None:
    nodes = [helper.make_node("Add", ["ids", "shift"], ["idx"]),
             helper.make_node("Gather", ["W", "idx"], ["out"], name="gather")]
    inputs = [onnx_kit.ids(shape=("b", 5)), onnx_kit.value("shift", TensorProto.INT64, [])]
    model = onnx_kit.model(nodes, inputs, [onnx_kit.value("out", shape=["b", 5, D])],
                           [onnx_kit.init("W", _table()), onnx_kit.init("shift", np.array(0, dtype=np.int64))])
    src = _save(model, tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    assert not m.cut and m.check.verified
    (reason,) = m.kept
    assert "'shift'" in reason and "graph input" in reason
    assert load_model(tmp_path / "out" / m.file).graph.input[1].name == "shift"
    feeds = {"ids": _ids() % (V - 1), "shift": np.array(1, dtype=np.int64)}  # ids + 1 stays in the table
    feeds["ids"][0, 0] = -2
    run = feed_cut_model(ort_session(tmp_path / "out" / m.file), open_store(tmp_path / "out"), feeds)
    assert _same(run, onnx_kit.run_ort(src, feeds))


def test_extract_marks_an_overridable_table_and_the_cli_warns(tmp_path: Path, onnx_kit: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    src = _save(_overridable_model(onnx_kit), tmp_path / "m.onnx")
    assert main(["extract", str(src), "-o", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "warning: table 'W': its initializer is also a graph input" in err and "'U'" not in err
    store = open_store(tmp_path / "s")
    assert store.entry("W")["metadata"]["onnx"]["overridable"] is True
    assert "overridable" not in store.entry("U")["metadata"]["onnx"]


def test_the_cut_node_takes_a_name_no_other_node_has(tmp_path: Path, onnx_kit: Any) -> None:
    from test_share import _model

    model = _model(onnx_kit, _table())
    model.graph.node[1].name = "W__vectors_in"  # the name the cut would give its Identity
    src = _save(model, tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    cut = load_model(tmp_path / "out" / m.file)  # refuses duplicate node names
    names = [n.name for n in cut.graph.node]
    assert len(set(names)) == len(names) and "W__vectors_in_2" in names and m.check.verified


def test_shared_sessions_leave_a_subgraph_initializer_of_the_same_name_alone(tmp_path: Path, onnx_kit: Any) -> None:
    """onnxruntime gives an added initializer to every graph holding one of that name: an If branch's own
    ``W`` (a bias here) must not become the shared main-graph table."""
    from bridge.serving import SharedSessions

    bias = np.ones((V, D), np.float32)
    then = helper.make_graph([helper.make_node("Add", ["x", "W"], ["t"])], "then", [],
                             [onnx_kit.value("t", shape=[V, D])], initializer=[onnx_kit.init("W", bias)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [onnx_kit.value("e", shape=[V, D])])
    nodes = [helper.make_node("Gather", ["W", "ids"], ["looked_up"], name="gather"),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other)]
    inputs = [onnx_kit.ids(), onnx_kit.value("cond", TensorProto.BOOL, []), onnx_kit.value("x", shape=[V, D])]
    outputs = [onnx_kit.value("looked_up", shape=["n", D]), onnx_kit.value("branch", shape=[V, D])]
    model = onnx_kit.model(nodes, inputs, outputs, [onnx_kit.init("W", _table())])
    src = _save(model, tmp_path / "m.onnx")
    share([src], tmp_path / "out")
    feeds = {"ids": np.array([0, 3]), "cond": np.array(True), "x": np.zeros((V, D), np.float32)}
    got = SharedSessions(tmp_path / "out").session("m.onnx").run(None, feeds)
    assert _same(got, onnx_kit.run_ort(src, feeds)) and got[1].tobytes() == bias.tobytes()


def test_a_subgraph_lookup_left_uncut_is_listed_even_when_its_label_repeats_a_cut_one(tmp_path: Path,
                                                                                      onnx_kit: Any) -> None:
    then = helper.make_graph([helper.make_node("Gather", ["W", "ids"], ["t"])], "then", [],
                             [onnx_kit.value("t", shape=["n", D])])  # unnamed: labelled Gather#0, like the main one
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [onnx_kit.value("e", shape=["n", D])])
    nodes = [helper.make_node("Gather", ["W", "ids"], ["looked_up"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other)]
    inputs = [onnx_kit.ids(), onnx_kit.value("cond", TensorProto.BOOL, []), onnx_kit.value("x", shape=["n", D])]
    outputs = [onnx_kit.value("looked_up", shape=["n", D]), onnx_kit.value("branch", shape=["n", D])]
    src = _save(onnx_kit.model(nodes, inputs, outputs, [onnx_kit.init("W", _table())]), tmp_path / "m.onnx")
    (m,) = share([src], tmp_path / "out", cut=True).models
    assert [s.gather for s in m.cut] == ["Gather#0"]
    assert len(m.kept) == 1 and "then_branch/Gather#0: the lookup is in a subgraph" in m.kept[0]
