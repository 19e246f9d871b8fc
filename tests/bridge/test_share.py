"""``embridge share``: deduplicated tables, models rewritten to read the store, cut lookups, path safety."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.cli import share_cmds
from bridge.cut import CUT_KEY, CutModel, feed_cut_model
from bridge.errors import InputError, OutputExistsError, ParityError, UnsafePathError
from bridge.external import check_external_locations, external_tensors, point_initializer_at_file, save_model
from bridge.onnx_io import load_model
from bridge.share import share
from bridge.share_check import check_rewrite, model_inputs, ort_session
from bridge.store import open_store

ROOT = Path(__file__).resolve().parents[2]
V, D = 64, 8


def _table(seed: int = 0, rows: int = V, dim: int = D, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(dtype)


def _model(kit: Any, table: np.ndarray, reduce: str = "ReduceMax", name: str = "W") -> onnx.ModelProto:
    """``out = reduce(Gather(W, ids), axis=1)`` with ids ``[b, 5]``."""
    nodes = [helper.make_node("Gather", [name, "ids"], ["emb"], name="gather"),
             helper.make_node(reduce, ["emb"], ["out"], axes=[1], keepdims=0)]
    return kit.model(nodes, [kit.ids(shape=("b", 5))], [kit.value("out", shape=["b", D])], [kit.init(name, table)])


def _keras_like(kit: Any, table: np.ndarray) -> onnx.ModelProto:
    """tf2onnx's Keras Embedding: negative-id wrap (Less/Cast/Mul/Add) before Gather, plus a mask from the ids."""
    rows = table.shape[0]
    c = lambda name, v, dt: numpy_helper.from_array(np.array(v, dtype=dt), name)  # noqa: E731
    nodes = [
        helper.make_node("Add", ["ids", "V"], ["added"]),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("Less", ["idsf", "zf"], ["neg"]),
        helper.make_node("Cast", ["neg"], ["negi"], to=TensorProto.INT32),
        helper.make_node("Mul", ["negi", "added"], ["a"]),
        helper.make_node("Not", ["neg"], ["pos"]),
        helper.make_node("Cast", ["pos"], ["posi"], to=TensorProto.INT32),
        helper.make_node("Mul", ["ids", "posi"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["idx"]),
        helper.make_node("Gather", ["W", "idx"], ["emb"], name="model_1/tok_emb_1/GatherV2"),
        helper.make_node("Equal", ["ids", "zi"], ["pad"]),
        helper.make_node("Not", ["pad"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["keepf", "axis"], ["mask"]),
        helper.make_node("Mul", ["emb", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["out"], keepdims=0),
    ]
    inits = [kit.init("W", table), c("V", rows, np.int32), c("zf", 0.0, np.float32), c("zi", 0, np.int32),
             c("axis", [-1], np.int64), c("axis1", [1], np.int64)]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["b", 5])
    return kit.model(nodes, [ids], [kit.value("out", shape=["b", D])], inits)


def _save(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.stem}.data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _ids(shape: tuple[int, ...] = (4, 5), low: int = 0, dtype: Any = np.int64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, V, size=shape).astype(dtype)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b, strict=True))


@pytest.fixture
def three_models(tmp_path: Path, onnx_kit: Any) -> list[Path]:
    """a (inline) and b (external data) share one table; c has a different one."""
    shared = _table(0)
    return [
        _save(_model(onnx_kit, shared, "ReduceMax"), tmp_path / "src" / "a" / "model.onnx"),
        _save(_model(onnx_kit, shared, "ReduceMin", name="emb.weight"), tmp_path / "src" / "b" / "model.onnx",
              external=True),
        _save(_model(onnx_kit, _table(1), "ReduceMean"), tmp_path / "src" / "c.onnx"),
    ]


# ---------------------------------------------------------------------------------- sharing


