"""Quantized tables in ONNX models made with onnx.helper: scan, extract, store, every backend, parity.

Each case is a small model whose output is the dequantized embedding; every backend must return
exactly (bitwise) what onnxruntime computes running that model, for every id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.backends import lookup
from bridge.errors import ChecksumError, InputError, UnsupportedError
from bridge.extract import extract
from bridge.parity import table_parity
from bridge.quantization import Quantization, dense
from bridge.scan import scan
from bridge.store import open_store, write_store
from bridge.store_parity import ONNX_REFERENCE, store_parity
from bridge.table import EmbeddingTable

V, D, BLOCK = 37, 12, 5
G = -(-D // BLOCK)
BACKENDS = ("numpy", "torch", "onnxruntime")
RNG = np.random.default_rng(7)
Q8 = RNG.integers(-128, 128, (V, D)).astype(np.int8)
QU8 = RNG.integers(0, 256, (V, D)).astype(np.uint8)
Q4 = RNG.integers(-8, 8, (V, D)).astype(np.int8)


def _scale(*shape: int) -> np.ndarray:
    return (RNG.random(shape) * 0.2 + 1e-3).astype(np.float32)


def _init(name: str, array: Any) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, opset: int = 17,
           ids_shape: tuple[str, ...] = ("n",), out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "quantized", [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape))],
        [helper.make_tensor_value_info("out", out_type, [*ids_shape, D])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _dql(q: Any, scale: Any, zero: Any = None, opset: int = 17, out_type: int = TensorProto.FLOAT,
         **attrs: int) -> onnx.ModelProto:
    """``Gather(DequantizeLinear(Q, scale[, zero]), ids)`` (``out_type``: the output's ONNX element type)."""
    inputs = ["Q", "S"] + (["Z"] if zero is not None else [])
    inits = [_init("Q", q), _init("S", scale)] + ([_init("Z", zero)] if zero is not None else [])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["W"], name="dq", **attrs),
             helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")]
    return _model(nodes, inits, opset=opset, out_type=out_type)


