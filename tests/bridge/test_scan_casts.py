"""Tables read through ``Cast`` and ``DequantizeLinear(output_dtype=...)``: the store serves what the model reads.

Every case is a small model made with onnx.helper and run in onnxruntime; every backend's lookup of the
extracted table must equal the model's own output for every id, bit for bit (NaN payloads, -0.0, infinities,
subnormals and values that round included). Casts and output dtypes the store cannot reproduce exactly are
refused with an error naming the table and the cast.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.backends import lookup
from bridge.cli import main
from bridge.cli.model_cmds import inspect_rows
from bridge.errors import UnsupportedError
from bridge.extract import extract
from bridge.quantization import dense
from bridge.store import open_store
from bridge.store_parity import store_parity

BACKENDS = ("numpy", "torch", "onnxruntime")
BF16 = np.dtype(ml_dtypes.bfloat16)
D = 8
RNG = np.random.default_rng(11)
ONNX_TYPE = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
             "bfloat16": TensorProto.BFLOAT16, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
             "int16": TensorProto.INT16, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
             "bool": TensorProto.BOOL, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN, "string": TensorProto.STRING}
ORT_TYPE = {"tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64",
            "tensor(bfloat16)": "bfloat16", "tensor(int32)": "int32"}


def _dtype(name: str) -> np.dtype[Any]:
    return BF16 if name == "bfloat16" else np.dtype(name)


def _nan_patterns(dtype: np.dtype[Any]) -> np.ndarray:
    """NaNs: quiet, signaling, with payloads, both signs."""
    bits, nmant = dtype.itemsize * 8, int(ml_dtypes.finfo(dtype).nmant)
    exp, sign, quiet = ((1 << (bits - 1 - nmant)) - 1) << nmant, 1 << (bits - 1), 1 << (nmant - 1)
    patterns = [exp | quiet, sign | exp | quiet, exp | 1, exp | (quiet >> 1), sign | exp | 3 | (quiet >> 2),
                exp | (2 * quiet - 1)]
    return np.array(patterns, np.uint64).astype(f"u{dtype.itemsize}").view(dtype)


def _float_specials(dtype: np.dtype[Any]) -> np.ndarray:
    """Infinities, zeros, subnormals, the extremes (NaNs are refused under a cast: see the NaN test)."""
    bits, nmant = dtype.itemsize * 8, int(ml_dtypes.finfo(dtype).nmant)
    exp, sign, quiet = ((1 << (bits - 1 - nmant)) - 1) << nmant, 1 << (bits - 1), 1 << (nmant - 1)
    patterns = [exp, sign | exp, 0, sign, 1, sign | 1, quiet, 2 * quiet - 1, exp - 1]
    return np.array(patterns, np.uint64).astype(f"u{dtype.itemsize}").view(dtype)


def _rounding_values() -> np.ndarray:
    """Values at and around the rounding points of every float type (ties, overflow, underflow)."""
    return np.array([1 / 3, -2 / 3, 65504, 65519.99, 65520, -65536, 1e-8, 6e-8, 3e-8, 2.98e-8, 5.96e-8, 1 + 2**-11,
                     1 + 2**-11 + 2**-40, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 2**-8 + 2**-30, 3 * 2**-9 + 1,
                     1 + 2**-24, 1 + 2**-24 + 2**-50, 1 + 3 * 2**-24, 3.4e38, 3.5e38, 1e-40, 1e-45, 1e300, 1e-310,
                     5e-324, 2.0**-126, 2.0**-133, 2.0**-134, 2.0**-149], np.float64)


def _float_table(dtype: np.dtype[Any]) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        rounding = _rounding_values().astype(dtype)
        scaled = RNG.standard_normal(160) * 10.0 ** RNG.integers(-12, 8, 160)
        values = np.concatenate([_float_specials(dtype), rounding, scaled.astype(dtype)])
    return values[: values.size // D * D].reshape(-1, D)


def _int_table(dtype: np.dtype[Any]) -> np.ndarray:
    info = np.iinfo(dtype)
    edges = np.array([info.min, info.max, 0, -1 if info.min else 1, info.min + 1, info.max - 1], dtype)
    values = np.concatenate([edges, RNG.integers(info.min, info.max, 10 * D - edges.size, endpoint=True, dtype=dtype)])
    return values.reshape(-1, D)


def _table(dtype: np.dtype[Any]) -> np.ndarray:
    return _int_table(dtype) if dtype.kind in "iu" else _float_table(dtype)


def _init(name: str, array: np.ndarray) -> TensorProto:
    if array.dtype == BF16:  # numpy_helper writes bfloat16 through float32; raw bits are exact
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


def _model(nodes: Sequence[onnx.NodeProto], inits: Sequence[TensorProto], out_type: int, *, opset: int = 21,
           outputs: Sequence[str] = ("out",), shape: Sequence[str | int] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "casts", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info(o, out_type, shape) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _cast_model(table: np.ndarray, chain: Sequence[str]) -> onnx.ModelProto:
    """``out = Gather(Cast(...Cast(W, to=chain[0])..., to=chain[-1]), ids)``, an Identity between casts."""
    nodes, current = [], "W"
    for i, to in enumerate(chain):
        nodes.append(helper.make_node("Cast", [current], [f"c{i}"], name="cast" if i == 0 else f"cast{i}",
                                      to=ONNX_TYPE[to]))
        nodes.append(helper.make_node("Identity", [f"c{i}"], [f"i{i}"], name=f"identity{i}"))
        current = f"i{i}"
    nodes.append(helper.make_node("Gather", [current, "ids"], ["out"], name="lookup"))
    return _model(nodes, [_init("W", table)], ONNX_TYPE[chain[-1]])


def _ort_rows(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    """The model's first output for ``ids``, bit for bit (read from the OrtValue: numpy has no bfloat16 in ORT)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    value = session.run_with_ort_values(None, {"ids": ort.OrtValue.ortvalue_from_numpy(ids.astype(np.int64))})[0]
    out = np.empty(tuple(value.shape()), _dtype(ORT_TYPE[value.data_type()]))
    ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out