def test_share_stores_identical_tables_once_and_models_read_the_store(tmp_path: Path, three_models: list[Path],
                                                                    onnx_kit: Any) -> None:
    result = share(three_models, tmp_path / "out")
    store = open_store(tmp_path / "out")  # verifies every sha256, models included
    assert len(store) == 2
    assert [m.file for m in result.models] == ["model.onnx", "model_2.onnx", "c.onnx"]
    assert all(m.check.verified for m in result.models)
    locations = []
    for src, m in zip(three_models, result.models, strict=True):
        rewritten = tmp_path / "out" / m.file
        ids = _ids()
        assert _same(onnx_kit.run_ort(rewritten, {"ids": ids}), onnx_kit.run_ort(src, {"ids": ids}))
        model = load_model(rewritten)
        (ext,) = [e for _, _, e in external_tensors(model)]
        entry = store.entry(m.tables[model.graph.initializer[0].name])
        assert (ext.location, ext.offset, ext.length) == (entry["file"], entry["data_offset"], entry["nbytes"])
        assert not model.graph.initializer[0].raw_data
        locations.append(ext.location)
        assert m.file in store.manifest["files"]
    assert locations[0] == locations[1] != locations[2]
    shared_by = store.entry(result.models[0].tables["W"])["metadata"]["shared_by"]
    assert [u["initializer"] for u in shared_by] == ["W", "emb.weight"]
    models = store.manifest["provenance"]["models"]
    assert models["model_2.onnx"]["tables"] == {"emb.weight": "W"} and models["c.onnx"]["verified"] is True
    table_files = list((tmp_path / "out" / "tables").iterdir())
    assert len(table_files) == 2


def test_dedupe_key_includes_shape_and_dtype(tmp_path: Path, onnx_kit: Any) -> None:
    base = _table(0, rows=8, dim=6)
    models = [
        _save(_model(onnx_kit, base), tmp_path / "a.onnx"),
        _save(_model(onnx_kit, base.reshape(6, 8)), tmp_path / "b.onnx"),
        _save(_model(onnx_kit, base.view(np.int32)), tmp_path / "c.onnx"),
        _save(_model(onnx_kit, base.copy()), tmp_path / "d.onnx"),
    ]
    result = share(models, tmp_path / "out", verify=False)
    assert len(result.store) == 3
    assert result.models[0].tables == result.models[3].tables


def test_share_refuses_bad_inputs(tmp_path: Path, three_models: list[Path], onnx_kit: Any) -> None:
    with pytest.raises(InputError, match="given twice"):
        share([three_models[0], three_models[0].parent / ".." / "a" / "model.onnx"], tmp_path / "o1")
    no_table = onnx_kit.model([helper.make_node("Identity", ["x"], ["y"])], [onnx_kit.value("x", shape=[2])],
                              [onnx_kit.value("y", shape=[2])])
    with pytest.raises(InputError, match="no embedding tables"):
        share([_save(no_table, tmp_path / "plain.onnx")], tmp_path / "o2")
    with pytest.raises(InputError, match="no models"):
        share([], tmp_path / "o3")
    share(three_models[:1], tmp_path / "o4")
    with pytest.raises(OutputExistsError):
        share(three_models[1:], tmp_path / "o4")
    share(three_models[1:], tmp_path / "o4", force=True)
    assert len(open_store(tmp_path / "o4")) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]  # no staging left behind


