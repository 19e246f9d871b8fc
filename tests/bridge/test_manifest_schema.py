"""manifest.json is checked against its whole schema: a malformed field is a one-line StoreError, not a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge import EmbeddingTable, SourceRef, Vocabulary, open_store, write_store
from bridge.cli import main
from bridge.errors import StoreError
from bridge.quantization import Quantization, dense

V, D, GROUP = 5, 6, 4
Manifest = dict[str, Any]


def _tables() -> list[EmbeddingTable]:
    """A plain table, a vocabulary-bearing one and two quantized ones (with and without a zero point); the same
    arrays on every call."""
    rng = np.random.default_rng(3)
    vocab = Vocabulary(["", "[UNK]", "the", "cat"], oov_id=1, reserved={"mask": 0, "oov": 1}, source="string_lookup")
    scale = (rng.random((V, 2)) * 0.1 + 1e-3).astype(np.float32)
    return [
        EmbeddingTable("emb", rng.standard_normal((V, D)).astype(np.float32),
                       sources=(SourceRef("keras", "emb", "emb/embeddings"),), metadata={"mask_zero": True}),
        EmbeddingTable("tok", rng.standard_normal((4, 3)).astype(np.float16), vocab=vocab, oov_id=1, padding_id=0),
        EmbeddingTable("q", rng.integers(-8, 8, (V, D)).astype(np.int8),
                       quantization=Quantization("group_affine", scale, rng.integers(-2, 2, (V, 2)).astype(np.int8),
                                                 group_size=GROUP)),
        EmbeddingTable("m", rng.integers(-128, 128, (V, D)).astype(np.int8),
                       quantization=Quantization("mul", (rng.random(D) + 0.5).astype(np.float32), axis=1)),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A valid store written by :func:`bridge.write_store` (with an extra file)."""
    write_store(tmp_path / "s", _tables(), provenance={"source": "unit"}, files={"model.onnx": b"abc"})
    return tmp_path / "s"


