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
