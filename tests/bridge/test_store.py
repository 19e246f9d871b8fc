"""The store: atomic writes, mmap reads, checksums, path safety, dtypes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bridge.npyio
from bridge import EmbeddingTable, SourceRef, Vocabulary, open_store, write_store
from bridge.errors import (
    ChecksumError,
    InputError,
    OutputExistsError,
    StoreError,
    TableNotFoundError,
    UnsafePathError,
)


def _tables() -> list[EmbeddingTable]:
    rng = np.random.default_rng(0)
    vocab = Vocabulary(["", "[UNK]", "the", "cat", "back\\slash", "new\nline"], oov_id=1,
                       reserved={"mask": 0, "oov": 1})
    return [
        EmbeddingTable("tok/emb", rng.standard_normal((6, 4)).astype(np.float32), vocab=vocab,
                       sources=(SourceRef("keras", "tok_emb", "tok_emb/embeddings"),), oov_id=1,
                       metadata={"mask_zero": True}),
        EmbeddingTable("pos", rng.standard_normal((5, 3)).astype(np.float16)),
        EmbeddingTable("bf", rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)),
    ]


def test_round_trip_is_exact_and_memory_mapped(tmp_path: Path) -> None:
    tables = _tables()
    write_store(tmp_path / "s", tables, provenance={"source": "unit"}, files={"model.onnx": b"abc"})
    store = open_store(tmp_path / "s")
    assert list(store) == ["tok/emb", "pos", "bf"]
    for t in tables:
        got = store[t.name]
        assert got.data.dtype == t.data.dtype
        assert got.data.tobytes() == t.data.tobytes()
        assert isinstance(got.data.base, np.memmap) or isinstance(got.data, np.memmap)
        assert not got.data.flags.writeable
    tok = store["tok/emb"]
    assert tok.vocab is not None and tok.vocab.tokens == tables[0].vocab.tokens  # type: ignore[union-attr]
    assert tok.vocab.oov_id == 1 and tok.vocab.reserved == {"mask": 0, "oov": 1}
    assert tok.sources == tables[0].sources and tok.metadata == {"mask_zero": True} and tok.oov_id == 1
    assert (tmp_path / "s" / "model.onnx").read_bytes() == b"abc"


def test_manifest_contract_and_alignment(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "embedding-bridge/1"
    for entry in manifest["tables"]:
        assert {"name", "file", "shape", "dtype", "sha256", "source", "data_offset"} <= set(entry)
        path = tmp_path / "s" / entry["file"]
        assert not Path(entry["file"]).is_absolute()
        assert entry["data_offset"] % 64 == 0
        assert entry["data_offset"] == bridge.npyio.npy_data_offset(path)
        raw = np.fromfile(path, dtype=entry["storage_dtype"], offset=entry["data_offset"])
        assert raw.size == np.prod(entry["shape"])
    bf = next(e for e in manifest["tables"] if e["name"] == "bf")
    assert bf["dtype"] == "bfloat16" and bf["storage_dtype"] == "uint16"
    assert np.load(tmp_path / "s" / bf["file"], allow_pickle=False).dtype == np.uint16


def test_flipped_byte_is_caught(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables())
    entry = json.loads((tmp_path / "s" / "manifest.json").read_text())["tables"][0]
    path = tmp_path / "s" / entry["file"]
    blob = bytearray(path.read_bytes())
    blob[entry["data_offset"] + 5] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="tok/emb"):
        open_store(tmp_path / "s")
    assert open_store(tmp_path / "s", verify=False)["tok/emb"].data.tobytes() != _tables()[0].data.tobytes()


def test_existing_output_refused_then_forced(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        write_store(out, _tables())
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    write_store(out, _tables(), force=True)
    assert not (out / "keep.txt").exists() and len(open_store(out)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bridge.npyio.write_npy
    calls = []

    def interrupted(fh, array, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"partial")
            raise KeyboardInterrupt
        return real(fh, array, **kw)

    monkeypatch.setattr("bridge.store.write_npy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", _tables())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_rewrite_keeps_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_store(tmp_path / "s", _tables()[:1])

    def boom(fh, array, **kw):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr("bridge.store.write_npy", boom)
    with pytest.raises(OSError, match="disk full"):
        write_store(tmp_path / "s", _tables(), force=True)
    assert list(open_store(tmp_path / "s")) == ["tok/emb"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_interrupt_while_the_old_store_is_removed_leaves_nothing_behind(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_store(tmp_path / "s", _tables()[:1])
    real, calls = shutil.rmtree, []

    def interrupted(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 1:  # Ctrl-C in the middle of removing the replaced store
            raise KeyboardInterrupt
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("bridge.atomic.shutil.rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", _tables(), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no hidden .s.old-* copy of the old store
    assert sorted(open_store(tmp_path / "s")) == sorted(t.name for t in _tables())


@pytest.mark.parametrize("failing", [1, 2], ids=["moving the old store aside", "putting the new one in place"])
def test_failed_replace_keeps_old_store_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          failing: int) -> None:
    write_store(tmp_path / "s", _tables()[:1])
    real, calls = os.rename, []

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(1)
        if len(calls) == failing:
            raise OSError(16, "Device or resource busy")
        real(src, dst)

    monkeypatch.setattr("bridge.atomic.os.rename", rename)
    with pytest.raises(InputError, match="cannot put the output in place at .*Device or resource busy"):
        write_store(tmp_path / "s", _tables(), force=True)
    assert list(open_store(tmp_path / "s")) == ["tok/emb"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


@pytest.mark.parametrize("bad", ["../outside.npy", "/etc/passwd", "tables/../../x.npy", "C:\\x.npy"])
def test_manifest_paths_cannot_escape(tmp_path: Path, bad: str) -> None:
    write_store(tmp_path / "s", _tables()[:1])
    mpath = tmp_path / "s" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["tables"][0]["file"] = bad
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError):
        open_store(tmp_path / "s")


def test_symlink_out_of_store_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables()[:1])
    entry = json.loads((tmp_path / "s" / "manifest.json").read_text())["tables"][0]
    target = tmp_path / "elsewhere.npy"
    os.replace(tmp_path / "s" / entry["file"], target)
    os.symlink(target, tmp_path / "s" / entry["file"])
    with pytest.raises(UnsafePathError, match="outside"):
        open_store(tmp_path / "s")


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; check the path"):  # a wrong path: bad input, exit 2
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "empty")
    write_store(tmp_path / "s", _tables())
    with pytest.raises(TableNotFoundError, match="tables: tok/emb, pos, bf"):
        open_store(tmp_path / "s")["nope"]
    with pytest.raises(StoreError, match="unique"):
        write_store(tmp_path / "t", [_tables()[1], _tables()[1]])


def test_shape_mismatch_detected(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables()[1:2])
    mpath = tmp_path / "s" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["tables"][0]["shape"] = [3, 5]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="inconsistent"):
        open_store(tmp_path / "s")["pos"]


def test_missing_table_file_is_a_store_error(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables()[:1])
    entry = json.loads((tmp_path / "s" / "manifest.json").read_text())["tables"][0]
    (tmp_path / "s" / entry["file"]).unlink()
    store = open_store(tmp_path / "s", verify=False)
    assert store.entry("tok/emb")["file"] == entry["file"]  # the manifest is readable without the file
    with pytest.raises(StoreError, match="file is missing"):
        store["tok/emb"]
    with pytest.raises(StoreError, match="file is missing"):
        open_store(tmp_path / "s")


def test_store_gets_ordinary_permissions(tmp_path: Path) -> None:
    """Staging uses mkdtemp (0700); the published store must be readable like any mkdir'd tree."""
    old = os.umask(0o022)
    try:
        write_store(tmp_path / "s", _tables())
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes["s"] == 0o755 and modes["s/tables"] == 0o755
    assert modes["s/manifest.json"] == 0o644 and modes["s/tables/pos.npy"] == 0o644


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">u8", "<f4"])
def test_big_endian_table_keeps_its_values(tmp_path: Path, dtype: str) -> None:
    """A byte-swapped array is stored as the same values in little-endian order, not reinterpreted."""
    values = np.arange(-6, 6).reshape(3, 4) * 3
    table = EmbeddingTable("t", values.astype(dtype)[:, ::-1])  # non-contiguous too
    write_store(tmp_path / "s", [table])
    got = open_store(tmp_path / "s")["t"].data
    assert got.dtype == np.dtype(dtype).newbyteorder("<")
    assert got.tobytes() == np.ascontiguousarray(values[:, ::-1], dtype=got.dtype).tobytes()


