"""Serving shared models: checksums before sessions, one table buffer per process, one copy across processes."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bridge.serving
from bridge.errors import ChecksumError, StoreError, UnsafePathError
from bridge.external import point_initializer_at_file
from bridge.manifest import MANIFEST
from bridge.npyio import file_sha256
from bridge.serving import SharedSessions, check_shared_model, open_shared_session
from bridge.share import share

ROOT = Path(__file__).resolve().parents[2]
V, D = 64, 8


def _model(kit: Any, table: np.ndarray, reduce: str) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node(reduce, ["emb"], ["out"], axes=[1], keepdims=0)]
    return kit.model(nodes, [kit.ids(shape=("b", 5))], [kit.value("out", shape=["b", table.shape[1]])],
                     [kit.init("W", table)])


def _sources(tmp_path: Path, kit: Any, rows: int = V, dim: int = D) -> list[Path]:
    table = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    paths = []
    for reduce in ("ReduceMax", "ReduceMin"):
        path = tmp_path / "src" / f"{reduce.lower()}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(_model(kit, table, reduce), path)
        paths.append(path)
    return paths


@pytest.fixture
def shared(tmp_path: Path, onnx_kit: Any) -> tuple[Path, list[Path], list[str]]:
    sources = _sources(tmp_path, onnx_kit)
    result = share(sources, tmp_path / "shared")
    return tmp_path / "shared", sources, [m.file for m in result.models]


def _ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, V, size=(4, 5)).astype(np.int64)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    pairs = zip(a, b, strict=True)
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in pairs)


def _flip_table_byte(store: Path) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    entry = manifest["tables"][0]
    with open(store / entry["file"], "r+b") as fh:
        fh.seek(entry["data_offset"] + 5)
        byte = fh.read(1)
        fh.seek(entry["data_offset"] + 5)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_open_shared_session_matches_the_originals(shared: tuple[Path, list[Path], list[str]], onnx_kit: Any) -> None:
    store, sources, files = shared
    for src, name in zip(sources, files, strict=True):
        session = open_shared_session(store / name)
        assert _same(session.run(None, {"ids": _ids()}), onnx_kit.run_ort(src, {"ids": _ids()}))
    info = check_shared_model(store / files[0])
    assert info.initializers == {"W": "W"} and info.tables == ("W",) and not info.cut


def test_shared_sessions_give_one_buffer_to_every_session(shared: tuple[Path, list[Path], list[str]],
                                                         onnx_kit: Any) -> None:
    store, sources, files = shared
    sessions = SharedSessions(store)
    a, b = sessions.session(files[0]), sessions.session(store / files[1])
    assert sessions.session(files[0]) is a
    assert a._bridge_keepalive[1][0] is b._bridge_keepalive[1][0]  # one OrtValue for both sessions
    table_file = str((store / "tables" / "W.npy").resolve())
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(table_file)]
    assert len(maps) == 1, maps  # numpy's mapping only: onnxruntime did not map or copy the table again
    del sessions
    gc.collect()  # the sessions keep their OrtValues alive
    for session, src in zip((a, b), sources, strict=True):
        assert _same(session.run(None, {"ids": _ids()}), onnx_kit.run_ort(src, {"ids": _ids()}))


@pytest.mark.parametrize("in_process_sharing", [True, False])
def test_altered_table_fails_with_checksum_error(shared: tuple[Path, list[Path], list[str]],
                                                 in_process_sharing: bool) -> None:
    store, _, files = shared
    _flip_table_byte(store)
    with pytest.raises(ChecksumError, match="table 'W'"):
        open_shared_session(store / files[0])
    with pytest.raises(ChecksumError):
        SharedSessions(store, in_process_sharing=in_process_sharing).session(files[1])


def test_missing_store_pieces_fail_with_store_error(shared: tuple[Path, list[Path], list[str]], tmp_path: Path) -> None:
    store, _, files = shared
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(store / files[0], elsewhere / files[0])
    with pytest.raises(StoreError, match="not an embedding store"):
        open_shared_session(elsewhere / files[0])
    with pytest.raises(StoreError, match="not in store"):
        open_shared_session(elsewhere / files[0], store)
    (store / "tables" / "W.npy").unlink()
    for verify in (True, False):
        with pytest.raises(StoreError, match="missing"):
            open_shared_session(store / files[0], verify=verify)
    (store / MANIFEST).unlink()
    with pytest.raises(StoreError, match="manifest.json"):
        SharedSessions(store)


def test_tampered_or_foreign_models_are_refused(shared: tuple[Path, list[Path], list[str]], onnx_kit: Any) -> None:
    store, sources, files = shared
    shutil.copy(sources[0], store / "foreign.onnx")
    with pytest.raises(StoreError, match="not listed"):
        open_shared_session(store / "foreign.onnx")
    model = onnx.load(store / files[0], load_external_data=False)
    model.graph.node[1].op_type = "ReduceMin"
    onnx.save(model, store / files[0])
    with pytest.raises(ChecksumError, match="model"):
        open_shared_session(store / files[0])


def test_external_reference_must_match_the_manifest(shared: tuple[Path, list[Path], list[str]]) -> None:
    store, _, files = shared
    manifest = json.loads((store / MANIFEST).read_text())
    entry = manifest["tables"][0]
    cases = {
        "offset.onnx": ("tables/W.npy", entry["data_offset"] + 4 * D, entry["nbytes"] - 4 * D, (V - 1, D)),
        "unlisted.onnx": ("other.bin", 0, entry["nbytes"], (V, D)),
    }
    (store / "other.bin").write_bytes(b"\0" * entry["nbytes"])
    for name, (location, offset, length, shape) in cases.items():
        model = onnx.load(store / files[0], load_external_data=False)
        point_initializer_at_file(model, "W", location, offset, length, shape, np.float32)
        onnx.save(model, store / name)
        manifest["files"][name] = {"sha256": file_sha256(store / name), "bytes": (store / name).stat().st_size}
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="do not belong together"):
        open_shared_session(store / "offset.onnx")
    with pytest.raises(StoreError, match="neither a table nor a file"):
        open_shared_session(store / "unlisted.onnx")
    model = onnx.load(store / files[0], load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "../shared/tables/W.npy"
    onnx.save(model, store / "escape.onnx")
    manifest["files"]["escape.onnx"] = {"sha256": file_sha256(store / "escape.onnx"), "bytes": 1}
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError):
        open_shared_session(store / "escape.onnx")


def test_each_file_is_hashed_once_per_shared_sessions(shared: tuple[Path, list[Path], list[str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, files = shared
    hashed: list[str] = []
    real = bridge.serving.verify_sha256
    monkeypatch.setattr(bridge.serving, "verify_sha256", lambda p, *a: (hashed.append(Path(p).name), real(p, *a)))
    sessions = SharedSessions(store)
    for name in files:
        sessions.session(name)
    sessions.info(files[0])
    assert sorted(hashed) == sorted([*files, "W.npy"])


def test_cut_models_are_fed_by_the_bridge_and_checked_too(tmp_path: Path, onnx_kit: Any) -> None:
    sources = _sources(tmp_path, onnx_kit)
    result = share(sources, tmp_path / "cut", cut=True)
    files = [m.file for m in result.models]
    sessions = SharedSessions(tmp_path / "cut")
    ids = _ids()
    ids[0, 0] = -1
    outputs = sessions.run_cut(files, {"ids": ids})
    for src, name in zip(sources, files, strict=True):
        assert _same(outputs[name], onnx_kit.run_ort(src, {"ids": ids}))
        assert _same(sessions.cut_model(name).run(None, {"ids": ids}), onnx_kit.run_ort(src, {"ids": ids}))
    assert list(sessions._lookups) == [("W", "wrap")]
    assert check_shared_model(tmp_path / "cut" / files[0]).tables == ("W",)
    _flip_table_byte(tmp_path / "cut")
    with pytest.raises(ChecksumError, match="table 'W'"):
        SharedSessions(tmp_path / "cut").cut_model(files[0])
    (tmp_path / "cut" / "tables" / "W.npy").unlink()
    with pytest.raises(StoreError, match="missing"):
        SharedSessions(tmp_path / "cut").cut_model(files[0])


_SERVE = textwrap.dedent("""
    import sys
    import numpy as np
    from bridge.serving import SharedSessions
    store, rows, in_process = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "True"
    sessions = SharedSessions(store, in_process_sharing=in_process)
    for name in sys.argv[4:]:
        session = sessions.session(name)
        for start in range(0, rows - rows % 5, 5 * 512):
            ids = np.arange(start, min(start + 5 * 512, rows - rows % 5)).reshape(-1, 5)
            session.run(None, {"ids": ids})
    print("ready", flush=True)
    sys.stdin.readline()