def _mul(scale: np.ndarray, scale_first: bool = False) -> onnx.ModelProto:
    """``Gather(Mul(Cast(Q), scale), ids)`` (or ``Mul(scale, Cast(Q))``)."""
    operands = ["S", "Qf"] if scale_first else ["Qf", "S"]
    nodes = [helper.make_node("Cast", ["Q"], ["Qf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", operands, ["W"], name="scale"),
             helper.make_node("Gather", ["W", "ids"], ["out"], name="lookup")]
    return _model(nodes, [_init("Q", Q8), _init("S", scale)])


def _keras_int8(op: str = "Div") -> onnx.ModelProto:
    """tf2onnx's Keras int8 graph: ``Cast(Gather(Q, ids)) / Unsqueeze(Gather(S, ids), axes=[1])``."""
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["q_rows"], name="lookup"),
             helper.make_node("Cast", ["q_rows"], ["q_float"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Gather", ["S", "ids"], ["s_rows"], name="scale_lookup"),
             helper.make_node("Unsqueeze", ["s_rows", "axes"], ["s_col"], name="expand"),
             helper.make_node(op, ["q_float", "s_col"], ["out"], name="dequantize")]
    return _model(nodes, [_init("Q", Q8), _init("S", _scale(V)), _init("axes", np.array([1], np.int64))])


def _keras_int4() -> onnx.ModelProto:
    """tf2onnx's Keras int4 (block_size) graph: ``(Cast(Q[ids]) - Cast(Z[ids][:, g])) * S[ids][:, g]``."""
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["q_rows"], name="lookup"),
             helper.make_node("Cast", ["q_rows"], ["q_float"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Gather", ["Z", "ids"], ["z_rows"], name="zero_rows"),
             helper.make_node("Gather", ["z_rows", "g_idx"], ["z_cols"], name="zero_cols", axis=-1),
             helper.make_node("Cast", ["z_cols"], ["z_float"], name="zero_cast", to=TensorProto.FLOAT),
             helper.make_node("Gather", ["S", "ids"], ["s_rows"], name="scale_rows"),
             helper.make_node("Gather", ["s_rows", "g_idx"], ["s_cols"], name="scale_cols", axis=-1),
             helper.make_node("Sub", ["q_float", "z_float"], ["centered"], name="sub"),
             helper.make_node("Mul", ["centered", "s_cols"], ["out"], name="mul")]
    zero = RNG.integers(-8, 8, (V, G)).astype(np.int8)
    g_idx = np.arange(D, dtype=np.int64) // BLOCK
    return _model(nodes, [_init("Q", Q4), _init("Z", zero), _init("S", _scale(V, G)), _init("g_idx", g_idx)])


#: case -> (model builder, expected scheme, expected axis)
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str, int | None]] = {
    "dql_per_tensor": (lambda: _dql(Q8, np.float32(0.0371), np.int8(-3)), "affine", None),
    "dql_per_row_uint8": (lambda: _dql(QU8, _scale(V), RNG.integers(0, 256, V).astype(np.uint8), axis=0),
                          "affine", 0),
    "dql_per_column": (lambda: _dql(Q8, _scale(D), axis=1), "affine", 1),
    "dql_blocked": (lambda: _dql(Q4, _scale(V, G), RNG.integers(-8, 8, (V, G)).astype(np.int8), opset=21,
                                 axis=1, block_size=BLOCK), "group_affine", None),
    "mul_per_tensor": (lambda: _mul(np.float32(0.0173)), "mul", None),
    "mul_per_row": (lambda: _mul(_scale(V, 1)), "mul", 0),
    "mul_per_column_scale_first": (lambda: _mul(_scale(1, D), scale_first=True), "mul", 1),
    "keras_int8": (lambda: _keras_int8(), "row_div", None),
    "row_mul": (lambda: _keras_int8("Mul"), "mul", 0),
    "keras_int4_blocks": (lambda: _keras_int4(), "group_affine", None),
}


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    flat = session.run(None, {"ids": ids.reshape(-1).astype(np.int64)})[0]
    return flat.reshape(ids.shape + (D,))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[onnx.ModelProto, Path]]:
    """Each case's model saved and extracted once: ``case -> (model, store dir)``."""
    cache: dict[str, tuple[onnx.ModelProto, Path]] = {}

    def get(case: str) -> tuple[onnx.ModelProto, Path]:
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            model = CASES[case][0]()
            onnx.save(model, root / "model.onnx")
            extract(root / "model.onnx", root / "store")
            cache[case] = (model, root)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_scan_finds_one_quantized_table(case: str) -> None:
    (ref,) = scan(CASES[case][0]())
    assert ref.initializer == "Q" and ref.quantization is not None


