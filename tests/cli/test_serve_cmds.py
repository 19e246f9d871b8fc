"""`embridge lookup` and `embridge parity`, on the bundled example converted with real TensorFlow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge import open_store
from bridge.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store dir, .keras path) of the example classifier, trained briefly and converted."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from text_classifier import build_and_train
    finally:
        sys.path.remove(str(EXAMPLES))
    from converters.keras import convert

    root = tmp_path_factory.mktemp("demo")
    model = build_and_train(epochs=1)
    keras_path = root / "model.keras"
    model.save(keras_path)
    convert(keras_path, root / "out")
    return root / "out", keras_path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torch"])
def test_lookup_ids_and_tokens_json(converted: tuple[Path, Path], backend: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    store_dir, _ = converted
    table = open_store(store_dir)["tok_emb"]
    code, out, _ = _run(["lookup", str(store_dir), "--table", "tok_emb", "--ids", "-1,0,5", "--policy", "wrap",
                         "--backend", backend, "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    got = np.array(doc["vectors"], dtype=np.float32)
    assert got.tobytes() == np.take(table.data, [table.rows - 1, 0, 5], axis=0).tobytes()
    code, out, _ = _run(["lookup", str(store_dir), "--table", "tok_emb", "--tokens", "great,zzz-unknown",
                         "--backend", backend, "--json"], capsys)
    assert code == 0
    vocab = table.vocab
    assert vocab is not None and vocab.oov_id == 0
    expected = np.take(table.data, [vocab.tokens.index("great"), vocab.oov_id], axis=0)
    assert np.array(json.loads(out)["vectors"], dtype=np.float32).tobytes() == expected.tobytes()


def test_lookup_bad_id_is_one_line(converted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    store_dir, _ = converted
    code, out, err = _run(["lookup", str(store_dir), "--table", "tok_emb", "--ids", "3,100000"], capsys)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "100000" in err and "position (1,)" in err
    code, _, err = _run(["lookup", str(store_dir), "--table", "nope", "--ids", "1"], capsys)
    assert code != 0 and "tables: tok_emb" in err
    code, _, err = _run(["lookup", str(store_dir), "--table", "tok_emb", "--ids", "1,x"], capsys)
    assert code == 2 and "integers" in err


def test_parity_passes_with_keras(converted: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    store_dir, keras_path = converted
    code, out, _ = _run(["parity", str(store_dir), "--keras", str(keras_path), "--json",
                         "--report", str(tmp_path / "r.md")], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["passed"] and doc["failed"] == 0
    candidates = {c["backend"] for c in doc["comparisons"]}
    assert candidates == {"numpy", "onnxruntime", "torch", "keras", "onnx-model"}
    assert all(c["tolerance"] is None for c in doc["comparisons"])  # every lookup compared bitwise
    assert "parity: all" in (tmp_path / "r.md").read_text()


def test_flipped_value_caught_by_checksum_then_by_parity(converted: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    src, keras_path = converted
    store_dir = tmp_path / "store"
    shutil.copytree(src, store_dir)
    entry = json.loads((store_dir / "manifest.json").read_text())["tables"][0]
    path = store_dir / entry["file"]
    row = 17
    data = np.load(path, allow_pickle=False)
    data[row, 3] = np.nextafter(data[row, 3], np.float32(np.inf))  # one ulp: the smallest possible change
    np.save(path, data)

    code, out, err = _run(["parity", str(store_dir)], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "sha256" in err and "tok_emb" in err

    code, out, _ = _run(["parity", str(store_dir), "--no-verify", "--keras", str(keras_path), "--json"], capsys)
    assert code == 3
    failures = [c for c in json.loads(out)["comparisons"] if not c["passed"]]
    assert {c["backend"] for c in failures} == {"keras", "onnx-model"}
    assert all(c["table"] == "tok_emb" and c["first_mismatch_id"] == row for c in failures)
    assert all(c["mismatches"] == 1 for c in failures if c["case"] == "all_rows")


def test_convert_cli_large_path_reads_table_from_the_store(converted: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    _, keras_path = converted
    code, out, err = _run(["convert", str(keras_path), "-o", str(tmp_path / "big"), "--large", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["parity"]["passed"]
    model = onnx.load(tmp_path / "big" / "model.onnx", load_external_data=False)
    entry = next(t for t in doc["tables"] if t["name"] == "tok_emb")
    (tensor,) = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    ext = {e.key: e.value for e in tensor.external_data}
    assert ext["location"] == entry["file"] and int(ext["offset"]) == entry["data_offset"]
    assert not list((tmp_path / "big").glob("*.data"))  # the table is on disk once: the store's .npy