def test_tables_must_be_numeric_arrays() -> None:
    for data in (np.array([["a", "b"]]), np.zeros((2, 2), object), np.zeros((2, 2), [("x", "f4")]),
                 np.zeros((2, 2), "M8[s]")):
        with pytest.raises(InputError, match=f"has dtype {re.escape(str(data.dtype))}; a table holds numbers"):
            EmbeddingTable("t", data)
    with pytest.raises(InputError, match="data must be a numpy array, got list"):
        EmbeddingTable("t", [[1.0, 2.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize("tables", ["emb", np.ones((2, 2)), [np.ones((2, 2))]], ids=["str", "array", "list of arrays"])
def test_write_store_refuses_what_is_not_tables(tmp_path: Path, tables: object) -> None:
    with pytest.raises(InputError, match="tables must be a list of EmbeddingTable"):
        write_store(tmp_path / "s", tables)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["manifest.json", "./manifest.json", "tables/t.npy", "vocab\\t.txt"])
def test_extra_files_cannot_overwrite_the_store_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="would overwrite the store's own"):
        write_store(tmp_path / "s", _tables(), files={name: b"x"})
    assert not (tmp_path / "s").exists()
    write_store(tmp_path / "s", _tables(), files={"tables.txt": b"x", "model.onnx": b"y"})
    assert (open_store(tmp_path / "s").file_path("tables.txt")).read_bytes() == b"x"


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"])
def test_extension_dtypes_round_trip_bitwise(tmp_path: Path, name: str) -> None:
    """Every ml_dtypes type ONNX tables come in is stored as its bits and read back as itself."""
    data = np.arange(-8, 8, dtype=np.float32).reshape(4, 4).astype(getattr(ml_dtypes, name))
    write_store(tmp_path / "s", [EmbeddingTable("t", data)])
    got = open_store(tmp_path / "s")["t"].data
    assert got.dtype == data.dtype and got.tobytes() == data.tobytes()


def test_garbage_table_file_is_named_without_numpys_pickle_hint(tmp_path: Path) -> None:
    write_store(tmp_path / "s", _tables())
    (tmp_path / "s" / "tables" / "pos.npy").write_bytes(b"garbage" * 20)
    with pytest.raises(StoreError, match="pos.npy': it is not a .npy array file; re-create the store") as info:
        open_store(tmp_path / "s", verify=False)["pos"]
    assert "pickle" not in str(info.value)