def test_other_external_data_moves_next_to_the_rewritten_model(tmp_path: Path, onnx_kit: Any) -> None:
    bias = np.arange(D, dtype=np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"]), helper.make_node("Add", ["emb", "bias"], ["out"])]
    model = onnx_kit.model(nodes, [onnx_kit.ids(shape=("b", 5))], [onnx_kit.value("out", shape=["b", D])],
                           [onnx_kit.init("W", _table()), onnx_kit.init("bias", bias)])
    src = _save(model, tmp_path / "src" / "m.onnx", external=True)
    result = share([src], tmp_path / "out")
    (m,) = result.models
    assert m.data_file == "m.onnx.data" and m.data_file in result.store.manifest["files"]
    rewritten = load_model(tmp_path / "out" / m.file)
    locations = {t.name: e.location for _, t, e in external_tensors(rewritten)}
    assert locations == {"W": "tables/W.npy", "bias": "m.onnx.data"}
    ids = _ids()
    assert _same(onnx_kit.run_ort(tmp_path / "out" / m.file, {"ids": ids}), onnx_kit.run_ort(src, {"ids": ids}))


def test_constant_node_and_subgraph_tables_are_shared(tmp_path: Path, onnx_kit: Any) -> None:
    table = _table(3)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(table, "value"))
    branch = lambda op: onnx_kit.graph(  # noqa: E731 - Gather inside an If branch reads the outer W
        [helper.make_node("Gather", ["W", "ids"], ["e"]), helper.make_node(op, ["e"], ["r"], axes=[1], keepdims=0)],
        [], [onnx_kit.value("r", shape=["b", D])], name=op)
    nodes = [const, helper.make_node("If", ["flag"], ["out"], then_branch=branch("ReduceMax"),
                                     else_branch=branch("ReduceMin"))]
    model = onnx_kit.model(nodes, [onnx_kit.ids(shape=("b", 5)), onnx_kit.value("flag", TensorProto.BOOL, [])],
                           [onnx_kit.value("out", shape=["b", D])])
    src = _save(model, tmp_path / "m.onnx")
    for cut in (False, True):
        result = share([src], tmp_path / f"out{cut}", cut=cut)
        (m,) = result.models
        assert m.check.verified and not m.cut
        assert len(m.kept) == (2 if cut else 0)
        rewritten = tmp_path / f"out{cut}" / m.file
        assert [e.location for _, _, e in external_tensors(load_model(rewritten))] == ["tables/W.npy"]
        for flag in (True, False):
            feeds = {"ids": _ids(), "flag": np.array(flag)}
            assert _same(onnx_kit.run_ort(rewritten, feeds), onnx_kit.run_ort(src, feeds))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_tables(tmp_path: Path, onnx_kit: Any, dtype: Any) -> None:
    table = _table(4, dtype=dtype)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node("Cast", ["emb"], ["out"], to=TensorProto.FLOAT)]
    model = onnx_kit.model(nodes, [onnx_kit.ids(shape=("b", 5))], [onnx_kit.value("out", shape=["b", 5, D])],
                           [onnx_kit.init("W", table)])
    src = _save(model, tmp_path / "h.onnx")
    for cut in (False, True):
        result = share([src], tmp_path / f"out{cut}", cut=cut)
        assert result.models[0].check.verified and len(result.models[0].cut) == int(cut)
        assert result.store["W"].data.dtype == np.dtype(dtype)
        assert result.store["W"].data.tobytes() == table.tobytes()


# ---------------------------------------------------------------------------------- cut


def test_cut_keras_wrap_gives_bitwise_equal_outputs_with_negative_ids(tmp_path: Path, onnx_kit: Any) -> None:
    src = _save(_keras_like(onnx_kit, _table()), tmp_path / "k.onnx")
    result = share([src], tmp_path / "out", cut=True)
    (m,) = result.models
    assert m.check.verified and not m.kept
    (spec,) = m.cut
    assert (spec.input, spec.table, spec.ids_input, spec.policy) == ("W__vectors", "W", "ids", "wrap")
    rewritten = tmp_path / "out" / m.file
    model = load_model(rewritten)
    assert not any(n.op_type == "Gather" for n in model.graph.node)
    assert not model.graph.initializer or "W" not in {t.name for t in model.graph.initializer}
    assert not external_tensors(model)
    inputs = {v.name: v for v in model.graph.input}
    assert set(inputs) == {"ids", "W__vectors"}  # ids still feeds the mask
    dims = [d.dim_param or d.dim_value for d in inputs["W__vectors"].type.tensor_type.shape.dim]
    assert dims == ["b", 5, D]
    assert json.loads(next(p.value for p in model.metadata_props if p.key == CUT_KEY))[0]["table"] == "W"
    store = open_store(tmp_path / "out")
    session = ort_session(rewritten)
    for low in (0, -V):
        ids = _ids((6, 5), low=low, dtype=np.int32)
        ids[0, :2] = [-V, V - 1]
        assert _same(feed_cut_model(session, store, {"ids": ids}), onnx_kit.run_ort(src, {"ids": ids}))