def _edit(store: Path, mutate: Callable[[Manifest], Any]) -> None:
    """Load manifest.json, apply ``mutate`` to it, write it back."""
    path = store / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    mutate(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def _table(name: str) -> Callable[[Manifest], dict[str, Any]]:
    return lambda m: next(t for t in m["tables"] if t["name"] == name)


_EMB, _TOK, _Q, _M = _table("emb"), _table("tok"), _table("q"), _table("m")


def _set(get: Callable[[Manifest], dict[str, Any]], key: str, value: Any) -> Callable[[Manifest], None]:
    """A mutation setting ``get(manifest)[key] = value``."""
    return lambda m: get(m).__setitem__(key, value)


def _drop(get: Callable[[Manifest], dict[str, Any]], key: str) -> Callable[[Manifest], None]:
    return lambda m: get(m).pop(key)


def _vocab(m: Manifest) -> dict[str, Any]:
    return m["vocabularies"][0]


def _files(m: Manifest) -> dict[str, Any]:
    return m["files"]


def _scale(m: Manifest) -> dict[str, Any]:
    return _Q(m)["quantization"]["scale"]


def _quant(m: Manifest) -> dict[str, Any]:
    return _Q(m)["quantization"]


T0, T1, T2, T3 = "table #0 ('emb'): ", "table #1 ('tok'): ", "table #2 ('q'): ", "table #3 ('m'): "
VOC = "vocabulary #0 ('tok'): "
SHAPE2 = "must be a list of two non-negative integers, got "
SHA = "must be 64 lowercase hexadecimal digits, got "

CASES: list[tuple[str, Callable[[Manifest], Any], str]] = [
    # top level
    ("no-tables", lambda m: m.pop("tables"), "lacks 'tables'"),
    ("tables-object", lambda m: m.__setitem__("tables", {}), "'tables' must be a list, got {} (dict)"),
    ("vocabularies-null", lambda m: m.__setitem__("vocabularies", None), "'vocabularies' must be a list, got None"),
    ("files-list", lambda m: m.__setitem__("files", ["model.onnx"]), "'files' must be an object, got ['model.onnx']"),
    ("generator-list", lambda m: m.__setitem__("generator", []), "'generator' must be an object"),
    ("provenance-str", lambda m: m.__setitem__("provenance", "x"), "'provenance' must be an object"),
    # files
    ("file-entry-str", _set(_files, "model.onnx", "abc"), "file 'model.onnx': must be an object, got 'abc' (str)"),
    ("file-no-bytes", _drop(lambda m: m["files"]["model.onnx"], "bytes"), "file 'model.onnx': lacks 'bytes'"),
    ("file-bytes-str", _set(lambda m: m["files"]["model.onnx"], "bytes", "3"), "file 'model.onnx': 'bytes' must be"),
    ("file-sha-null", _set(lambda m: m["files"]["model.onnx"], "sha256", None),
     "file 'model.onnx': 'sha256' " + SHA + "None"),
    # tables: the entry itself and its required fields
    ("table-str", lambda m: m["tables"].__setitem__(1, "tok"), "table #1: must be an object, got 'tok' (str)"),
    ("table-null", lambda m: m["tables"].__setitem__(0, None), "table #0: must be an object, got None"),
    ("no-name", _drop(_EMB, "name"), "table #0: lacks 'name'"),
    ("name-empty", _set(_EMB, "name", ""), "table #0 (''): 'name' must be a non-empty string, got ''"),
    ("name-int", _set(_EMB, "name", 3), "table #0: 'name' must be a non-empty string, got 3 (int)"),
    ("no-shape-no-dtype", lambda m: [_EMB(m).pop(k) for k in ("shape", "dtype")], T0 + "lacks 'shape', 'dtype'"),
    ("file-null", _set(_EMB, "file", None), T0 + "'file' must be a non-empty string, got None"),
    ("shape-null", _set(_EMB, "shape", None), T0 + "'shape' " + SHAPE2 + "None"),
    ("shape-1d", _set(_EMB, "shape", [V]), T0 + "'shape' " + SHAPE2 + "[5] (list)"),
    ("shape-3d", _set(_EMB, "shape", [V, D, 1]), T0 + "'shape' " + SHAPE2),
    ("shape-negative", _set(_EMB, "shape", [V, -1]), T0 + "'shape' " + SHAPE2),
    ("shape-bool", _set(_EMB, "shape", [True, D]), T0 + "'shape' " + SHAPE2),
    ("shape-float", _set(_EMB, "shape", [5.0, D]), T0 + "'shape' " + SHAPE2),
    ("shape-str", _set(_EMB, "shape", "5x6"), T0 + "'shape' " + SHAPE2 + "'5x6' (str)"),
    ("dtype-null", _set(_EMB, "dtype", None), T0 + "'dtype' must be a dtype name such as 'float32', got None"),
    ("dtype-unknown", _set(_EMB, "dtype", "float33"), T0 + "'dtype' must be a dtype name"),
    ("dtype-list", _set(_EMB, "dtype", ["float32"]), T0 + "'dtype' must be a dtype name"),
    ("sha-null", _set(_EMB, "sha256", None), T0 + "'sha256' " + SHA + "None"),
    ("sha-short", _set(_EMB, "sha256", "abc123"), T0 + "'sha256' " + SHA + "'abc123'"),
    ("sha-not-hex", _set(_EMB, "sha256", "z" * 64), T0 + "'sha256' " + SHA),
    # tables: optional fields
    ("storage-dtype-int", _set(_EMB, "storage_dtype", 4), T0 + "'storage_dtype' must be a string, got 4"),
    ("data-offset-negative", _set(_EMB, "data_offset", -64), T0 + "'data_offset' must be a non-negative integer"),
    ("nbytes-str", _set(_EMB, "nbytes", "120"), T0 + "'nbytes' must be a non-negative integer, got '120'"),
    ("no-nbytes", _drop(_EMB, "nbytes"), T0 + "lacks 'nbytes'"),
    ("source-object", _set(_EMB, "source", {"framework": "keras"}), T0 + "'source' must be a list"),
    ("source-item-str", _set(_EMB, "source", ["emb"]), T0 + "'source[0]' must be an object, got 'emb'"),
    ("source-no-framework", lambda m: _EMB(m)["source"][0].pop("framework"), T0 + "lacks 'source[0].framework'"),
    ("source-no-layer", lambda m: _EMB(m)["source"][0].pop("layer"), T0 + "lacks 'source[0].layer'"),
    ("source-weight-int", lambda m: _EMB(m)["source"][0].__setitem__("weight", 1), T0 + "'source[0].weight' must be"),
    ("initializer-int", _set(_EMB, "initializer", 7), T0 + "'initializer' must be a string or null, got 7"),
    ("vocab-int", _set(_TOK, "vocab", 1), T1 + "'vocab' must be a string or null, got 1"),
    ("vocab-unknown", _set(_EMB, "vocab", "nope"), T0 + "'vocab' names vocabulary 'nope', which the manifest"),
    ("vocab-dangling", lambda m: m.__setitem__("vocabularies", []), T1 + "'vocab' names vocabulary 'tok'"),
    ("oov-str", _set(_TOK, "oov_id", "1"), T1 + "'oov_id' must be an integer or null, got '1' (str)"),
    ("oov-float", _set(_TOK, "oov_id", 1.0), T1 + "'oov_id' must be an integer or null, got 1.0"),
    ("oov-out-of-range", _set(_TOK, "oov_id", 4), T1 + "'oov_id' must be null or an id in [0, 4), got 4"),
    ("padding-bool", _set(_TOK, "padding_id", True), T1 + "'padding_id' must be an integer or null, got True"),
    ("padding-negative", _set(_TOK, "padding_id", -1), T1 + "'padding_id' must be null or an id in [0, 4)"),
    ("metadata-list", _set(_EMB, "metadata", ["mask_zero"]), T0 + "'metadata' must be an object or null"),
    ("metadata-str", _set(_EMB, "metadata", "{}"), T0 + "'metadata' must be an object or null, got '{}'"),
    # quantization
    ("quant-str", _set(_Q, "quantization", "row_div"), T2 + "'quantization' must be an object or null, got 'row_div'"),
    ("quant-list", _set(_Q, "quantization", []), T2 + "'quantization' must be an object or null, got []"),
    ("quant-no-scheme", _drop(_quant, "scheme"), T2 + "lacks 'quantization.scheme'"),
    ("quant-bad-scheme", _set(_quant, "scheme", "int4"), T2 + "'quantization.scheme' must be one of 'row_div'"),
    ("quant-scheme-list", _set(_quant, "scheme", ["mul"]), T2 + "'quantization.scheme' must be one of"),
    ("quant-no-scale", _drop(_quant, "scale"), T2 + "lacks 'quantization.scale'"),
    ("quant-scale-null", _set(_quant, "scale", None), T2 + "'quantization.scale' must be an object, got None"),
    ("quant-scale-no-file", _drop(_scale, "file"), T2 + "lacks 'quantization.scale.file'"),
    ("quant-scale-sha-null", _set(_scale, "sha256", None), T2 + "'quantization.scale.sha256' " + SHA + "None"),
    ("quant-scale-shape-str", _set(_scale, "shape", "5"), T2 + "'quantization.scale.shape' must be a list of non"),
    ("quant-scale-shape-float", _set(_scale, "shape", [5, 2.5]), T2 + "'quantization.scale.shape' must be a list"),
    ("quant-scale-dtype-null", _set(_scale, "dtype", None), T2 + "'quantization.scale.dtype' must be a dtype name"),
    ("quant-scale-offset-str", _set(_scale, "data_offset", "128"), T2 + "'quantization.scale.data_offset' must be"),
    ("quant-zero-str", _set(_quant, "zero_point", "z"), T2 + "'quantization.zero_point' must be an object or null"),
    ("quant-zero-no-dtype", _drop(lambda m: _quant(m)["zero_point"], "dtype"),
     T2 + "lacks 'quantization.zero_point.dtype'"),
    ("quant-group-str", _set(_quant, "group_size", "4"), T2 + "'quantization.group_size' must be a positive integer"),
    ("quant-group-zero", _set(_quant, "group_size", 0), T2 + "'quantization.group_size' must be a positive integer"),
    ("quant-axis-2", _set(lambda m: _M(m)["quantization"], "axis", 2), T3 + "'quantization.axis' must be null, 0 or 1"),
    ("quant-axis-bool", _set(lambda m: _M(m)["quantization"], "axis", True), T3 + "'quantization.axis' must be null"),
    ("quant-out-int8", _set(_quant, "out_dtype", "int8"), T2 + "'quantization.out_dtype' must be one of 'float16'"),
    ("quant-out-null", _set(_quant, "out_dtype", None), T2 + "'quantization.out_dtype' must be one of"),
    ("quant-out-junk", _set(_quant, "out_dtype", "float33"), T2 + "'quantization.out_dtype' must be one of"),
    # vocabularies
    ("vocab-entry-str", lambda m: m["vocabularies"].__setitem__(0, "tok"),
     "vocabulary #0: must be an object, got 'tok'"),
    ("vocab-no-name", _drop(_vocab, "name"), "vocabulary #0: lacks 'name'"),
    ("vocab-no-file", _drop(_vocab, "file"), VOC + "lacks 'file'"),
    ("vocab-no-sha", _drop(_vocab, "sha256"), VOC + "lacks 'sha256'"),
    ("vocab-file-int", _set(_vocab, "file", 1), VOC + "'file' must be a non-empty string, got 1"),
    ("vocab-sha-null", _set(_vocab, "sha256", None), VOC + "'sha256' " + SHA + "None"),
    ("vocab-size-null", _set(_vocab, "size", None), VOC + "'size' must be a non-negative integer, got None"),
    ("vocab-size-negative", _set(_vocab, "size", -1), VOC + "'size' must be a non-negative integer, got -1"),
    ("vocab-oov-str", _set(_vocab, "oov_id", "1"), VOC + "'oov_id' must be an integer or null, got '1'"),
    ("vocab-oov-range", _set(_vocab, "oov_id", 9), VOC + "'oov_id' must be null or an id in [0, 4), got 9"),
    ("vocab-reserved-list", _set(_vocab, "reserved", ["mask"]), VOC + "'reserved' must be an object mapping names"),
    ("vocab-reserved-str-id", _set(_vocab, "reserved", {"mask": "0"}), VOC + "'reserved' must be an object mapping"),
    ("vocab-reserved-range", _set(_vocab, "reserved", {"mask": 4}), VOC + "'reserved.mask' must be null or an id"),
    ("vocab-source-int", _set(_vocab, "source", 2), VOC + "'source' must be a string or null, got 2"),
    # duplicates
    ("duplicate-tables", _set(_M, "name", "q"), "duplicate table names ['q']"),
    ("duplicate-vocabularies", lambda m: m["vocabularies"].append(dict(m["vocabularies"][0])),
     "duplicate vocabulary names ['tok']"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_manifest_is_a_store_error(store: Path, mutate: Callable[[Manifest], Any], expected: str) -> None:
    _edit(store, mutate)
    with pytest.raises(StoreError) as info:
        open_store(store, verify=False)
    message = str(info.value)
    assert expected in message
    assert message.startswith(repr(str(store / "manifest.json")) + ": ")
    assert message.endswith("; re-create the store") and "\n" not in message


@pytest.mark.parametrize("mutate", [
    lambda m: m.__setitem__("format", "embedding-bridge/2"),
    lambda m: m.pop("format"),
    lambda m: m.clear(),
], ids=["newer", "missing", "empty"])
def test_wrong_format_is_a_store_error(store: Path, mutate: Callable[[Manifest], Any]) -> None:
    _edit(store, mutate)
    with pytest.raises(StoreError, match="this version reads 'embedding-bridge/1'"):
        open_store(store, verify=False)


def test_manifest_that_is_not_an_object(store: Path) -> None:
    (store / "manifest.json").write_text("[]", encoding="utf-8")
    with pytest.raises(StoreError, match="has format 'list'"):
        open_store(store, verify=False)


def test_valid_store_opens_and_verifies(store: Path) -> None:
    tables = {t.name: t for t in _tables()}
    opened = open_store(store)
    opened.verify()
    assert list(opened) == ["emb", "tok", "q", "m"]
    for name, table in tables.items():
        got = opened[name]
        assert got.data.tobytes() == table.data.tobytes() and got.dtype == table.dtype
    tok = opened["tok"]
    assert tok.vocab is not None and tok.vocab.reserved == {"mask": 0, "oov": 1} and tok.oov_id == 1
    assert opened["emb"].sources == tables["emb"].sources and opened["emb"].metadata == {"mask_zero": True}
    for name in ("q", "m"):
        assert opened[name].quantization is not None
        assert dense(opened[name]).tobytes() == dense(tables[name]).tobytes()


def test_minimal_manifest_of_an_older_store_still_opens(store: Path) -> None:
    """Only name/file/shape/dtype/sha256/data_offset/nbytes are required of a table; vocabularies, files, etc.
    may be absent."""
    required = ("name", "file", "shape", "dtype", "sha256", "data_offset", "nbytes")

    def strip(m: Manifest) -> None:
        m["tables"] = [{k: v for k, v in t.items() if k in required} for t in m["tables"] if t["name"] == "emb"]
        for key in ("vocabularies", "files", "generator", "provenance"):
            m.pop(key)

    _edit(store, strip)
    opened = open_store(store)
    assert list(opened) == ["emb"] and opened["emb"].data.tobytes() == _tables()[0].data.tobytes()


def test_cli_reports_a_malformed_manifest_in_one_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(store, _set(_EMB, "shape", None))
    code = main(["lookup", str(store), "--table", "emb", "--ids", "1"])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "table #0 ('emb'): 'shape' must be a list of two non-negative integers, got None" in err
    assert "re-create the store" in err
