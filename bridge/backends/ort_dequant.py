"""The onnxruntime graph that serves a quantized table: gather integers and scales, dequantize.

``ids`` feeds a ``Gather`` on the integer table and one on each per-row parameter; then ONNX ops
compute :mod:`bridge.quantization`'s formula in the same order (``Cast`` of the integers to the
output type, then ``Div``, or ``Sub`` and ``Mul``). Tables and per-row parameters are ``[1, ...]``
placeholders overridden with ``SessionOptions.add_initializer`` (no copy), as for plain tables;
per-tensor and per-column parameters are small and stored in the graph.

A float16 output is computed in float32 and cast to float16 at the end. onnxruntime's CPU provider
runs float16 arithmetic by wrapping it in casts to float32 and back, and then drops a graph's own
``Cast(float32 -> float16)`` of a float32 scale next to the cast it inserted: the scale was never
rounded to float16, and 24% of the values came out one unit in the last place away from NumPy's and
torch's (onnxruntime 1.32). So the graph holds float16 values in float32 itself: a wider scale is cast
to float16 and back (an explicit pair, which onnxruntime keeps), the 8-bit integers and their
differences are exact in float32, and one float32 ``Div`` or ``Mul`` rounded to float16 is NumPy's
float16 operation (``npy_half`` computes in float32 and rounds once).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bridge.quantization import Quantization

TABLE, SCALE, ZERO, IDS, VECTORS = "table", "scale", "zero", "ids", "vectors"


def elem_type(dtype: np.dtype) -> int:  # type: ignore[type-arg]
    """The ONNX element type of a numpy dtype."""
    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


class _Graph:
    """Nodes and initializers of the dequantizing graph, built step by step."""

    def __init__(self, quant: Quantization, data: np.ndarray) -> None:
        self.quant, self.out, self.dim = quant, elem_type(quant.dtype), int(data.shape[1])
        self.work = TensorProto.FLOAT if self.out == TensorProto.FLOAT16 else self.out  # the arithmetic's type
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [_placeholder(TABLE, data)]
        self.overrides: dict[str, np.ndarray] = {TABLE: data}

    def add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def cast(self, name: str, dtype: np.dtype, output: str) -> str:  # type: ignore[type-arg]
        """``name`` cast to the output type, held in the working type (no node where nothing changes).

        For a float16 output, a float wider than float16 is first rounded to float16 (see the module docstring).
        """
        dtype = np.dtype(dtype)
        if self.work != self.out and dtype.kind == "f" and dtype.itemsize > 2:
            name, dtype = self.add("Cast", [name], f"{output}_f16", to=self.out), np.dtype(np.float16)
        return name if elem_type(dtype) == self.work else self.add("Cast", [name], output, to=self.work)

    def finish(self, op: str, inputs: list[str]) -> None:
        """The last operation, writing ``vectors`` (computed in the working type, then cast to the output type)."""
        if self.work == self.out:
            self.add(op, inputs, VECTORS)
        else:
            self.add("Cast", [self.add(op, inputs, "vectors_work")], VECTORS, to=self.out)

    def param(self, name: str, array: np.ndarray) -> str:
        """Scale / zero point shaped to broadcast against ``[..., dim]`` rows (gathered by id where per row)."""
        if not self.quant.per_row:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            return name
        self.inits.append(_placeholder(name, array))
        self.overrides[name] = array
        rows = self.add("Gather", [name, IDS], f"{name}_rows", axis=0)
        column = self.add("Unsqueeze", [rows, self.const("last_axis", [-1])], f"{name}_col")
        return column if self.quant.scheme != "group_affine" else self.expand_groups(name, column)

    def const(self, name: str, values: list[int]) -> str:
        """An int64 constant (added once)."""
        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def expand_groups(self, name: str, column: str) -> str:
        """``[..., G, 1]`` -> ``[..., D]``: each group's entry repeated over its columns.

        ``Expand`` + ``Reshape`` (+ ``Slice`` for a partial last group): a ``Gather`` on the last
        axis with ``g_idx`` gives the same values but is about 100x slower in onnxruntime 1.31.
        """
        size, dim = int(self.quant.group_size or 1), self.dim
        width = size * int(self.quant.scale.shape[1])
        if not any(n.output[0] == "grouped_shape" for n in self.nodes):
            ids_shape = self.add("Shape", [IDS], "ids_shape")
            self.add("Concat", [ids_shape, self.const("group_width", [width])], "grouped_shape", axis=0)
        blocks = self.add("Expand", [column, self.const("block", [size])], f"{name}_blocks")
        flat = self.add("Reshape", [blocks, "grouped_shape"], f"{name}_flat")
        if width == dim:
            return flat
        ends = self.const("dim", [dim])
        return self.add("Slice", [flat, self.const("zero_start", [0]), ends, self.const("last_axis", [-1])],
                        f"{name}_cols")


def _placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A one-row stand-in for ``array`` (the real array comes through ``add_initializer``)."""
    return numpy_helper.from_array(np.zeros((1, *array.shape[1:]), array.dtype), name)


def dequant_model(quant: Quantization, data: np.ndarray) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph ``ids -> vectors`` for integer table ``data``, and the arrays to pass to ``add_initializer``."""
    g = _Graph(quant, data)
    rows = g.cast(g.add("Gather", [TABLE, IDS], "q_rows", axis=0), data.dtype, "q_float")
    scale = g.cast(g.param(SCALE, quant.scale), quant.scale.dtype, "scale_float")
    if quant.scheme == "row_div":
        g.finish("Div", [rows, scale])
    elif quant.zero_point is None:
        g.finish("Mul", [rows, scale])
    else:
        zero = g.cast(g.param(ZERO, quant.zero_point), quant.zero_point.dtype, "zero_float")
        g.finish("Mul", [g.add("Sub", [rows, zero], "centered"), scale])
    graph = helper.make_graph(
        g.nodes, "embedding_bridge_dequantize",
        [helper.make_tensor_value_info(IDS, TensorProto.INT64, None)],
        [helper.make_tensor_value_info(VECTORS, g.out, None)],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, g.overrides