""")


def _table_memory(pid: int, table_file: Path) -> tuple[int, int]:
    """(Rss, Pss) in bytes of the mappings of ``table_file`` in process ``pid``."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            inside = line.endswith(str(table_file))
        elif inside and head[0] in ("Rss:", "Pss:"):
            value = int(head[1]) * 1024
            rss, pss = (rss + value, pss) if head[0] == "Rss:" else (rss, pss + value)
    return rss, pss


@pytest.mark.parametrize("in_process_sharing", [True, False])
def test_processes_share_one_copy_of_the_table(tmp_path: Path, onnx_kit: Any, in_process_sharing: bool) -> None:
    rows, dim = 20_000, 256  # 20 MB
    sources = _sources(tmp_path, onnx_kit, rows=rows, dim=dim)
    result = share(sources, tmp_path / "shared")
    table_file = (tmp_path / "shared" / "tables" / "W.npy").resolve()
    nbytes = rows * dim * 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _SERVE, str(tmp_path / "shared"), str(rows), str(in_process_sharing),
            *[m.file for m in result.models]]
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        usage = [_table_memory(p.pid, table_file) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    assert all(rss >= 0.9 * nbytes for rss, _ in usage), usage  # every process touched the whole table
    assert sum(pss for _, pss in usage) <= 1.1 * nbytes, usage  # ... and they share one copy


def test_bfloat16_table_is_shared_in_process(tmp_path: Path, onnx_kit: Any) -> None:
    table = np.random.default_rng(2).standard_normal((V, D)).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node("Cast", ["emb"], ["out"], to=TensorProto.FLOAT)]
    model = onnx_kit.model(nodes, [onnx_kit.ids(shape=("b", 5))], [onnx_kit.value("out", shape=["b", 5, D])],
                           [onnx_kit.init("W", table)])
    src = tmp_path / "bf.onnx"
    onnx.save(model, src)
    for cut in (False, True):
        result = share([src], tmp_path / f"out{cut}", cut=cut)
        sessions = SharedSessions(tmp_path / f"out{cut}")
        name = result.models[0].file
        got = sessions.cut_model(name).run(None, {"ids": _ids()}) if cut else \
            sessions.session(name).run(None, {"ids": _ids()})
        assert _same(got, onnx_kit.run_ort(src, {"ids": _ids()}))