def test_cut_plain_gather_removes_the_ids_input_and_the_table(tmp_path: Path, onnx_kit: Any) -> None:
    src = _save(_model(onnx_kit, _table()), tmp_path / "p.onnx")
    result = share([src], tmp_path / "out", cut=True)
    model = load_model(tmp_path / "out" / result.models[0].file)
    assert [v.name for v in model.graph.input] == ["W__vectors"]
    assert not model.graph.initializer
    store = open_store(tmp_path / "out")
    ids = _ids()
    ids[0, 0] = -1
    cut = CutModel(ort_session(tmp_path / "out" / result.models[0].file), store, backend="numpy")
    assert _same(cut.run(None, {"ids": ids}), onnx_kit.run_ort(src, {"ids": ids}))
    assert cut.feeds({"ids": ids})["W__vectors"].tobytes() == store["W"].data[np.where(ids < 0, ids + V, ids)].tobytes()


@pytest.mark.parametrize("kind", ["shifted", "reshaped", "tensor_const", "two_inputs"])
def test_cut_keeps_lookups_it_cannot_reproduce_exactly(tmp_path: Path, onnx_kit: Any, kind: str) -> None:
    extra: list[Any] = []
    inputs = [onnx_kit.ids(shape=("b", 5))]
    if kind == "shifted":  # ids + 1: elementwise, but not the wrap policy's rows
        nodes = [helper.make_node("Add", ["ids", "one"], ["idx"])]
        extra = [onnx_kit.init("one", np.array(1, dtype=np.int64))]
    elif kind == "reshaped":
        nodes = [helper.make_node("Reshape", ["ids", "shape"], ["idx"])]
        extra = [onnx_kit.init("shape", np.array([-1, 5], dtype=np.int64))]
    elif kind == "tensor_const":
        nodes = [helper.make_node("Mul", ["ids", "ones"], ["idx"])]
        extra = [onnx_kit.init("ones", np.ones(5, dtype=np.int64))]
    else:
        nodes = [helper.make_node("Max", ["ids", "ids2"], ["idx"])]
        inputs.append(onnx_kit.ids("ids2", shape=("b", 5)))
    nodes += [helper.make_node("Gather", ["W", "idx"], ["emb"], name="gather"),
              helper.make_node("ReduceMax", ["emb"], ["out"], axes=[1], keepdims=0)]
    inits = [onnx_kit.init("W", _table()), *extra]
    model = onnx_kit.model(nodes, inputs, [onnx_kit.value("out", shape=["b", D])], inits)
    src = _save(model, tmp_path / "m.onnx")
    result = share([src], tmp_path / "out", cut=True)
    (m,) = result.models
    assert not m.cut and len(m.kept) == 1 and "gather" in m.kept[0]
    assert m.check.verified  # the table stays in the model, read from the store
    assert [e.location for _, _, e in external_tensors(load_model(tmp_path / "out" / m.file))] == ["tables/W.npy"]


def test_cut_with_a_tied_projection_keeps_the_table_for_the_matmul(tmp_path: Path, onnx_kit: Any) -> None:
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
             helper.make_node("MatMul", ["emb", "WT"], ["logits"])]
    model = onnx_kit.model(nodes, [onnx_kit.ids(shape=("b", 5))], [onnx_kit.value("logits", shape=["b", 5, V])],
                           [onnx_kit.init("W", _table())])
    src = _save(model, tmp_path / "tied.onnx")
    result = share([src], tmp_path / "out", cut=True)
    (m,) = result.models
    assert len(m.cut) == 1 and m.check.verified
    rewritten = tmp_path / "out" / m.file
    assert [e.location for _, _, e in external_tensors(load_model(rewritten))] == ["tables/W.npy"]
    ids = _ids()
    assert _same(feed_cut_model(ort_session(rewritten), open_store(tmp_path / "out"), {"ids": ids}),
                 onnx_kit.run_ort(src, {"ids": ids}))


