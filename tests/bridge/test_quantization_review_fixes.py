"""Quantization review fixes, on small ONNX models run by onnxruntime itself:

* one integer table dequantized two ways (two DequantizeLinear or Mul scales, two Keras row scales, one Gather
  whose rows two Divs dequantize) is refused in one line; the same values under other names are one
  dequantization; a table read both dequantized and raw is refused;
* float16 vectors from a 16-bit zero point, and float16 scales holding NaN, are refused (the backends cannot
  match onnxruntime bit for bit); onnxruntime's start-up check recommends no backend it cannot vouch for;
* a Keras row scale widened by a Cast after its Gather is served exactly; an integer table dequantized in a
  way the scan does not recognise (or in bfloat16) is refused instead of stored as raw integers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_quantization import BACKENDS, Q8, D, V, _dql, _init, _keras_int8, _scale

from bridge.backends import lookup
from bridge.cli import main
from bridge.errors import BackendError, UnsupportedError
from bridge.extract import extract
from bridge.quantization import Quantization, dense
from bridge.store import open_store
from bridge.table import EmbeddingTable

IDS = np.arange(V, dtype=np.int64)


def _model(kit: Any, nodes: list[onnx.NodeProto], inits: list[TensorProto],
           outputs: dict[str, int], opset: int = 21) -> onnx.ModelProto:
    """ids -> ``outputs`` (name -> ONNX element type)."""
    values = [kit.value(name, elem, ["n", D]) for name, elem in outputs.items()]
    return kit.model(nodes, [kit.ids()], values, inits, opset=opset)


def _extract(model: onnx.ModelProto, tmp_path: Path) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, tmp_path / "m.onnx")
    extract(tmp_path / "m.onnx", tmp_path / "store")
    return open_store(tmp_path / "store")["Q"]


def _refused(model: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """``embridge extract`` refuses ``model`` in one line naming ``words``, and writes nothing."""
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError):
        extract(tmp_path / "m.onnx", tmp_path / "store")
    assert main(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "store").exists()
    return err


def _every_backend_is_the_model(kit: Any, model: onnx.ModelProto, table: Any, output: int = 0) -> None:
    want = kit.run_ort(model, {"ids": IDS})[output]
    for backend in BACKENDS:
        got = lookup(table, backend)(IDS)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), backend
    assert dense(table).tobytes() == want.tobytes()


# ------------------------------------------------------------------------------ one table, two dequantizations


def _two_dql(s1: str, s2: str) -> list[onnx.NodeProto]:
    return [helper.make_node("DequantizeLinear", ["Q", s1], ["d1"], name="dq1"),
            helper.make_node("Gather", ["d1", "ids"], ["y1"], name="g1"),
            helper.make_node("DequantizeLinear", ["Q", s2], ["d2"], name="dq2"),
            helper.make_node("Gather", ["d2", "ids"], ["y2"], name="g2")]


def _two_mul(s1: str, s2: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Cast", ["Q"], ["c"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["c", s1], ["d1"], name="mul1"),
            helper.make_node("Gather", ["d1", "ids"], ["y1"], name="g1"),
            helper.make_node("Mul", ["c", s2], ["d2"], name="mul2"),
            helper.make_node("Gather", ["d2", "ids"], ["y2"], name="g2")]


def _two_keras_rows(s1: str, s2: str) -> list[onnx.NodeProto]:
    """Two tf2onnx Keras int8 lookups of one integer table, each divided by its own per-row scale."""
    nodes = []
    for k, scale in (("1", s1), ("2", s2)):
        nodes += [helper.make_node("Gather", ["Q", "ids"], [f"q{k}"], name=f"g{k}"),
                  helper.make_node("Cast", [f"q{k}"], [f"c{k}"], name=f"cast{k}", to=TensorProto.FLOAT),
                  helper.make_node("Gather", [scale, "ids"], [f"s{k}"], name=f"gs{k}"),
                  helper.make_node("Unsqueeze", [f"s{k}", "axes"], [f"u{k}"], name=f"u{k}"),
                  helper.make_node("Div", [f"c{k}", f"u{k}"], [f"y{k}"], name=f"div{k}")]
    return nodes


def _merged_keras_rows(s1: str, s2: str) -> list[onnx.NodeProto]:
    """tf2onnx's graph of two Keras int8 layers whose codes coincide: one Gather and Cast, two Divs."""
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["q"], name="g"),
             helper.make_node("Cast", ["q"], ["c"], name="cast", to=TensorProto.FLOAT)]
    for k, scale in (("1", s1), ("2", s2)):
        nodes += [helper.make_node("Gather", [scale, "ids"], [f"s{k}"], name=f"gs{k}"),
                  helper.make_node("Unsqueeze", [f"s{k}", "axes"], [f"u{k}"], name=f"u{k}"),
                  helper.make_node("Div", ["c", f"u{k}"], [f"y{k}"], name=f"div{k}")]
    return nodes


