"""ONNX review fixes: dequantization parameters resolved in the scope of the node reading them, node labels
(and subgraph paths) unique per graph, values defined twice refused, tables inside model-local functions found,
names that are not UTF-8 refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quantization import BACKENDS, Q8, D, V, _dql, _keras_int4, _keras_int8, _mul, _scale
from test_share import _same

from bridge.backends import lookup
from bridge.cli import main
from bridge.cut import TableCut, cut_gathers, feed_cut_model
from bridge.errors import ModelFormatError, UnsupportedError
from bridge.extract import extract
from bridge.onnx_io import load_model, node_label
from bridge.scan import scan
from bridge.share import share
from bridge.share_check import ort_session
from bridge.store import open_store

RNG = np.random.default_rng(23)
IDS = np.array([0, 5, V - 1, 5, 2], dtype=np.int64)


def _rows(seed: int, rows: int = V) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------------ parameters in their own scope


def _decoy(tensor: TensorProto) -> TensorProto:
    """``tensor`` with other values where it is a scale (``S``) or zero point (``Z``); else a copy."""
    value = numpy_helper.to_array(tensor)
    if tensor.name == "S":
        value = value * np.float32(2)
    elif tensor.name == "Z":
        value = np.where(value == np.iinfo(value.dtype).max, value - 1, value + 1).astype(value.dtype)
    return numpy_helper.from_array(value, tensor.name)


def _in_branch(kit: Any, model: onnx.ModelProto, *, table_inside: bool) -> onnx.ModelProto:
    """``model``'s nodes moved into the then-branch of ``If(cond)``, output ``y``.

    ``table_inside=False``: the table ``Q`` stays in the main graph and the parameters move into the branch; the
    main graph gets decoys of the same names and other values, which the branch's own shadow.
    ``table_inside=True``: ``Q`` moves into the branch, the parameters are read from the main graph.
    """
    table = [t for t in model.graph.initializer if t.name == "Q"]
    params = [t for t in model.graph.initializer if t.name != "Q"]
    inside, outside = (table, params) if table_inside else (params, table + [_decoy(t) for t in params])
    then = kit.graph(list(model.graph.node), [], [kit.value("out")], inside, name="then")
    zeros = helper.make_node("Constant", [], ["zeros"], value=numpy_helper.from_array(np.zeros((1, D), np.float32)))
    other = kit.graph([zeros], [], [kit.value("zeros")], name="else")
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)
    return kit.model([node], [kit.value("cond", TensorProto.BOOL, []), kit.ids()], [kit.value("y", shape=["n", D])],
                     outside)


QUANTIZED: dict[str, Callable[[], onnx.ModelProto]] = {
    "dequantize_linear": lambda: _dql(Q8, _scale(D), RNG.integers(-5, 5, D).astype(np.int8), axis=1),
    "mul_cast": lambda: _mul(_scale(V, 1)),
    "keras_int8": lambda: _keras_int8(),
    "keras_int4": lambda: _keras_int4(),
}


@pytest.mark.parametrize("table_inside", [False, True], ids=["params_shadow_outer_names", "params_in_outer_scope"])
@pytest.mark.parametrize("case", QUANTIZED)
def test_dequantization_parameters_are_read_where_the_reader_finds_them(tmp_path: Path, onnx_kit: Any, case: str,
                                                                        table_inside: bool) -> None:
    model = _in_branch(onnx_kit, QUANTIZED[case](), table_inside=table_inside)
    extract(_save(model, tmp_path / "model.onnx"), tmp_path / "store")
    table = open_store(tmp_path / "store")["Q"]
    expected = onnx_kit.run_ort(model, {"cond": np.array(True), "ids": IDS})[0]
    for backend in BACKENDS:
        got = lookup(table, backend)(IDS)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), backend


def test_a_scale_cast_to_another_type_is_refused_not_served_as_stored(tmp_path: Path, onnx_kit: Any) -> None:
    """``DequantizeLinear(Q, Cast(S_f16, to=FLOAT))`` outputs float32; the store would have kept the float16 scale."""
    nodes = [helper.make_node("Cast", ["S16"], ["S"], to=TensorProto.FLOAT),
             helper.make_node("DequantizeLinear", ["Q", "S"], ["W"]),
             helper.make_node("Gather", ["W", "ids"], ["out"])]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", D])],
                           [onnx_kit.init("Q", Q8), onnx_kit.init("S16", np.array(0.1, np.float16))])
    with pytest.raises(UnsupportedError, match="parameter 'S' through a Cast to another type"):
        extract(_save(model, tmp_path / "model.onnx"), tmp_path / "store")


# ------------------------------------------------------------------------------ labels unique per graph


def test_a_node_named_like_an_unnamed_nodes_label_gets_its_own_label() -> None:
    names = ["", "Gather#1", "Gather#1#", "plain", "x#y", "Gather#0"]
    nodes = [helper.make_node("Gather", ["W", "ids"], [f"o{i}"], name=name) for i, name in enumerate(names)]
    labels = [node_label(node, i) for i, node in enumerate(nodes)]
    assert labels == ["Gather#0", "Gather#1#", "Gather#1##", "plain", "x#y", "Gather#0#"]
    assert len(set(labels)) == len(labels)


def test_readers_whose_labels_collided_are_both_seen(tmp_path: Path, onnx_kit: Any) -> None:
    """An unnamed Gather (label ``Gather#1``) and one named ``Gather#1`` read W through different casts."""
    nodes = [helper.make_node("Cast", ["W"], ["w16"], to=TensorProto.FLOAT16),
             helper.make_node("Gather", ["w16", "ids"], ["y1"]),
             helper.make_node("Cast", ["W"], ["w64"], to=TensorProto.DOUBLE),
             helper.make_node("Gather", ["w64", "ids"], ["y2"], name="Gather#1")]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("y1", TensorProto.FLOAT16, ["n", D]),
                                                     onnx_kit.value("y2", TensorProto.DOUBLE, ["n", D])],
                           [onnx_kit.init("W", _rows(0))])
    (ref,) = scan(model)
    assert sorted(use.node for use in ref.gathers) == ["Gather#1", "Gather#1#"]
    with pytest.raises(UnsupportedError, match="read through different casts"):
        extract(_save(model, tmp_path / "model.onnx"), tmp_path / "store")