@pytest.mark.parametrize("case", CASES)
def test_store_round_trip_keeps_integers_and_parameters(case: str, extracted: Any) -> None:
    model, root = extracted(case)
    table = open_store(root / "store")["Q"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quant = table.quantization
    assert quant is not None and (quant.scheme, quant.axis) == CASES[case][1:]
    assert table.data.dtype == inits["Q"].dtype and table.data.tobytes() == inits["Q"].tobytes()
    assert quant.scale.tobytes() == inits["S"].tobytes()
    if "Z" in inits:
        assert quant.zero_point is not None and quant.zero_point.tobytes() == inits["Z"].tobytes()
    assert table.served_dtype == np.float32 and table.dtype == inits["Q"].dtype


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_equals_onnxruntime_on_the_model(case: str, backend: str, extracted: Any) -> None:
    model, root = extracted(case)
    table = open_store(root / "store")["Q"]
    fn = lookup(table, backend)
    for ids in (np.arange(V), RNG.integers(0, V, (3, 5)), np.array(V - 1), RNG.integers(0, V, 2000)):
        got = fn(ids)
        assert got.dtype == np.float32 and got.shape == ids.shape + (D,)
        assert got.tobytes() == _run(model, ids).tobytes()
    assert dense(table).tobytes() == _run(model, np.arange(V)).tobytes()


@pytest.mark.parametrize("case", CASES)
def test_store_parity_passes_against_the_models_own_lookup(case: str, extracted: Any) -> None:
    _, root = extracted(case)
    report = store_parity(root / "store", onnx_model=root / "model.onnx")
    assert report, report.to_text()
    assert {c.backend for c in report.comparisons} == {*BACKENDS, ONNX_REFERENCE}


@pytest.mark.parametrize("policy", ["clip", "zero", "oov", "wrap"])
def test_policies_apply_to_dequantized_vectors(policy: str, extracted: Any) -> None:
    _, root = extracted("keras_int4_blocks")
    report = table_parity(open_store(root / "store")["Q"], BACKENDS, policy, oov_id=3)
    assert report, report.to_text()
    zero = lookup(open_store(root / "store")["Q"], "torch", "zero")(np.array([V + 5, -1]))
    assert not zero.any() and zero.dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_and_native_types(backend: str, extracted: Any) -> None:
    model, root = extracted("keras_int8")
    fn = lookup(open_store(root / "store")["Q"], backend)
    ids = RNG.integers(0, V, (4, 6))
    out = np.full(ids.shape + (D,), np.nan, np.float32)
    assert fn(ids, out=out) is out and out.tobytes() == _run(model, ids).tobytes()
    native = fn.native(ids)
    kind = {"numpy": "ndarray", "torch": "Tensor", "onnxruntime": "OrtValue"}[backend]
    assert type(native).__name__ == kind
    with pytest.raises(InputError, match="out="):
        fn(ids, out=np.empty(ids.shape + (D,), np.int8))


def test_manifest_records_parameter_files(extracted: Any) -> None:
    _, root = extracted("dql_per_row_uint8")
    (entry,) = json.loads((root / "store" / "manifest.json").read_text())["tables"]
    quant = entry["quantization"]
    assert entry["dtype"] == "uint8" and quant["scheme"] == "affine" and quant["axis"] == 0
    assert quant["out_dtype"] == "float32" and quant["group_size"] is None
    for key in ("scale", "zero_point"):
        param = quant[key]
        assert param["shape"] == [V] and param["data_offset"] % 64 == 0
        data = np.load(root / "store" / param["file"], allow_pickle=False)
        assert data.dtype.name == param["dtype"] and list(data.shape) == param["shape"]


@pytest.mark.parametrize("key", ["scale", "zero_point"])
def test_checksum_covers_scale_and_zero_point(key: str, extracted: Any, tmp_path: Path) -> None:
    _, root = extracted("dql_per_row_uint8")
    store = write_store(tmp_path / "copy", [open_store(root / "store")["Q"]])
    path = store.path / store.entry("Q")["quantization"][key]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=key):
        open_store(store.path)


def test_manifest_without_quantization_is_a_plain_table(tmp_path: Path) -> None:
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    store = write_store(tmp_path / "plain", [EmbeddingTable("t", table)])
    assert "quantization" not in store.entry("t") and store["t"].quantization is None
    assert lookup(store["t"], "numpy")(np.array([2])).tobytes() == table[2:].tobytes()