_PER_ROW = _scale(V)
#: case -> (nodes for scale names s1, s2; the scale of s1; a different one for s2)
TWO_WAYS: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {
    "dequantize_linear": (_two_dql, np.float32(0.5), np.float32(0.25)),
    "mul": (_two_mul, np.float32(0.5), np.float32(0.25)),
    "keras_row_scales": (_two_keras_rows, _PER_ROW, _PER_ROW * np.float32(3)),
    "one_gather_two_divs": (_merged_keras_rows, _PER_ROW, _PER_ROW * np.float32(2)),
}


def _two_way_model(kit: Any, case: str, same: bool) -> onnx.ModelProto:
    build, s1, s2 = TWO_WAYS[case]
    inits = [_init("Q", Q8), _init("S1", s1), _init("S2", s1.copy() if same else s2),
             _init("axes", np.array([1], np.int64))]
    return _model(kit, build("S1", "S2"), inits, {"y1": TensorProto.FLOAT, "y2": TensorProto.FLOAT})


@pytest.mark.parametrize("case", TWO_WAYS)
def test_one_table_dequantized_two_ways_is_refused(case: str, tmp_path: Path, onnx_kit: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = _two_way_model(onnx_kit, case, same=False)
    y1, y2 = onnx_kit.run_ort(model, {"ids": IDS})
    assert y1.tobytes() != y2.tobytes()  # the model serves two different tables
    _refused(model, tmp_path, capsys, "'Q'", "dequantized two ways")


@pytest.mark.parametrize("case", TWO_WAYS)
def test_same_values_under_other_names_are_one_dequantization(case: str, tmp_path: Path, onnx_kit: Any) -> None:
    model = _two_way_model(onnx_kit, case, same=True)
    table = _extract(model, tmp_path)
    assert table.quantization is not None
    _every_backend_is_the_model(onnx_kit, model, table, 0)
    _every_backend_is_the_model(onnx_kit, model, table, 1)


def test_table_read_dequantized_and_raw_is_refused(tmp_path: Path, onnx_kit: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    keras = _keras_int8()
    nodes = [*keras.graph.node, helper.make_node("Gather", ["Q", "ids"], ["raw"], name="raw_lookup")]
    model = _model(onnx_kit, nodes, list(keras.graph.initializer), {"out": TensorProto.FLOAT, "raw": TensorProto.INT8})
    _refused(model, tmp_path, capsys, "'Q'", "both dequantized", "raw integers", "'raw_lookup'")


def test_dequantize_linear_and_raw_reader_is_refused_as_such(tmp_path: Path, onnx_kit: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    dql = _dql(Q8, np.float32(0.5))
    nodes = [*dql.graph.node, helper.make_node("Gather", ["Q", "ids"], ["raw"], name="raw_lookup")]
    model = _model(onnx_kit, nodes, list(dql.graph.initializer), {"out": TensorProto.FLOAT, "raw": TensorProto.INT8})
    _refused(model, tmp_path, capsys, "both dequantized", "'raw_lookup'")


# ------------------------------------------------------------------------------ float16 that cannot be exact


def _widened_zero_point(scale_dtype: type) -> onnx.ModelProto:
    """``Gather(DequantizeLinear(Cast(Q, INT16), s, z_int16, axis=1), ids)``: int8 codes, 16-bit zero points."""
    zero = np.array([2049, -2051, 3001, 4097, -4099, 8191, 1025, -3, 30001, -30001, 5003, 12345], np.int16)
    nodes = [helper.make_node("Cast", ["Q"], ["Q16"], name="widen", to=TensorProto.INT16),
             helper.make_node("DequantizeLinear", ["Q16", "S", "Z"], ["W"], name="dq", axis=1),
             helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")]
    scale = np.full(D, 0.0999755859375, scale_dtype)
    out = helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("out", out, ["n", D])],
                              [_init("Q", Q8), _init("S", scale), _init("Z", zero)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_float16_vectors_with_a_16_bit_zero_point_are_refused(tmp_path: Path, onnx_kit: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _refused(_widened_zero_point(np.float16), tmp_path, capsys, "'Q'", "zero point is int16", "float16")
    table = _extract(_widened_zero_point(np.float32), tmp_path / "f32")  # float32 vectors: exact, served
    _every_backend_is_the_model(onnx_kit, _widened_zero_point(np.float32), table)


def _nan_payload_scale(shape: tuple[int, ...]) -> np.ndarray:
    scale = np.full(shape, 0.125, np.float16)
    scale.reshape(-1).view(np.uint16)[-1] = 0x7E03  # a NaN with a payload
    return scale


@pytest.mark.parametrize("shape,axis", [((), None), ((D,), 1)])
def test_float16_scale_holding_nan_is_refused(shape: tuple[int, ...], axis: int | None, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    attrs = {} if axis is None else {"axis": axis}
    model = _dql(Q8, _nan_payload_scale(shape), opset=21, out_type=TensorProto.FLOAT16, **attrs)
    _refused(model, tmp_path, capsys, "'Q'", "NaN")


def test_onnxruntime_check_recommends_no_other_backend_for_a_quantized_table() -> None:
    """A table that skipped validation (a NaN payload in its float16 scale): onnxruntime's canonical NaN differs
    from NumPy's row 0, and neither backend is known to be right, so none is recommended."""
    table = EmbeddingTable("t", Q8)
    object.__setattr__(table, "quantization", Quantization("mul", _nan_payload_scale((1,)), out_dtype="float16"))
    with pytest.raises(BackendError, match="cannot be served exactly") as info:
        lookup(table, "onnxruntime")
    assert "numpy" not in str(info.value) and "torch" not in str(info.value)


# ------------------------------------------------------------------------------ recognised, or refused


def _row_scale_graph(scale: TensorProto, scale_cast: int | None, rows_casts: tuple[int, ...] = (TensorProto.FLOAT,),
                     out_casts: tuple[int, ...] = ()) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """``Cast*(Gather(Q)) / Unsqueeze(Cast?(Gather(S)))``, then ``out_casts``."""
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["r0"], name="lookup")]
    for i, to in enumerate(rows_casts):
        nodes.append(helper.make_node("Cast", [f"r{i}"], [f"r{i + 1}"], name=f"rows_cast{i}", to=to))
    nodes.append(helper.make_node("Gather", ["S", "ids"], ["s0"], name="scale_lookup"))
    if scale_cast is not None:
        nodes.append(helper.make_node("Cast", ["s0"], ["s1"], name="scale_cast", to=scale_cast))
    nodes += [helper.make_node("Unsqueeze", ["s1" if scale_cast is not None else "s0", "axes"], ["s"], name="expand"),
              helper.make_node("Div", [f"r{len(rows_casts)}", "s"], ["o0"], name="dequantize")]
    for i, to in enumerate(out_casts):
        nodes.append(helper.make_node("Cast", [f"o{i}"], [f"o{i + 1}"], name=f"out_cast{i}", to=to))
    nodes.append(helper.make_node("Identity", [f"o{len(out_casts)}"], ["out"], name="out"))
    return nodes, [_init("Q", Q8), scale, _init("axes", np.array([1], np.int64))]


def test_row_scale_widened_after_its_gather_is_served_exactly(tmp_path: Path, onnx_kit: Any) -> None:
    scale = (np.random.default_rng(8).random(V) * 50 + 1).astype(np.float16)
    nodes, inits = _row_scale_graph(_init("S", scale), TensorProto.FLOAT)
    model = _model(onnx_kit, nodes, inits, {"out": TensorProto.FLOAT})
    table = _extract(model, tmp_path)
    quant = table.quantization
    assert quant is not None and quant.scheme == "row_div" and quant.out_dtype == "float32"
    assert quant.scale.tobytes() == scale.astype(np.float32).tobytes()
    _every_backend_is_the_model(onnx_kit, model, table)


def test_row_scale_narrowed_after_its_gather_is_refused(tmp_path: Path, onnx_kit: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    nodes, inits = _row_scale_graph(_init("S", _scale(V).astype(np.float64)), TensorProto.FLOAT)
    model = _model(onnx_kit, nodes, inits, {"out": TensorProto.FLOAT})
    _refused(model, tmp_path, capsys, "'Q'", "float64 to float32")


def _bfloat16(name: str, values: np.ndarray) -> TensorProto:
    bits = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), bits.tobytes(), raw=True)


def test_dequantization_in_bfloat16_is_refused_as_such(tmp_path: Path, onnx_kit: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The graph of a Keras int8 layer under bfloat16 after the bfloat16 repair: Casts around the Div."""
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    nodes, inits = _row_scale_graph(_bfloat16("S", _scale(V) * 100), f32, (bf16, f32), (bf16, f32))
    model = _model(onnx_kit, nodes, inits, {"out": f32})
    _refused(model, tmp_path, capsys, "'Q'", "bfloat16", "'dequantize'")


@pytest.mark.parametrize("how", ["scale_input", "dequantize_after_gather"])
def test_unrecognised_dequantization_of_an_integer_table_is_refused(how: str, tmp_path: Path, onnx_kit: Any,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    if how == "scale_input":  # rows divided by a value the model computes: no constant scale to store
        nodes = [helper.make_node("Gather", ["Q", "ids"], ["rows"], name="lookup"),
                 helper.make_node("Cast", ["rows"], ["rows_f"], name="cast", to=TensorProto.FLOAT),
                 helper.make_node("Div", ["rows_f", "divisor"], ["out"], name="dequantize")]
        inputs = [onnx_kit.ids(), onnx_kit.value("divisor", TensorProto.FLOAT, [1])]
    else:
        nodes = [helper.make_node("Gather", ["Q", "ids"], ["rows"], name="lookup"),
                 helper.make_node("DequantizeLinear", ["rows", "S"], ["out"], name="dequantize")]
        inputs = [onnx_kit.ids()]
    model = onnx_kit.model(nodes, inputs, [onnx_kit.value("out", TensorProto.FLOAT, ["n", D])],
                           [_init("Q", Q8), _init("S", np.float32(0.5))], opset=21)
    _refused(model, tmp_path, capsys, "'Q'", "does not recognise", "'dequantize'")


def test_float_table_scaled_after_its_gather_is_a_plain_table(tmp_path: Path, onnx_kit: Any) -> None:
    """Only integer rows are dequantized: a float table multiplied after the lookup (``* sqrt(d)``) is stored as is."""
    rows = np.random.default_rng(3).standard_normal((V, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["rows"], name="lookup"),
             helper.make_node("Mul", ["rows", "k"], ["out"], name="scale")]
    model = _model(onnx_kit, nodes, [_init("Q", rows), _init("k", np.float32(8.0))], {"out": TensorProto.FLOAT})
    table = _extract(model, tmp_path)
    assert table.quantization is None and table.data.tobytes() == rows.tobytes()