def _if(kit: Any, name: str, table: np.ndarray, out: str) -> onnx.NodeProto:
    """``If(cond)``: then ``Gather(W, ids)`` with its own ``W``, else zeros."""
    then = kit.graph([helper.make_node("Gather", ["W", "ids"], [f"t_{out}"])], [], [kit.value(f"t_{out}")],
                     [kit.init("W", table)])
    zeros = helper.make_node("Constant", [], [f"z_{out}"], value=numpy_helper.from_array(np.zeros((1, D), np.float32)))
    other = kit.graph([zeros], [], [kit.value(f"z_{out}")])
    return helper.make_node("If", ["cond"], [out], name=name, then_branch=then, else_branch=other)


def test_subgraphs_whose_paths_collided_are_two_tables(tmp_path: Path, onnx_kit: Any) -> None:
    """An unnamed If (label ``If#0``) and one named ``If#0``, each branch with its own W."""
    tables = [_rows(1), _rows(2)]
    model = onnx_kit.model([_if(onnx_kit, "", tables[0], "y1"), _if(onnx_kit, "If#0", tables[1], "y2")],
                           [onnx_kit.value("cond", TensorProto.BOOL, []), onnx_kit.ids()],
                           [onnx_kit.value("y1", shape=["n", D]), onnx_kit.value("y2", shape=["n", D])])
    assert [ref.graph for ref in scan(model)] == ["If#0/then_branch", "If#0#/then_branch"]
    extract(_save(model, tmp_path / "model.onnx"), tmp_path / "store")
    store = open_store(tmp_path / "store")
    outputs = onnx_kit.run_ort(model, {"cond": np.array(True), "ids": IDS})
    for name, expected in zip(["W", "W_2"], outputs, strict=True):
        assert lookup(store[name], "numpy")(IDS).tobytes() == expected.tobytes()