def test_unsupported_scale_shape_is_refused(tmp_path: Path) -> None:
    onnx.save(_mul(_scale(V, D)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match="scale has shape"):
        extract(tmp_path / "m.onnx", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_keras_int4_scale_and_zero_are_not_tables() -> None:
    model = _keras_int4()
    (ref,) = scan(model)
    assert ref.quantization == {"scheme": "group_affine", "scale": "S", "zero_point": "Z", "g_idx": "g_idx"}


@pytest.mark.parametrize("bad", [
    lambda: Quantization("unknown", np.ones(3, np.float32)),
    lambda: Quantization("row_div", np.ones((3, 1), np.float32)),
    lambda: Quantization("group_affine", np.ones((3, 2), np.float32)),
    lambda: Quantization("affine", np.ones(3, np.float32)),
    lambda: Quantization("affine", np.ones(3, np.float32), np.ones(2, np.int8), axis=0),
    lambda: Quantization("mul", np.ones(3, np.int32), axis=0),
    lambda: EmbeddingTable("t", Q8, quantization=Quantization("row_div", np.ones(V + 1, np.float32))),
    lambda: EmbeddingTable("t", Q8, quantization=Quantization("affine", np.ones(V, np.float32), axis=1)),
])
def test_inconsistent_quantization_is_an_input_error(bad: Callable[[], Any]) -> None:
    with pytest.raises(InputError):
        bad()


def test_float_data_cannot_be_quantized() -> None:
    with pytest.raises(UnsupportedError, match="8- or 16-bit integers"):
        EmbeddingTable("t", Q8.astype(np.float32), quantization=Quantization("row_div", np.ones(V, np.float32)))


def test_dense_of_a_plain_table_is_the_table() -> None:
    data = np.ones((2, 3), np.float32)
    assert dense(EmbeddingTable("t", data)) is data


def _by_hand(q: np.ndarray, quant: Quantization) -> np.ndarray:
    """Each scheme's formula over the whole table, written out with explicit broadcasting."""
    dt = quant.dtype
    qf, scale = q.astype(dt), quant.scale.astype(dt)
    zero = None if quant.zero_point is None else quant.zero_point.astype(dt)
    if quant.scheme == "row_div":
        return qf / scale[:, None]
    if quant.scheme == "group_affine":
        g = np.arange(q.shape[1]) // int(quant.group_size or 1)
        return (qf - (0 if zero is None else zero[:, g])) * scale[:, g]
    shape = {None: (1, 1), 0: (-1, 1), 1: (1, -1)}[quant.axis]
    centered = qf if zero is None else qf - zero.reshape(shape)
    return centered * scale.reshape(shape)


@pytest.mark.parametrize("scale_dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
@pytest.mark.parametrize("out_dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("scheme", ["row_div", "group_affine", "affine", "mul"])
def test_every_integer_and_float_type_on_every_backend(dtype: str, out_dtype: str, scheme: str,
                                                       scale_dtype: str) -> None:
    """Bitwise on every backend, also where the scale is wider than the output (cast down first)."""
    info = np.iinfo(dtype)
    q = RNG.integers(info.min, info.max, (V, D), endpoint=True).astype(dtype)
    zero = RNG.integers(info.min, info.max, (V, G), endpoint=True).astype(dtype)
    scale = (RNG.random((V, G)) + 0.5).astype(scale_dtype)
    quant = {
        "row_div": lambda: Quantization(scheme, scale[:, 0], out_dtype=out_dtype),
        "group_affine": lambda: Quantization(scheme, scale, zero, group_size=BLOCK, out_dtype=out_dtype),
        "affine": lambda: Quantization(scheme, scale[:, 0], zero[:, 0], axis=0, out_dtype=out_dtype),
        "mul": lambda: Quantization(scheme, scale[0, :1], out_dtype=out_dtype),
    }[scheme]()
    if out_dtype == "float16" and dtype.endswith("16"):  # a 16-bit integer is not exact in float16
        with pytest.raises(UnsupportedError, match="8-bit for float16"):
            EmbeddingTable("t", q, quantization=quant)
        return
    table = EmbeddingTable("t", q, quantization=quant)
    expected = _by_hand(q, quant)
    assert expected.dtype == out_dtype and dense(table).tobytes() == expected.tobytes()
    ids = RNG.integers(0, V, (2, 50))
    for backend in BACKENDS:
        assert lookup(table, backend)(ids).tobytes() == expected[ids].tobytes(), backend


def test_big_endian_scale_serves_the_same_vectors_everywhere() -> None:
    q = RNG.integers(-128, 128, (V, D)).astype(np.int8)
    scale = (RNG.random(V) + 0.5).astype(np.float32)
    native = EmbeddingTable("t", q, quantization=Quantization("row_div", scale))
    swapped = EmbeddingTable("t", q, quantization=Quantization("row_div", scale.astype(">f4")))
    ids = RNG.integers(0, V, 40)
    want = lookup(native, "numpy")(ids)
    for backend in BACKENDS:
        assert lookup(swapped, backend)(ids).tobytes() == want.tobytes(), backend