def test_cut_two_models_one_table(tmp_path: Path, three_models: list[Path], onnx_kit: Any) -> None:
    result = share(three_models[:2], tmp_path / "out", cut=True)
    assert len(result.store) == 1 and all(m.check.verified and m.cut for m in result.models)
    store = open_store(tmp_path / "out")
    ids = _ids()
    lookups: dict[Any, Any] = {}
    models = [CutModel(ort_session(tmp_path / "out" / m.file), store, lookups=lookups) for m in result.models]
    assert len(lookups) == 1
    vectors: dict[Any, Any] = {}
    for model, src in zip(models, three_models[:2], strict=True):
        assert _same(model.session.run(None, model.feeds({"ids": ids}, vectors)), onnx_kit.run_ort(src, {"ids": ids}))
    assert len(vectors) == 1


# ---------------------------------------------------------------------------------- checks


def test_check_rewrite_reports_difference_and_unrunnable_original(tmp_path: Path, onnx_kit: Any) -> None:
    model = _model(onnx_kit, _table())
    src = _save(model, tmp_path / "m.onnx")
    good = check_rewrite(src, model_inputs(model), lambda f: ort_session(src).run(None, f), V)
    assert good.verified is True
    with pytest.raises(ParityError, match="differs"):
        check_rewrite(src, model_inputs(model), lambda f: [x + 1 for x in ort_session(src).run(None, f)], V)
    with pytest.raises(ParityError, match="fails"):
        check_rewrite(src, model_inputs(model), lambda f: 1 / 0, V)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].op_type = "NoSuchOp"
    bad = _save(broken, tmp_path / "bad.onnx")
    result = check_rewrite(bad, model_inputs(broken), lambda f: [], V)
    assert result.verified is None and "does not run" in (result.note or "")