def test_node_names_that_spell_another_subgraph_path_are_refused(tmp_path: Path, onnx_kit: Any) -> None:
    """Node ``b`` inside ``a``'s then-branch and a main-graph node named ``a/then_branch/b``: both hold
    ``a/then_branch/b/then_branch``."""
    inner = _if(onnx_kit, "b", _rows(1), "inner")
    outer_then = onnx_kit.graph([inner], [], [onnx_kit.value("inner")])
    outer_else = onnx_kit.graph([helper.make_node("Identity", ["inner_zeros"], ["e"])], [], [onnx_kit.value("e")],
                                [onnx_kit.init("inner_zeros", np.zeros((1, D), np.float32))])
    nodes = [helper.make_node("If", ["cond"], ["y1"], name="a", then_branch=outer_then, else_branch=outer_else),
             _if(onnx_kit, "a/then_branch/b", _rows(2), "y2")]
    model = onnx_kit.model(nodes, [onnx_kit.value("cond", TensorProto.BOOL, []), onnx_kit.ids()],
                           [onnx_kit.value("y1", shape=["n", D]), onnx_kit.value("y2", shape=["n", D])])
    with pytest.raises(ModelFormatError, match="two subgraphs get the path 'a/then_branch/b/(then|else)_branch'"):
        load_model(_save(model, tmp_path / "model.onnx"))
    with pytest.raises(ModelFormatError, match="two subgraphs get the path"):
        scan(model)


# ------------------------------------------------------------------------------ share --cut picks the right node


def test_cut_replaces_the_tables_gather_not_the_node_named_like_its_label(tmp_path: Path, onnx_kit: Any) -> None:
    """``Gather(W, ids)`` is unnamed (``Gather#0``); ``Gather(X, ids2)`` on a graph input is named ``Gather#0``."""
    nodes = [helper.make_node("Gather", ["W", "ids"], ["y1"]),
             helper.make_node("Gather", ["X", "ids2"], ["y2"], name="Gather#0")]
    model = onnx_kit.model(nodes, [onnx_kit.ids(), onnx_kit.ids("ids2"), onnx_kit.value("X", shape=[V, D])],
                           [onnx_kit.value("y1", shape=["n", D]), onnx_kit.value("y2", shape=["n", D])],
                           [onnx_kit.init("W", _rows(0))])
    src = _save(model, tmp_path / "src" / "m.onnx")
    result = share([src], tmp_path / "out", cut=True)
    assert result.models[0].check.verified and [spec.gather for spec in result.models[0].cut] == ["Gather#0"]
    feeds = {"ids": IDS, "ids2": IDS[::-1].copy(), "X": _rows(9)}
    got = feed_cut_model(ort_session(tmp_path / "out" / "m.onnx"), open_store(tmp_path / "out"), feeds)
    assert _same(got, onnx_kit.run_ort(src, feeds))


def test_cut_of_two_tables_whose_gather_labels_collided(tmp_path: Path, onnx_kit: Any) -> None:
    nodes = [helper.make_node("Gather", ["W", "ids"], ["y1"]),
             helper.make_node("Gather", ["W2", "ids2"], ["y2"], name="Gather#0")]
    model = onnx_kit.model(nodes, [onnx_kit.ids(), onnx_kit.ids("ids2")],
                           [onnx_kit.value("y1", shape=["n", D]), onnx_kit.value("y2", shape=["n", D])],
                           [onnx_kit.init("W", _rows(0)), onnx_kit.init("W2", _rows(1))])
    src = _save(model, tmp_path / "src" / "m.onnx")
    result = share([src], tmp_path / "out", cut=True)
    assert result.models[0].check.verified and len(result.models[0].cut) == 2
    feeds = {"ids": IDS, "ids2": IDS[::-1].copy()}
    got = feed_cut_model(ort_session(tmp_path / "out" / "m.onnx"), open_store(tmp_path / "out"), feeds)
    assert _same(got, onnx_kit.run_ort(src, feeds))


def test_cut_keeps_a_listed_node_that_is_not_a_gather(onnx_kit: Any) -> None:
    model = onnx_kit.model([helper.make_node("Identity", ["x"], ["y"], name="n")], [onnx_kit.value("x", shape=[V, D])],
                           [onnx_kit.value("y", shape=[V, D])])
    before = model.SerializeToString()
    specs, kept = cut_gathers(model, [TableCut("t", ("n",), (V, D), np.dtype(np.float32))])
    assert specs == [] and kept == ["table 't', n: the node is a Identity, not a Gather(table, ids)"]
    assert model.SerializeToString() == before


# ------------------------------------------------------------------------------ values defined twice