def _assert_serves_the_model(store_dir: Path, name: str, model: onnx.ModelProto) -> None:
    table = open_store(store_dir)[name]
    rows = np.arange(table.rows)
    expected = _ort_rows(model, rows)
    assert table.served_dtype == expected.dtype
    assert dense(table).tobytes() == expected.tobytes()
    for backend in BACKENDS:
        fn = lookup(table, backend)
        for ids in (rows, RNG.integers(0, table.rows, (3, 7)), np.array(table.rows - 1)):
            got = fn(ids)
            assert got.dtype == expected.dtype and got.tobytes() == expected[ids].tobytes(), (backend, ids)


def _extract(model: onnx.ModelProto, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / "model.onnx")
    extract(root / "model.onnx", root / "store")
    return root / "store"


# ------------------------------------------------------------------------------ casts every backend serves

FLOAT_PAIRS = [("float32", "float16"), ("float32", "bfloat16"), ("float16", "float32"), ("float64", "float32"),
               ("float16", "bfloat16"), ("float16", "float64"), ("float32", "float64"), ("float64", "float16"),
               ("float64", "bfloat16"), ("bfloat16", "float16"), ("bfloat16", "float32"), ("bfloat16", "float64")]
INT_PAIRS = [("int8", "float32"), ("uint8", "bfloat16"), ("int8", "float16"), ("int16", "float32"),
             ("int32", "float64"), ("int8", "int32")]


@pytest.mark.parametrize(("src", "to"), FLOAT_PAIRS + INT_PAIRS)
def test_every_backend_serves_what_the_gather_reads_through_a_cast(tmp_path: Path, src: str, to: str) -> None:
    table = _table(_dtype(src))
    model = _cast_model(table, [to])
    store = _extract(model, tmp_path)
    extracted = open_store(store)["W"]
    assert extracted.dtype == _dtype(to) and extracted.quantization is None
    assert extracted.metadata["onnx"]["cast"] == {"from": src, "to": to, "chain": [to]}
    assert extracted.metadata["onnx"]["dtype"] == src  # the initializer, as the model stores it
    _assert_serves_the_model(store, "W", model)
    report = store_parity(store, onnx_model=tmp_path / "model.onnx")
    assert report, report.to_text()


