"""Helpers to build tiny ONNX graphs with onnx.helper, shared through the ``onnx_kit`` fixture.

Usage in a test: ``def test_x(onnx_kit): model = onnx_kit.model([...nodes], inputs=[...], ...)``.
Every model uses IR version 10 and opset 17 unless told otherwise (onnxruntime 1.31 accepts
IR <= 13; ``onnx.helper.make_model`` defaults to 14).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


class OnnxKit:
    """Builders for small ONNX models; every method is a plain function of its arguments."""

    IR_VERSION = IR_VERSION
    OPSET = OPSET

    @staticmethod
    def value(name: str, elem_type: int = TensorProto.FLOAT, shape: Sequence[int | str | None] | None = None
              ) -> onnx.ValueInfoProto:
        """A graph input/output declaration (``shape=None``: unknown rank; the checker wants a shape on
        a main graph's inputs and outputs, subgraph values may leave it out)."""
        return helper.make_tensor_value_info(name, elem_type, shape)

    @staticmethod
    def ids(name: str = "ids", shape: Sequence[int | str | None] = ("n",)) -> onnx.ValueInfoProto:
        """An int64 ids input."""
        return helper.make_tensor_value_info(name, TensorProto.INT64, shape)

    @staticmethod
    def init(name: str, array: np.ndarray) -> TensorProto:
        """An initializer holding ``array`` (raw_data)."""
        return numpy_helper.from_array(np.asarray(array), name=name)

    @staticmethod
    def graph(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[TensorProto] = (),
              name: str = "g") -> onnx.GraphProto:
        """A graph (also usable as a Loop/If body)."""
        return helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))

    @classmethod
    def model(cls, nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[TensorProto] = (),
              opset: int = OPSET, check: bool = True) -> onnx.ModelProto:
        """A model with IR version 10; checked with ``onnx.checker`` unless ``check=False``."""
        graph = cls.graph(nodes, inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
        if check:
            onnx.checker.check_model(model)
        return model

    @classmethod
    def gather_model(cls, table: np.ndarray, *, name: str = "W", chain: Sequence[str] = (),
                     out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
        """``out = Gather(chain(W), ids)``; ``chain`` holds "Identity" or "Cast" (to ``out_type``) links."""
        nodes, current = [], name
        for i, op in enumerate(chain):
            attrs: dict[str, Any] = {"to": out_type} if op == "Cast" else {}
            nodes.append(helper.make_node(op, [current], [f"{op.lower()}_{i}"], name=f"{op.lower()}_{i}", **attrs))
            current = f"{op.lower()}_{i}"
        nodes.append(helper.make_node("Gather", [current, "ids"], ["out"], name="gather"))
        elem = out_type if chain else helper.np_dtype_to_tensor_dtype(np.asarray(table).dtype)
        return cls.model(nodes, [cls.ids()], [cls.value("out", elem, ("n", None))], [cls.init(name, table)])

    @staticmethod
    def run_ort(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run ``model`` (a proto, or a path for models with external data) on CPU in onnxruntime."""
        import onnxruntime as ort

        source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)


@pytest.fixture
def onnx_kit() -> type[OnnxKit]:
    """The :class:`OnnxKit` builders."""
    return OnnxKit