def test_two_initializers_of_one_name_are_refused(tmp_path: Path, onnx_kit: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime serves the first; a rewritten model could serve the second."""
    graph = onnx_kit.graph([helper.make_node("Gather", ["W", "ids"], ["y"])], [onnx_kit.ids()],
                           [onnx_kit.value("y", shape=["n", D])],
                           [onnx_kit.init("W", _rows(0)), onnx_kit.init("W", _rows(1))])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                 tmp_path / "m.onnx")
    with pytest.raises(ModelFormatError, match="'W' is defined twice in the main graph \\(two initializers\\)"):
        load_model(path)
    assert main(["extract", str(path), "-o", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "defined twice" in err and not (tmp_path / "store").exists()


def test_an_initializer_and_a_node_output_of_one_name_are_refused(tmp_path: Path, onnx_kit: Any) -> None:
    const = helper.make_node("Constant", [], ["W"], name="c", value=numpy_helper.from_array(_rows(1)))
    graph = onnx_kit.graph([const, helper.make_node("Gather", ["W", "ids"], ["y"])], [onnx_kit.ids()],
                           [onnx_kit.value("y", shape=["n", D])], [onnx_kit.init("W", _rows(0))])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
                 tmp_path / "m.onnx")
    with pytest.raises(ModelFormatError, match="\\(an initializer and an output of node 'c'\\)"):
        load_model(path)


# ------------------------------------------------------------------------------ model-local functions


def _function_model(kit: Any, table: np.ndarray, constant: np.ndarray) -> onnx.ModelProto:
    """``local.Emb(W, ids)``: ``Gather(Cast(T, FLOAT16), i)`` and ``Gather(K, i)`` of a Constant ``K`` inside."""
    opset = helper.make_opsetid("", kit.OPSET)
    body = [helper.make_node("Cast", ["T"], ["t16"], to=TensorProto.FLOAT16),
            helper.make_node("Gather", ["t16", "i"], ["o"]),
            helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(constant)),
            helper.make_node("Gather", ["K", "i"], ["p"])]
    fn = helper.make_function("local", "Emb", ["T", "i"], ["o", "p"], body, [opset])
    graph = kit.graph([helper.make_node("Emb", ["W", "ids"], ["y", "z"], domain="local", name="emb")], [kit.ids()],
                      [kit.value("y", TensorProto.FLOAT16, ["n", D]), kit.value("z", shape=["n", D])],
                      [kit.init("W", table)])
    model = helper.make_model(graph, opset_imports=[opset, helper.make_opsetid("local", 1)],
                              ir_version=kit.IR_VERSION, functions=[fn])
    onnx.checker.check_model(model)
    return model


def test_tables_read_inside_a_local_function_are_extracted(tmp_path: Path, onnx_kit: Any) -> None:
    model = _function_model(onnx_kit, _rows(0), _rows(1))
    extract(_save(model, tmp_path / "model.onnx"), tmp_path / "store")
    store = open_store(tmp_path / "store")
    assert sorted(store) == ["K", "W"]  # the inliner names the function's constant K__1; its layer part is K
    y, z = onnx_kit.run_ort(model, {"ids": IDS})
    for name, expected in (("W", y), ("K", z)):
        got = lookup(store[name], "numpy")(IDS)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), name


def test_share_and_inspect_see_through_local_functions(tmp_path: Path, onnx_kit: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(_function_model(onnx_kit, _rows(0), _rows(1)), tmp_path / "src" / "m.onnx")
    assert main(["inspect", str(src), "--json"]) == 0
    assert "\"initializer\": \"W\"" in capsys.readouterr().out
    result = share([src], tmp_path / "out")
    assert result.models[0].check.verified and len(open_store(tmp_path / "out")) == 2


def test_scan_of_a_proto_calling_a_local_function_is_refused(onnx_kit: Any) -> None:
    with pytest.raises(UnsupportedError, match="model-local function\\(s\\) local:Emb.*inline them first"):
        scan(_function_model(onnx_kit, _rows(0), _rows(1)))


# ------------------------------------------------------------------------------ names that are not UTF-8


@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_a_name_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, onnx_kit: Any, command: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx_kit.gather_model(_rows(0), name="embQ")
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString().replace(b"embQ", b"emb\xe9"))
    args = [command, str(path)] + (["-o", str(tmp_path / "store")] if command == "extract" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not UTF-8" in err and "b'emb\\xe9'" in err