# ---------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin", "link/t.bin"])
def test_share_refuses_external_data_outside_the_model_directory(tmp_path: Path, onnx_kit: Any, location: str) -> None:
    table = _table()
    outside = tmp_path / "outside"
    outside.mkdir()
    table.tofile(outside / "t.bin")
    (tmp_path / "outside.bin").write_bytes(table.tobytes())
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "link").symlink_to(outside, target_is_directory=True)
    model = _model(onnx_kit, table)
    point_initializer_at_file(model, "W", "placeholder.bin", 0, table.nbytes, table.shape, table.dtype)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    (model_dir / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(UnsafePathError):
        share([model_dir / "m.onnx"], tmp_path / "out")
    with pytest.raises(UnsafePathError):
        check_external_locations(model, model_dir)
    assert not (tmp_path / "out").exists()


def test_point_initializer_at_file_replaces_a_placeholder(tmp_path: Path, onnx_kit: Any) -> None:
    table = _table(5)
    np.save(tmp_path / "t.npy", table)
    from bridge.npyio import npy_data_offset

    model = _model(onnx_kit, np.zeros((1, D), np.float32))  # skeleton with a one-row table
    point_initializer_at_file(model, "W", "t.npy", npy_data_offset(tmp_path / "t.npy"), table.nbytes,
                              table.shape, table.dtype)
    save_model(model, tmp_path / "m.onnx")
    ids = _ids()
    (out,) = onnx_kit.run_ort(tmp_path / "m.onnx", {"ids": ids})
    assert out.tobytes() == table[ids].max(axis=1).tobytes()
    with pytest.raises(UnsafePathError):
        point_initializer_at_file(model, "W", "../t.npy", 128, table.nbytes, table.shape, table.dtype)
    with pytest.raises(InputError, match="does not fit"):
        point_initializer_at_file(model, "W", "t.npy", 128, table.nbytes - 4, table.shape, table.dtype)
    model.graph.initializer[0].external_data[0].value = "/abs/t.npy"
    with pytest.raises(UnsafePathError):
        save_model(model, tmp_path / "m2.onnx")


def test_rewritten_models_only_point_inside_their_directory(tmp_path: Path, three_models: list[Path]) -> None:
    result = share(three_models, tmp_path / "out", cut=True)
    for m in result.models:
        model = load_model(tmp_path / "out" / m.file)
        for path in check_external_locations(model, tmp_path / "out"):
            assert path.resolve().is_relative_to((tmp_path / "out").resolve())


# ---------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="embridge")
    share_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_cli_share_json_and_text(tmp_path: Path, three_models: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["share", *map(str, three_models), "-o", str(tmp_path / "out"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tables"]) == 2 and [m["verified"] for m in out["models"]] == [True, True, True]
    assert _cli(["share", *map(str, three_models[:2]), "-o", str(tmp_path / "out"), "--force", "--cut"]) == 0
    text = capsys.readouterr().out
    assert "bitwise equal" in text and "model_2.onnx" in text and "shared" in text


# ---------------------------------------------------------------------------------- memory

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    mode, model, out = sys.argv[1:4]
    if mode == "extract":
        from bridge.extract import extract
        extract(model, out)
    else:
        from bridge.cli.model_cmds import inspect_rows
        assert inspect_rows(Path(model))
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(json.dumps({"hwm": int(status["VmHWM"].split()[0]) * 1024}))
""")


def _peak(mode: str, model: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(model), str(out)], capture_output=True, text=True,
                          env=env, check=True, timeout=300)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["hwm"])


def test_inspect_and_extract_of_external_data_stay_within_memory_budget(tmp_path: Path, onnx_kit: Any) -> None:
    rows, dim = 200_000, 256  # 200 MB float32
    data = tmp_path / "m" / "table.bin"
    data.parent.mkdir()
    with open(data, "wb") as fh:
        for start in range(0, rows, 20_000):
            np.full((20_000, dim), start, dtype=np.float32).tofile(fh)
    nbytes = rows * dim * 4
    model = _model(onnx_kit, np.zeros((1, dim), np.float32))
    point_initializer_at_file(model, "W", "table.bin", 0, nbytes, (rows, dim), np.float32)
    save_model(model, tmp_path / "m" / "model.onnx")
    baseline = _peak("inspect", tmp_path / "m" / "model.onnx", tmp_path / "unused")
    assert baseline < nbytes / 2, "inspect must not read the table"
    peak = _peak("extract", tmp_path / "m" / "model.onnx", tmp_path / "store")
    assert peak <= 1.1 * nbytes + 200 * 2**20, f"extract peaked at {peak} bytes for a {nbytes}-byte table"
    # measured: ~46 MiB for inspect, ~242 MiB for extract; reading the model whole would cost >= 2x the table
    assert peak - baseline <= 1.1 * nbytes + 64 * 2**20
    assert open_store(tmp_path / "store")["W"].data[-1, 0] == rows - 20_000


def test_a_model_cut_by_an_earlier_share_is_refused(tmp_path: Path) -> None:
    """Its cut metadata names tables of the first store: shared again it ran against another table silently."""
    from onnx import TensorProto, helper, numpy_helper

    from bridge.errors import InputError
    from bridge.share import share

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["g1"], name="g1"),
             helper.make_node("Squeeze", ["ids2", "ax"], ["sq"], name="sq"),
             helper.make_node("Gather", ["W3", "sq"], ["g2"], name="g2"),
             helper.make_node("Add", ["g1", "g2"], ["out"], name="add")]
    inits = [numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "W3"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]),
                                           helper.make_tensor_value_info("ids2", TensorProto.INT64, ["b", 1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "c.onnx")
    first = share([tmp_path / "c.onnx"], tmp_path / "first", cut=True)
    assert first.models[0].cut  # W was cut, W3 was not
    with pytest.raises(InputError, match="was cut by an earlier `embridge share --cut`"):
        share([tmp_path / "first" / "c.onnx"], tmp_path / "second")
    assert not (tmp_path / "second").exists()
