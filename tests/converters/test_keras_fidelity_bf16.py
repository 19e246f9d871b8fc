"""bridge.onnx_bf16: bfloat16 arithmetic onnxruntime's CPU provider lacks is computed in float32 between Casts.

Graphs are built with onnx.helper; the values are small integers and halves, so every bfloat16 result
is exact and the expected output can be computed in NumPy without any rounding question.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.onnx_bf16 import BFLOAT16_NATIVE, has_bfloat16, upcast_bfloat16

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """float ids -> Gather(bf16 table) -> Add(bf16 bias) -> MatMul(bf16 W) -> ReduceMean -> Cast(float32)."""
    table = (np.arange(12, dtype=np.float32).reshape(6, 2) - 5).astype(BF16)
    weight = np.array([[1, 0.5, -2], [0.5, 1, 1]], dtype=np.float32).astype(BF16)
    inits = [numpy_helper.from_array(table, "T"), numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(np.array([0.5, -1], np.float32).astype(BF16), "bias")]
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["rows"], name="lookup"),
        helper.make_node("Add", ["rows", "bias"], ["shifted"], name="add"),
        helper.make_node("MatMul", ["shifted", "W"], ["projected"], name="matmul"),
        helper.make_node("ReduceMean", ["projected"], ["mean"], axes=[0], keepdims=0, name="mean"),
        helper.make_node("Cast", ["mean"], ["out"], to=TensorProto.FLOAT, name="widen"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model, table, weight


def session(model: onnx.ModelProto):  # noqa: ANN201 - onnxruntime type
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_onnxruntime_rejects_bfloat16_arithmetic_then_runs_the_upcast_model() -> None:
    model, table, weight = bf16_model()
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        session(model)
    upcast = upcast_bfloat16(model)
    assert upcast.op_types == ("Add", "MatMul", "ReduceMean")
    assert "no bfloat16 kernel for Add, MatMul, ReduceMean" in upcast.describe()
    ids = np.array([0, 5, 3], np.int64)
    (got,) = session(model).run(None, {"ids": ids})
    rows = table[ids].astype(np.float32)
    shifted = (rows + np.array([0.5, -1], np.float32)).astype(BF16).astype(np.float32)
    projected = (shifted @ weight.astype(np.float32)).astype(BF16).astype(np.float32)
    want = projected.mean(axis=0).astype(BF16).astype(np.float32)
    assert got.tobytes() == want.tobytes()


def test_native_ops_and_the_table_gather_stay_bfloat16() -> None:
    model, _, _ = bf16_model()
    upcast_bfloat16(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Gather" in BFLOAT16_NATIVE and ops.count("Gather") == 1
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    assert list(gather.input) == ["T", "ids"]  # the table is read as stored
    to = [next(a.i for a in n.attribute if a.name == "to") for n in model.graph.node if n.op_type == "Cast"]
    # widened: rows, bias, shifted, W, projected; rounded back: shifted, projected, mean (as Keras rounds
    # every bfloat16 intermediate); plus the model's own Cast to float32
    assert to.count(TensorProto.FLOAT) == 5 + 1 and to.count(TensorProto.BFLOAT16) == 3


def test_models_without_bfloat16_are_left_alone() -> None:
    graph = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 2])],
                              initializer=[numpy_helper.from_array(np.ones((3, 2), np.float32), "T")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    before = model.SerializeToString()
    assert not has_bfloat16(model)
    assert not upcast_bfloat16(model)
    assert model.SerializeToString() == before