def test_cli_parity_passes_on_a_float16_cast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _extract(_cast_model(_float_table(np.dtype(np.float32)), ["float16"]), tmp_path)
    code = main(["parity", str(store), "--onnx", str(tmp_path / "model.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "onnx-model" in out, out
    assert main(["lookup", str(store), "--table", "W", "--ids", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float16"


def test_a_chain_of_casts_rounds_as_the_model_does(tmp_path: Path) -> None:
    table = _float_table(np.dtype(np.float32))
    model = _cast_model(table, ["float16", "float32", "float32"])
    store = _extract(model, tmp_path)
    extracted = open_store(store)["W"]
    assert extracted.dtype == np.float32 and extracted.data.tobytes() != table.tobytes()
    assert extracted.metadata["onnx"]["cast"] == {"from": "float32", "to": "float32", "chain": ["float16", "float32"]}
    _assert_serves_the_model(store, "W", model)


def test_a_cast_to_the_tables_own_dtype_changes_nothing(tmp_path: Path) -> None:
    table = _float_table(np.dtype(np.float32))
    nodes = [helper.make_node("Cast", ["W"], ["Wc"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Gather", ["Wc", "ids"], ["out"], name="a"),
             helper.make_node("Gather", ["W", "ids"], ["out2"], name="b")]
    model = _model(nodes, [_init("W", table)], TensorProto.FLOAT, outputs=("out", "out2"))
    extracted = open_store(_extract(model, tmp_path))["W"]
    assert extracted.data.tobytes() == table.tobytes() and "cast" not in extracted.metadata["onnx"]


def test_a_constant_node_table_and_gathers_in_subgraphs(tmp_path: Path) -> None:
    """The Cast is in the main graph, the Gathers in both branches of an If; the table is a Constant node."""
    table = _float_table(np.dtype(np.float32))

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Gather", ["Wc", "ids"], [f"{name}_out"], name=f"{name}_lookup")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT16, None)])

    nodes = [helper.make_node("Constant", [], ["W"], name="table", value=_init("W", table)),
             helper.make_node("Cast", ["W"], ["Wc"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Constant", [], ["cond"], value=_init("cond", np.array(True))),
             helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=branch("then"),
                              else_branch=branch("else"))]
    model = _model(nodes, [], TensorProto.FLOAT16)
    store = _extract(model, tmp_path)
    extracted = open_store(store)["W"]
    assert extracted.dtype == np.float16 and extracted.metadata["onnx"]["source"] == "constant"
    assert {c["graph"] for c in extracted.metadata["onnx"]["consumers"]} == {"branch/then_branch", "branch/else_branch"}
    _assert_serves_the_model(store, "W", model)


def test_a_position_table_sliced_through_a_cast(tmp_path: Path) -> None:
    """``Slice(Cast(P, to=FLOAT16), 0, n)``: the model reads float16 rows; parity's slice reference agrees."""
    table = _float_table(np.dtype(np.float32))
    c = lambda name, v: _init(name, np.array(v, np.int64))  # noqa: E731
    nodes = [helper.make_node("Cast", ["P"], ["Ph"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Shape", ["ids"], ["n"], name="len"),
             helper.make_node("Slice", ["Ph", "zero", "n", "axis"], ["out"], name="positions")]
    model = _model(nodes, [_init("P", table), c("zero", [0]), c("axis", [0])], TensorProto.FLOAT16)
    store = _extract(model, tmp_path)
    extracted = open_store(store)["P"]
    assert extracted.dtype == np.float16 and extracted.metadata["onnx"]["cast"]["chain"] == ["float16"]
    _assert_serves_the_model(store, "P", model)
    report = store_parity(store, onnx_model=tmp_path / "model.onnx")
    assert report, report.to_text()


def test_ties_and_inspect_through_casts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A float16 model over a float32 table: the lookup and the tied head both read it through a Cast."""
    table = RNG.standard_normal((40, D)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["W"], ["Wh"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Gather", ["Wh", "ids"], ["emb"], name="lookup"),
             helper.make_node("Transpose", ["Wh"], ["WhT"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["emb", "WhT"], ["logits"], name="head"),
             helper.make_node("Cast", ["WT"], ["WTh"], name="cast_copy", to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["emb", "WTh"], ["logits2"], name="head2")]
    inits = [_init("W", table), _init("WT", np.ascontiguousarray(table.T))]
    model = _model(nodes, inits, TensorProto.FLOAT16, outputs=("emb", "logits", "logits2"))
    store = _extract(model, tmp_path)
    extracted = open_store(store)["W"]
    layouts = {(t["initializer"], t["layout"]) for t in extracted.metadata["ties"]}
    assert layouts == {("W", "shared"), ("WT", "transposed")}
    assert extracted.dtype == np.float16 and extracted.metadata["onnx"]["cast"]["to"] == "float16"
    _assert_serves_the_model(store, "W", model)
    (row,) = inspect_rows(tmp_path / "model.onnx")
    assert row["dtype"] == "float32" and row["consumers"][0]["via"] == ["Cast"]
    assert {(t["initializer"], t["layout"]) for t in row["ties"]} == layouts
    assert main(["inspect", str(tmp_path / "model.onnx")]) == 0
    assert "tied: WT (transposed)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ casts that are refused


@pytest.mark.parametrize(("src", "to", "why"), [
    ("float32", "int32", "only conversions among"),
    ("float16", "int8", "only conversions among"),
    ("float32", "bool", "only conversions among"),
    ("float32", "float8_e4m3fn", "only conversions among"),
    ("float32", "string", "cannot reproduce"),
    ("int32", "float32", "not every int32 value is exact in float32"),
    ("int16", "float16", "not every int16 value is exact in float16"),
    ("int16", "bfloat16", "not every int16 value is exact in bfloat16"),
    ("int64", "float64", "not every int64 value is exact in float64"),
    ("int64", "int32", "not every int64 value is exact in int32"),
    ("int8", "uint8", "not every int8 value is exact in uint8"),
])
def test_casts_that_cannot_be_reproduced_are_refused(tmp_path: Path, src: str, to: str, why: str) -> None:
    onnx.save(_cast_model(_table(_dtype(src)), [to]), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedError, match=rf"table 'W' is read through Cast 'cast' \({src} -> .*{why}"):
        extract(tmp_path / "model.onnx", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_one_table_read_through_different_casts_is_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["W"], ["Wh"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Gather", ["Wh", "ids"], ["out"], name="half"),
             helper.make_node("Gather", ["W", "ids"], ["out2"], name="full")]
    model = _model(nodes, [_init("W", _float_table(np.dtype(np.float32)))], TensorProto.FLOAT16,
                   outputs=("out", "out2"))
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(UnsupportedError, match=r"table 'W' is read through different casts .*'half'.*'full'"):
        extract(tmp_path / "model.onnx", tmp_path / "store")


def test_cli_extract_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(_cast_model(_table(np.dtype(np.float32)), ["int32"]), tmp_path / "model.onnx")
    assert main(["extract", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "store")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'W'" in err and "float32 -> int32" in err


# ------------------------------------------------------------------------------ casts in front of a dequantization


def _mul_cast_model(q: np.ndarray, chain: Sequence[str]) -> onnx.ModelProto:
    """``Gather(Mul(Cast(...Cast(Q)...), S), ids)`` with a per-tensor float32 scale."""
    nodes, current = [], "Q"
    for i, to in enumerate(chain):
        nodes.append(helper.make_node("Cast", [current], [f"q{i}"], name=f"cast{i}", to=ONNX_TYPE[to]))
        current = f"q{i}"
    nodes += [helper.make_node("Mul", [current, "S"], ["W"], name="scale"),
              helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")]
    return _model(nodes, [_init("Q", q), _init("S", np.array(0.0371, np.float32))], TensorProto.FLOAT)


def test_exact_casts_in_front_of_a_dequantization_are_kept(tmp_path: Path) -> None:
    q = _int_table(np.dtype(np.int8))
    model = _mul_cast_model(q, ["float16", "float32"])
    store = _extract(model, tmp_path)
    extracted = open_store(store)["Q"]
    assert extracted.dtype == np.int8 and extracted.data.tobytes() == q.tobytes()
    assert extracted.quantization is not None and "cast" not in extracted.metadata["onnx"]
    _assert_serves_the_model(store, "Q", model)


def test_a_rounding_cast_in_front_of_a_dequantization_is_refused(tmp_path: Path) -> None:
    """int16 through float16 rounds before the scale: the store would serve the unrounded integers."""
    onnx.save(_mul_cast_model(_int_table(np.dtype(np.int16)), ["float16", "float32"]), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedError, match=r"table 'Q' .*Cast 'cast0'.*not every int16 value is exact in float16"):
        extract(tmp_path / "model.onnx", tmp_path / "store")


# ------------------------------------------------------------------------------ DequantizeLinear output_dtype


def _dql_model(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, output_dtype: int, **attrs: Any
               ) -> onnx.ModelProto:
    """``Gather(DequantizeLinear(Q, S[, Z], output_dtype=...), ids)`` (opset 23)."""
    inputs = ["Q", "S"] + (["Z"] if zero is not None else [])
    inits = [_init("Q", q), _init("S", scale)] + ([_init("Z", zero)] if zero is not None else [])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["W"], name="dq", output_dtype=output_dtype, **attrs),
             helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")]
    model = _model(nodes, inits, output_dtype, opset=23, shape=["n", D])
    onnx.checker.check_model(model)
    return model


def _half_exact(*shape: int) -> np.ndarray:
    """float32 scales that float16 holds exactly."""
    return (RNG.random(shape) * 0.2 + 1e-3).astype(np.float16).astype(np.float32)


Q8 = _int_table(np.dtype(np.int8))
V = Q8.shape[0]
DQL_CASES: dict[str, tuple[Callable[[], tuple[Any, Any, Any, dict[str, int]]], str, int]] = {
    "per_tensor_zero": (lambda: (Q8, _half_exact(), np.array(-3, np.int8), {}), "float16", TensorProto.FLOAT16),
    "per_row": (lambda: (Q8, _half_exact(V), RNG.integers(-9, 9, V).astype(np.int8), {"axis": 0}),
                "float16", TensorProto.FLOAT16),
    "per_column": (lambda: (Q8, _half_exact(D), None, {"axis": 1}), "float16", TensorProto.FLOAT16),
    "blocked": (lambda: (Q8, _half_exact(V, 2), RNG.integers(-9, 9, (V, 2)).astype(np.int8),
                         {"axis": 1, "block_size": 4}), "float16", TensorProto.FLOAT16),
    "half_scale_float_out": (lambda: (Q8, np.asarray(RNG.random(V) * 0.3).astype(np.float16), None, {"axis": 0}),
                             "float32", TensorProto.FLOAT),
    "same_as_scale": (lambda: (Q8, np.array(0.0123456789, np.float32), None, {}), "float32", TensorProto.FLOAT),
}


@pytest.mark.parametrize("case", DQL_CASES)
def test_dequantize_linear_output_dtype_is_served(tmp_path: Path, case: str) -> None:
    build, served, output_dtype = DQL_CASES[case]
    q, scale, zero, attrs = build()
    model = _dql_model(q, scale, zero, output_dtype, **attrs)
    store = _extract(model, tmp_path)
    extracted = open_store(store)["Q"]
    assert extracted.quantization is not None and extracted.quantization.out_dtype == served
    assert extracted.data.tobytes() == q.tobytes() and extracted.quantization.scale.tobytes() == scale.tobytes()
    _assert_serves_the_model(store, "Q", model)
    report = store_parity(store, onnx_model=tmp_path / "model.onnx")
    assert report, report.to_text()
    (row,) = inspect_rows(tmp_path / "model.onnx")
    assert row["quantization"]["output_dtype"] == served


@pytest.mark.parametrize(("scale", "output_dtype", "why"), [
    (np.array(0.0123456789, np.float32), TensorProto.FLOAT16, "output_dtype is float16 while its float32 scale is not"),
    (np.full(D, 1e-9, np.float32), TensorProto.FLOAT16, "output_dtype is float16 while its float32 scale is not"),
    (np.array(0.5, np.float32), TensorProto.BFLOAT16, "output_dtype is bfloat16"),
])
def test_dequantize_linear_output_dtype_that_would_differ_is_refused(tmp_path: Path, scale: np.ndarray,
                                                                     output_dtype: int, why: str) -> None:
    attrs = {"axis": 1} if scale.ndim else {}
    onnx.save(_dql_model(Q8, scale, None, output_dtype, **attrs), tmp_path / "model.onnx")
    with pytest.raises(UnsupportedError, match=rf"table 'Q' is quantized .*{why}"):
        extract(tmp_path / "model.onnx", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_the_refused_output_dtype_really_differs_in_onnxruntime() -> None:
    """Why the refusal: onnxruntime rounds the float32 product once; rounding the scale first gives other values."""
    scale = np.array(0.0123456789, np.float32)
    got = _ort_rows(_dql_model(Q8, scale, None, TensorProto.FLOAT16), np.arange(V))
    assert got.tobytes() == (Q8.astype(np.float32) * scale).astype(np.float16).tobytes()
    assert got.tobytes() != (Q8.astype(np.float16) * scale.astype(np.float16)).tobytes()


def test_share_keeps_the_initializer_and_records_the_models_casts(tmp_path: Path) -> None:
    """The rewritten model reads the store's bytes and casts them itself, so share stores them uncast and says so."""
    from bridge.share import share

    table = _float_table(np.dtype(np.float32))
    model = _cast_model(table, ["float16"])
    onnx.save(model, tmp_path / "model.onnx")
    share([tmp_path / "model.onnx"], tmp_path / "shared")
    stored = open_store(tmp_path / "shared")["W"]
    assert stored.data.tobytes() == table.tobytes()
    assert stored.metadata["model_casts"]["chain"] == ["float16"]
    assert "lookups serve them uncast" in stored.metadata["model_casts"]["note"]


@pytest.mark.parametrize(("src", "to"), [("float32", "float16"), ("float16", "float32"), ("bfloat16", "float32")])
def test_a_table_with_nan_read_through_a_cast_is_refused(tmp_path: Path, src: str, to: str) -> None:
    """onnxruntime's cast of a NaN depends on its position (vector loop or scalar tail): no store can match."""
    table = _float_table(_dtype(src))
    table.reshape(-1)[-1] = _nan_patterns(_dtype(src))[2]  # a signalling NaN in the tail
    with pytest.raises(UnsupportedError, match="holds NaN values and the model casts it"):
        _extract(_cast_model(table, [to]), tmp_path)


@pytest.mark.parametrize("cast_first", [True, False])
def test_share_notes_readers_that_disagree_on_a_cast_in_any_order(tmp_path: Path, cast_first: bool) -> None:
    from bridge.share import share

    table = _float_table(np.dtype(np.float32))
    onnx.save(_cast_model(table, ["float16"]), tmp_path / "cast.onnx")
    onnx.save(_model([helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")], [_init("W", table)],
                     TensorProto.FLOAT), tmp_path / "plain.onnx")
    order = ["cast.onnx", "plain.onnx"] if cast_first else ["plain.onnx", "cast.onnx"]
    share([tmp_path / name for name in order], tmp_path / "shared")
    (name,) = list(open_store(tmp_path / "shared"))
    casts = open_store(tmp_path / "shared")[name].metadata["model_casts"]
    assert casts["note"].startswith("the models read these values through different casts")
    assert casts["readers"] == "float32 -> float16; no cast"


def test_share_lists_every_cast_its_readers_use(tmp_path: Path) -> None:
    from bridge.share import share

    table = _float_table(np.dtype(np.float32))
    onnx.save(_cast_model(table, ["float16"]), tmp_path / "h.onnx")
    onnx.save(_cast_model(table, ["bfloat16"]), tmp_path / "b.onnx")
    share([tmp_path / "h.onnx", tmp_path / "b.onnx"], tmp_path / "shared")
    (name,) = list(open_store(tmp_path / "shared"))
    readers = open_store(tmp_path / "shared")[name].metadata["model_casts"]["readers"]
    assert readers == "float32 -> bfloat16; float32 -> float16"