def test_share_modules_import_no_framework() -> None:
    code = ("import sys, bridge.share, bridge.serving, bridge.cut, bridge.external, bridge.cli.share_cmds; "
            "print([m for m in ('onnxruntime', 'torch', 'tensorflow') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("tampered", ["scale", "vocabulary"])
def test_lookup_checks_every_file_it_serves_from(tmp_path: Path, tampered: str) -> None:
    """A quantized table's scale and a table's vocabulary are checked like its data (they were not)."""
    from bridge import EmbeddingTable, Vocabulary, write_store
    from bridge.quantization import Quantization

    rng = np.random.default_rng(3)
    q = EmbeddingTable("Q", rng.integers(-128, 128, (6, 4)).astype(np.int8),
                       quantization=Quantization("row_div", (rng.random(6) + 0.5).astype(np.float32)))
    t = EmbeddingTable("T", rng.standard_normal((3, 4)).astype(np.float32), vocab=Vocabulary(["a", "b", "c"]))
    write_store(tmp_path / "s", [q, t])
    sessions = SharedSessions(tmp_path / "s", backend="numpy")
    path = tmp_path / "s" / ("tables/Q.scale.npy" if tampered == "scale" else "vocab/T.txt")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="scale of table 'Q'" if tampered == "scale" else "vocabulary 'T'"):
        sessions.lookup("Q" if tampered == "scale" else "T")


def test_shared_sessions_threads_are_checked(shared: tuple[Path, list[Path], list[str]]) -> None:
    from bridge.errors import InputError

    store, _, _ = shared
    with pytest.raises(InputError, match="threads must be an integer from 1 to 1024, got 0"):
        SharedSessions(store, threads=0)
