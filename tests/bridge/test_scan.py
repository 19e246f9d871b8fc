"""bridge.scan: which initializers are embedding tables, checked against onnxruntime bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bridge.errors import ModelFormatError, UnsafePathError, UnsupportedError
from bridge.onnx_io import ExternalData, initializer_array
from bridge.scan import TableRef, Use, default_table_name, scan, scan_model, table_tensor

RNG = np.random.default_rng(1)
IDS = np.array([3, 0, 4, 4, 1], dtype=np.int64)


def _table(rows: int = 6, dim: int = 3, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal((rows, dim)).astype(dtype)


def _only(model: onnx.ModelProto) -> TableRef:
    tables = scan(model)
    assert len(tables) == 1, tables
    return tables[0]


def _values(model: onnx.ModelProto, ref: TableRef, base_dir: Path | None = None) -> np.ndarray:
    return initializer_array(table_tensor(model, ref), base_dir)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------ basic patterns


def test_plain_gather(onnx_kit) -> None:
    table = _table()
    model = onnx_kit.gather_model(table)
    ref = _only(model)
    assert ref == TableRef(initializer="W", shape=(6, 3), dtype="float32", graph="",
                           gathers=(Use("gather", "Gather", "", 0, ()),))
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    assert _same(out, np.take(_values(model, ref), IDS, axis=0))


def test_gather_through_identity_and_cast(onnx_kit) -> None:
    table = _table()
    model = onnx_kit.gather_model(table, chain=("Identity", "Cast", "Identity"), out_type=TensorProto.FLOAT16)
    ref = _only(model)
    assert ref.dtype == "float32"
    assert ref.gathers == (Use("gather", "Gather", "", 0, ("Identity", "Cast", "Identity")),)
    assert ref.quantization is None
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    assert _same(out, np.take(_values(model, ref), IDS, axis=0).astype(np.float16))


def test_two_gathers_on_one_initializer_give_one_table(onnx_kit) -> None:
    table = _table()
    nodes = [helper.make_node("Gather", ["W", "a"], ["ya"], name="ga"),
             helper.make_node("Gather", ["W", "b"], ["yb"], name="gb")]
    model = onnx_kit.model(nodes, [onnx_kit.ids("a"), onnx_kit.ids("b")],
                           [onnx_kit.value("ya", shape=["n", 3]), onnx_kit.value("yb", shape=["n", 3])],
                           [onnx_kit.init("W", table)])
    ref = _only(model)
    assert [u.node for u in ref.gathers] == ["ga", "gb"]
    ya, yb = onnx_kit.run_ort(model, {"a": IDS, "b": IDS[::-1].copy()})
    values = _values(model, ref)
    assert _same(ya, np.take(values, IDS, axis=0)) and _same(yb, np.take(values, IDS[::-1], axis=0))


def test_tied_projection_is_reported(onnx_kit) -> None:
    table = _table(rows=7, dim=4)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["h"], name="emb"),
             helper.make_node("Transpose", ["W"], ["WT"], name="wt", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "WT"], ["logits"], name="head"),
             helper.make_node("Gemm", ["h", "W"], ["logits2"], name="head2", transB=1),
             helper.make_node("Shape", ["W"], ["shape"], name="shape_of_w")]
    outs = [onnx_kit.value("h", shape=["n", 4]), onnx_kit.value("logits", shape=["n", 7]),
            onnx_kit.value("logits2", shape=["n", 7]), onnx_kit.value("shape", TensorProto.INT64, [2])]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], outs, [onnx_kit.init("W", table)])
    ref = _only(model)
    assert [u.node for u in ref.gathers] == ["emb"]
    assert [(u.node, u.op_type, u.input_index) for u in ref.tied] == [("wt", "Transpose", 0), ("head2", "Gemm", 1)]
    assert [u.node for u in ref.other] == ["shape_of_w"]
    assert [u.node for u in ref.consumers] == ["emb", "wt", "head2", "shape_of_w"]
    h, logits, logits2, _ = onnx_kit.run_ort(model, {"ids": IDS})
    values = _values(model, ref)
    assert _same(h, np.take(values, IDS, axis=0))
    np.testing.assert_allclose(logits, h @ values.T, rtol=1e-5, atol=1e-6)  # arithmetic: float32 tolerance
    np.testing.assert_allclose(logits2, h @ values.T, rtol=1e-5, atol=1e-6)


def test_gather_on_axis_1_is_not_a_table(onnx_kit) -> None:
    table = _table()
    node = helper.make_node("Gather", ["W", "ids"], ["out"], name="cols", axis=1)
    model = onnx_kit.model([node], [onnx_kit.ids()], [onnx_kit.value("out", shape=[6, "n"])],
                           [onnx_kit.init("W", table)])
    result = scan_model(model)
    assert result.tables == ()
    assert [(n.initializer, n.shape) for n in result.not_tables] == [("W", (6, 3))]
    assert "axis 1" in result.not_tables[0].reason
    cols = np.array([2, 0], dtype=np.int64)
    (out,) = onnx_kit.run_ort(model, {"ids": cols})
    assert _same(out, np.take(table, cols, axis=1))


def test_negative_axis_equal_to_rows_is_a_table(onnx_kit) -> None:
    node = helper.make_node("Gather", ["W", "ids"], ["out"], name="g", axis=-2)
    model = onnx_kit.model([node], [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 3])],
                           [onnx_kit.init("W", _table())])
    ref = _only(model)
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    assert _same(out, np.take(_values(model, ref), IDS, axis=0))


def test_gather_on_shape_output_is_ignored(onnx_kit) -> None:
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["dim0"], name="g")]
    model = onnx_kit.model(nodes, [onnx_kit.value("x", shape=[5, 2])], [onnx_kit.value("dim0", TensorProto.INT64, [])],
                           [onnx_kit.init("zero", np.array(0, dtype=np.int64))])
    result = scan_model(model)
    assert result.tables == () and result.not_tables == ()
    (out,) = onnx_kit.run_ort(model, {"x": np.zeros((5, 2), np.float32)})
    assert out == 5


def test_initializer_used_as_indices_is_ignored(onnx_kit) -> None:
    indices = np.array([[0, 1], [2, 0]], dtype=np.int64)
    node = helper.make_node("Gather", ["x", "I"], ["out"], name="g")
    model = onnx_kit.model([node], [onnx_kit.value("x", shape=[3, 4])], [onnx_kit.value("out", shape=[2, 2, 4])],
                           [onnx_kit.init("I", indices)])
    assert scan_model(model).tables == ()
    x = _table(3, 4)
    (out,) = onnx_kit.run_ort(model, {"x": x})
    assert _same(out, np.take(x, indices, axis=0))


def test_rank_1_gather_data_is_noted_not_a_table(onnx_kit) -> None:
    scale = np.array([0.5, 0.25, 2.0, 4.0], dtype=np.float32)
    nodes = [helper.make_node("Gather", ["S", "ids"], ["s"], name="row_scale")]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("s", shape=["n"])], [onnx_kit.init("S", scale)])
    result = scan_model(model)
    assert result.tables == ()
    (note,) = result.not_tables
    assert (note.initializer, note.shape, note.dtype) == ("S", (4,), "float32")
    assert "rank-1" in note.reason and "row_scale" in note.reason


def test_constant_node_table(onnx_kit) -> None:
    table = _table()
    nodes = [helper.make_node("Constant", [], ["C"], name="const", value=onnx_kit.init("c", table)),
             helper.make_node("Gather", ["C", "ids"], ["out"])]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 3])])
    ref = _only(model)
    assert (ref.initializer, ref.source, ref.gathers[0].node) == ("C", "constant", "Gather#1")
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    assert _same(out, np.take(_values(model, ref), IDS, axis=0))


# ------------------------------------------------------------------------------ subgraphs


def _loop_model(onnx_kit, table: np.ndarray, body_initializers: list[TensorProto] = ()) -> onnx.ModelProto:
    """``rows = Loop(n) { Gather(W, i) }``: row i of the outer W at iteration i."""
    dim = table.shape[1]
    body = onnx_kit.graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Gather", ["W", "i"], ["row"], name="body_gather")],
        [onnx_kit.value("i", TensorProto.INT64, []), onnx_kit.value("cond_in", TensorProto.BOOL, [])],
        [onnx_kit.value("cond_out", TensorProto.BOOL, []), onnx_kit.value("row", shape=[dim])],
        initializers=body_initializers, name="body")
    loop = helper.make_node("Loop", ["n", ""], ["rows"], name="loop", body=body)
    return onnx_kit.model([loop], [onnx_kit.value("n", TensorProto.INT64, [])],
                          [onnx_kit.value("rows", shape=["n", dim])], [onnx_kit.init("W", table)],
                          check=not body_initializers)


def test_loop_body_gather_reads_outer_initializer(onnx_kit) -> None:
    model = _loop_model(onnx_kit, _table())
    ref = _only(model)
    assert (ref.initializer, ref.graph) == ("W", "")
    assert ref.gathers == (Use("body_gather", "Gather", "loop/body", 0, ()),)
    (rows,) = onnx_kit.run_ort(model, {"n": np.array(4, dtype=np.int64)})
    assert _same(rows, np.take(_values(model, ref), np.arange(4), axis=0))


def test_body_initializer_shadows_outer_name(onnx_kit) -> None:
    inner = _table(5, 3)
    model = _loop_model(onnx_kit, _table(), body_initializers=[onnx_kit.init("W", inner)])
    ref = _only(model)
    assert (ref.initializer, ref.graph, ref.shape) == ("W", "loop/body", (5, 3))
    assert _same(np.asarray(_values(model, ref)), inner)


def test_if_branches_both_gather_outer_table(onnx_kit) -> None:
    table = _table()

    def branch(name: str, ids: str) -> onnx.GraphProto:
        return onnx_kit.graph([helper.make_node("Gather", ["W", ids], [f"y_{name}"], name=f"g_{name}")], [],
                              [onnx_kit.value(f"y_{name}", shape=["n", 3])], name=name)

    node = helper.make_node("If", ["c"], ["out"], name="branch", then_branch=branch("t", "a"),
                            else_branch=branch("e", "b"))
    model = onnx_kit.model([node], [onnx_kit.value("c", TensorProto.BOOL, []), onnx_kit.ids("a"), onnx_kit.ids("b")],
                           [onnx_kit.value("out", shape=["n", 3])], [onnx_kit.init("W", table)])
    ref = _only(model)
    assert [(u.node, u.graph) for u in ref.gathers] == [("g_e", "branch/else_branch"), ("g_t", "branch/then_branch")]
    values = _values(model, ref)
    for flag, ids in ((True, IDS), (False, IDS[:2].copy())):
        (out,) = onnx_kit.run_ort(model, {"c": np.array(flag), "a": IDS, "b": IDS[:2].copy()})
        assert _same(out, np.take(values, ids, axis=0))


# ------------------------------------------------------------------------------ quantized


def test_dequantize_linear_then_gather(onnx_kit) -> None:
    q = RNG.integers(-128, 128, (6, 4), dtype=np.int8)
    scale = np.array([0.5, 0.25, 0.125, 2.0], dtype=np.float32)
    zero = np.array([0, 3, -2, 1], dtype=np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Q", "scale", "zp"], ["deq"], name="dq", axis=1),
             helper.make_node("Gather", ["deq", "ids"], ["out"], name="g")]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 4])],
                           [onnx_kit.init("Q", q), onnx_kit.init("scale", scale), onnx_kit.init("zp", zero)])
    ref = _only(model)
    assert (ref.initializer, ref.dtype) == ("Q", "int8")
    assert ref.gathers == (Use("g", "Gather", "", 0, ("DequantizeLinear",)),)
    assert ref.quantization == {"scheme": "dequantize_linear", "scale": "scale", "zero_point": "zp", "axis": 1}
    assert ref in {ref}  # hashable although quantization is a dict
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    rows = np.take(_values(model, ref), IDS, axis=0).astype(np.float32)
    assert _same(out, (rows - zero.astype(np.float32)) * scale)  # exact: small ints times powers of two


def test_gather_of_cast_int8_times_scale(onnx_kit) -> None:
    q = RNG.integers(-128, 128, (6, 4), dtype=np.int8)
    scale = np.array(0.0625, dtype=np.float32)
    nodes = [helper.make_node("Cast", ["Q"], ["qf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Identity", ["scale"], ["scale_id"], name="scale_id"),
             helper.make_node("Mul", ["scale_id", "qf"], ["deq"], name="mul"),
             helper.make_node("Gather", ["deq", "ids"], ["out"], name="g")]
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 4])],
                           [onnx_kit.init("Q", q), onnx_kit.init("scale", scale)])
    ref = _only(model)
    assert ref.gathers == (Use("g", "Gather", "", 0, ("Cast", "Mul")),)
    assert ref.quantization == {"scheme": "mul_cast", "scale": "scale"}
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    assert _same(out, np.take(_values(model, ref), IDS, axis=0).astype(np.float32) * scale)


def test_mul_by_non_constant_is_not_a_link(onnx_kit) -> None:
    nodes = [helper.make_node("Cast", ["Q"], ["qf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qf", "x"], ["deq"], name="mul"),
             helper.make_node("Gather", ["deq", "ids"], ["out"])]
    model = onnx_kit.model(nodes, [onnx_kit.ids(), onnx_kit.value("x", shape=[])],
                           [onnx_kit.value("out", shape=["n", 4])],
                           [onnx_kit.init("Q", np.ones((6, 4), np.int8))])
    assert scan(model) == []


def _row_scale_model(onnx_kit, q: np.ndarray, scale: np.ndarray, scale_ids: str = "ids") -> onnx.ModelProto:
    """The graph tf2onnx writes for a Keras int8 Embedding: ``Cast(Gather(Q, ids)) / Gather(S, ids)[:, None]``."""
    nodes = [helper.make_node("Gather", ["Q", "ids"], ["rows"], name="g_q"),
             helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["S", scale_ids], ["s"], name="g_s"),
             helper.make_node("Unsqueeze", ["s", "axes"], ["s2"]),
             helper.make_node("Div", ["rows_f", "s2"], ["out"], name="div")]
    inputs = [onnx_kit.ids()] + ([onnx_kit.ids(scale_ids)] if scale_ids != "ids" else [])
    return onnx_kit.model(nodes, inputs, [onnx_kit.value("out", shape=["n", q.shape[1]])],
                          [onnx_kit.init("Q", q), onnx_kit.init("S", scale),
                           onnx_kit.init("axes", np.array([-1], dtype=np.int64))])


def test_keras_int8_row_scale_after_gather(onnx_kit) -> None:
    q = RNG.integers(-127, 128, (6, 4), dtype=np.int8)
    scale = np.array([127.0, 63.5, 3.0, 0.7, 12.25, 1e-3], dtype=np.float32)
    model = _row_scale_model(onnx_kit, q, scale)
    result = scan_model(model)
    (ref,) = result.tables
    assert (ref.initializer, ref.dtype, ref.gathers[0].node) == ("Q", "int8", "g_q")
    assert ref.quantization == {"scheme": "row_scale", "op": "Div", "scale": "S"}
    assert [n.initializer for n in result.not_tables] == ["S"]  # the [V] scale is gathered too, rank 1
    (out,) = onnx_kit.run_ort(model, {"ids": IDS})
    rows = np.take(_values(model, ref), IDS, axis=0).astype(np.float32)
    assert _same(out, rows / scale[IDS][:, None])  # one IEEE division per element on both sides: exact


def test_row_scale_gathered_with_other_ids_is_not_quantization(onnx_kit) -> None:
    model = _row_scale_model(onnx_kit, np.ones((6, 4), np.int8), np.ones(6, np.float32), scale_ids="other")
    assert (_only(model).quantization or {}).get("scheme") == "unrecognized"  # not row_scale; extract refuses it


@pytest.mark.slow
def test_real_keras_int8_embedding_through_tf2onnx(onnx_kit) -> None:
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    ids = keras.Input((3,), dtype="int32", name="ids")
    plain, quant = keras.layers.Embedding(50, 8, name="tok_emb"), keras.layers.Embedding(40, 8, name="q_emb")
    model = keras.Model(ids, keras.layers.Add()([plain(ids), quant(ids)]))
    quant.quantize("int8")
    import tf2onnx

    proto, _ = tf2onnx.convert.from_keras(model, input_signature=(tf.TensorSpec((None, 3), tf.int32, name="ids"),),
                                          opset=17)
    tables = {default_table_name(t.initializer, set()): t for t in scan(proto)}
    assert set(tables) == {"tok_emb", "q_emb"}
    assert tables["tok_emb"].quantization is None
    assert tables["q_emb"].dtype == "int8" and tables["q_emb"].quantization["scheme"] == "row_scale"
    assert _same(np.asarray(_values(proto, tables["tok_emb"])), np.asarray(plain.embeddings))
    feed = np.array([[1, 39, 0]], dtype=np.int32)
    (out,) = onnx_kit.run_ort(proto, {proto.graph.input[0].name: feed})
    np.testing.assert_allclose(out, np.asarray(model(feed)), rtol=1e-6, atol=1e-6)


def test_scan_of_100k_nodes_is_fast(onnx_kit) -> None:
    import time

    tables, nodes, inits = 200, [], [onnx_kit.init("one", np.ones((), np.float32))]
    for t in range(tables):
        inits.append(helper.make_tensor(f"T{t}", TensorProto.FLOAT, [4, 2], np.zeros(8)))
        nodes += [helper.make_node("Cast", [f"T{t}"], [f"c{t}"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"c{t}", "ids"], [f"g{t}"]),
                  helper.make_node("Transpose", [f"T{t}"], [f"tt{t}"])]
    nodes += [helper.make_node("Add", [f"a{i}", "one"], [f"a{i + 1}"]) for i in range(100_000 - len(nodes))]
    last = nodes[-1].output[0]
    model = onnx_kit.model(nodes, [onnx_kit.value("a0", shape=[1]), onnx_kit.ids()],
                           [onnx_kit.value(last, shape=[1])], inits, check=False)
    start = time.perf_counter()
    found = scan(model)
    elapsed = time.perf_counter() - start
    assert [t.initializer for t in found] == [f"T{t}" for t in range(tables)]
    assert all(t.gathers[0].via == ("Cast",) and t.tied[0].op_type == "Transpose" for t in found)
    assert elapsed < 10, f"scan of 100k nodes took {elapsed:.1f} s"  # ~0.6 s measured on 2 shared cores


# ------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_float_tables_are_read_exactly(onnx_kit, dtype: type) -> None:
    bits = RNG.integers(0, 2**16, (6, 3), dtype=np.uint16)
    bits[bits & 0x7C00 == 0x7C00] = 0  # drop inf/NaN patterns for float16 so the compare is meaningful
    table = bits.view(dtype)
    model = onnx_kit.gather_model(table)
    ref = _only(model)
    assert ref.dtype == np.dtype(dtype).name
    values = _values(model, ref)
    assert _same(values, table)
    # onnxruntime gathers bfloat16 but cannot hand a bfloat16 output to numpy: widen it after the
    # Gather (bfloat16 and float16 -> float32 are exact) and compare the float32 bits.
    nodes = [helper.make_node("Gather", ["W", "ids"], ["rows"]),
             helper.make_node("Cast", ["rows"], ["out"], to=TensorProto.FLOAT)]
    widened = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 3])],
                             [onnx_kit.init("W", table)])
    (out,) = onnx_kit.run_ort(widened, {"ids": IDS})
    assert _same(out, np.take(values, IDS, axis=0).astype(np.float32))


def test_int4_table_is_reported_though_not_readable(onnx_kit) -> None:
    packed = helper.make_tensor("W4", TensorProto.INT4, [4, 2], [1, -2, 3, -4, 5, -6, 7, -8])
    node = helper.make_node("Gather", ["W4", "ids"], ["out"])
    model = onnx_kit.model([node], [onnx_kit.ids()], [onnx_kit.value("out", TensorProto.INT4, ["n", 2])], [packed],
                           opset=21)
    ref = _only(model)
    assert (ref.initializer, ref.dtype) == ("W4", "int4")
    with pytest.raises(UnsupportedError, match="INT4"):
        _values(model, ref)


# ------------------------------------------------------------------------------ external data


def _external_model(tmp_path: Path, onnx_kit, table: np.ndarray) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(onnx_kit.gather_model(table), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.data", size_threshold=0)
    return path


def test_external_table_is_reported_and_memory_mapped(tmp_path: Path, onnx_kit) -> None:
    table = _table(50, 8)
    path = _external_model(tmp_path, onnx_kit, table)
    model = onnx.load(path, load_external_data=False)
    ref = _only(model)
    assert ref.external == ExternalData("model.data", 0, table.nbytes)
    assert ref.to_json()["external"] == {"location": "model.data", "offset": 0, "length": table.nbytes}
    values = _values(model, ref, tmp_path)
    assert isinstance(values, np.memmap) and _same(np.asarray(values), table)
    (out,) = onnx_kit.run_ort(path, {"ids": IDS})
    assert _same(out, np.take(values, IDS, axis=0))


def test_scan_of_external_model_reads_no_data(tmp_path: Path, onnx_kit) -> None:
    path = _external_model(tmp_path, onnx_kit, _table(50, 8))
    before = scan(path)
    (tmp_path / "model.data").unlink()
    assert scan(path) == before
    with pytest.raises(ModelFormatError, match="missing"):
        initializer_array(table_tensor(onnx.load(path, load_external_data=False), before[0]), tmp_path)


@pytest.mark.parametrize("location", ["../x.bin", "/abs/x.bin", "link.bin"])
def test_unsafe_external_location_is_refused(tmp_path: Path, onnx_kit, location: str) -> None:
    base = tmp_path / "m"
    base.mkdir()
    path = _external_model(base, onnx_kit, _table())
    (tmp_path / "x.bin").write_bytes((base / "model.data").read_bytes())
    (base / "link.bin").symlink_to(tmp_path / "x.bin")
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    ref = _only(model)  # scanning only reports the location ...
    assert ref.external is not None and ref.external.location == location
    with pytest.raises(UnsafePathError):  # ... reading it is refused
        _values(model, ref, base)


# ------------------------------------------------------------------------------ order, json, names


def test_tables_are_ordered_by_first_gather_and_deterministic(onnx_kit) -> None:
    nodes = [helper.make_node("Gather", ["tok", "ids"], ["t"], name="g_tok"),
             helper.make_node("Gather", ["pos", "ids"], ["p"], name="g_pos"),
             helper.make_node("Add", ["t", "p"], ["out"])]
    inits = [onnx_kit.init("pos", _table(8, 3)), onnx_kit.init("tok", _table(9, 3))]  # reverse order on purpose
    model = onnx_kit.model(nodes, [onnx_kit.ids()], [onnx_kit.value("out", shape=["n", 3])], inits)
    first = scan(model)
    assert [t.initializer for t in first] == ["tok", "pos"]
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    assert [t.to_json() for t in scan(copy)] == [t.to_json() for t in first]


def test_to_json_is_json_safe(onnx_kit) -> None:
    ref = _only(onnx_kit.gather_model(_table(), chain=("Cast",), out_type=TensorProto.DOUBLE))
    obj = json.loads(json.dumps(ref.to_json()))
    assert obj == {"initializer": "W", "shape": [6, 3], "dtype": "float32", "graph": "", "source": "initializer",
                   "consumers": [{"node": "gather", "op_type": "Gather", "graph": "", "role": "gather",
                                  "input_index": 0, "via": ["Cast"]}],
                   "external": None, "quantization": None}
    assert json.loads(json.dumps(scan_model(onnx_kit.gather_model(_table())).to_json()))["not_tables"] == []


@pytest.mark.parametrize(("initializer", "expected"), [
    ("model_1/tok_emb_1/GatherV2/ReadVariableOp:0", "tok_emb"),
    ("StatefulPartitionedCall/model_1/tok_emb_1/GatherV2/ReadVariableOp:0", "tok_emb"),
    ("model_1/embedding_2_1/GatherV2/ReadVariableOp__12", "embedding_2"),
    ("functional_1/q_emb_1/GatherV2_1/ReadVariableOp:0", "q_emb"),
    ("sequential/embedding/embedding_lookup/39:0", "embedding"),
    ("emb.weight", "emb.weight"),
    ("onnx::MatMul_5", "onnx_MatMul_5"),
    ("..", "table"),
    ("../../etc/passwd", "passwd"),
    ("nul", "nul_"),
])
def test_default_table_name(initializer: str, expected: str) -> None:
    assert default_table_name(initializer, set()) == expected


def test_default_table_name_dedupes_case_insensitively() -> None:
    taken = {"tok_emb", "Tok_Emb_2"}
    assert default_table_name("m/tok_emb_1/GatherV2/ReadVariableOp:0", taken) == "tok_emb_3"
    assert taken == {"tok_emb", "Tok_Emb_2"}


# ------------------------------------------------------------------------------ real exporters


def _export_legacy(module, args: tuple, path: Path, **kwargs) -> onnx.ModelProto:
    import torch

    torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
    return onnx.load(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy exporter on purpose
def test_torch_embedding_legacy_export(tmp_path: Path, onnx_kit) -> None:
    torch = pytest.importorskip("torch")

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 5)

        def forward(self, ids):
            return self.emb(ids)

    module = Model().eval()
    ids = torch.tensor([[1, 7, 19], [0, 0, 3]])
    model = _export_legacy(module, (ids,), tmp_path / "emb.onnx", input_names=["ids"])
    ref = _only(model)
    assert (ref.initializer, ref.shape, ref.gathers[0].graph) == ("emb.weight", (20, 5), "")
    values = _values(model, ref)
    assert _same(values, module.emb.weight.detach().numpy())
    (out,) = onnx_kit.run_ort(model, {"ids": ids.numpy()})
    assert _same(out, np.take(values, ids.numpy(), axis=0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_embedding_bag_legacy_export_gathers_in_loop_body(tmp_path: Path, onnx_kit) -> None:
    torch = pytest.importorskip("torch")
    bag = torch.nn.EmbeddingBag(12, 4, mode="sum").eval()
    ids, offsets = torch.tensor([1, 2, 4, 5, 4, 11]), torch.tensor([0, 2, 5])
    model = _export_legacy(bag, (ids, offsets), tmp_path / "bag.onnx", input_names=["ids", "offsets"])
    ref = _only(model)
    assert ref.initializer == "weight" and ref.graph == ""
    assert len(ref.gathers) == 1 and ref.gathers[0].graph.endswith("/body")
    values = _values(model, ref)
    assert _same(values, bag.weight.detach().numpy())
    (out,) = onnx_kit.run_ort(model, {"ids": ids.numpy(), "offsets": offsets.numpy()})
    bags = np.split(np.take(values, ids.numpy(), axis=0), offsets.numpy()[1:])
    np.testing.assert_allclose(out, np.stack([b.sum(axis=0) for b in bags]), rtol=1e-6, atol=1e-6)  # sums


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torch_tied_dynamo_export(tmp_path: Path, onnx_kit) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.emb(ids), self.head(self.emb(ids))

    module = Tied().eval()
    ids = torch.tensor([[1, 2, 9]])
    path = tmp_path / "tied.onnx"
    torch.onnx.export(module, (ids,), str(path), dynamo=True, input_names=["ids"], verbose=False)
    model = onnx.load(path)
    ref = _only(model)  # the dynamo exporter names the shared weight after either module
    assert ref.initializer in ("emb.weight", "head.weight")
    values = _values(model, ref)
    assert _same(values, module.emb.weight.detach().numpy())
    emb_out, _ = onnx_kit.run_ort(model, {model.graph.input[0].name: ids.numpy()})
    assert _same(emb_out, np.take(values, ids.numpy(), axis=0))
