"""`embridge inspect` and `embridge extract` on ONNX models, and the bad-input contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge import open_store
from bridge.cli import main


def _model(path: Path, *, rows: int = 50, dim: int = 8, tied: bool = False) -> np.ndarray:
    """ids -> Gather(emb) [-> MatMul(emb^T)]; returns the table."""
    table = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["vec"], name="lookup")]
    out = helper.make_tensor_value_info("vec", TensorProto.FLOAT, None)
    if tied:
        nodes += [helper.make_node("Transpose", ["emb.weight"], ["embT"], name="tr"),
                  helper.make_node("MatMul", ["vec", "embT"], ["logits"], name="head")]
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])], [out],
        initializer=[numpy_helper.from_array(table, "emb.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, path)
    return table


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx", tied=True)
    code, out, err = _run(["inspect", str(tmp_path / "m.onnx"), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    (table,) = doc["tables"]
    assert {"name", "initializer", "shape", "dtype", "consumers", "source"} <= set(table)
    assert table["initializer"] == "emb.weight" and table["shape"] == [50, 8] and table["dtype"] == "float32"
    roles = sorted(c["role"] for c in table["consumers"])
    assert roles == ["gather", "tied"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]


def test_inspect_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    code, out, _ = _run(["inspect", str(tmp_path / "m.onnx")], capsys)
    assert code == 0 and "emb.weight" in out and "50x8" in out and "1.6 KiB" in out


def test_extract_writes_exact_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _model(tmp_path / "m.onnx")
    code, out, _ = _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["tables"][0]["file"] == "tables/emb.weight.npy"
    store = open_store(tmp_path / "out")
    assert store["emb.weight"].data.tobytes() == table.tobytes()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["provenance"]["source_model"].endswith("m.onnx")


def test_existing_output_is_refused_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    code, out, err = _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out")], capsys)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--force" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x"]
    code, _, _ = _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--force"], capsys)
    assert code == 0 and not (tmp_path / "out" / "x").exists()


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.onnx"
    _model(good)
    blob = good.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    return {name: tmp_path / f"{name}.onnx" for name in ("truncated", "text", "empty", "missing")}


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "missing"])
@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_bad_model_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str) -> None:
    path = _bad_inputs(tmp_path)[case]
    args = [command, str(path)] + (["-o", str(tmp_path / "out")] if command == "extract" else [])
    code, out, err = _run(args, capsys)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embridge {command}: error:")
    assert str(path.name) in lines[0]
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "inspect", str(tmp_path / "bad.onnx")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not a valid ONNX model" in proc.stderr


def test_inspect_reports_a_transposed_copy_as_a_tie(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tf2onnx and torch's legacy exporter store a tied head as a separate [D, V] copy of the table."""
    table = np.random.default_rng(4).standard_normal((30, 6)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["vec"], name="lookup"),
             helper.make_node("MatMul", ["vec", "emb_T"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "emb"), numpy_helper.from_array(table.T.copy(), "emb_T")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
              tmp_path / "m.onnx")
    code, out, _ = _run(["inspect", str(tmp_path / "m.onnx"), "--json"], capsys)
    assert code == 0
    (row,) = json.loads(out)["tables"]
    assert [(t["initializer"], t["layout"]) for t in row["ties"]] == [("emb_T", "transposed")]
    code, out, _ = _run(["inspect", str(tmp_path / "m.onnx")], capsys)
    assert "tied: emb_T (transposed)" in out


def _one_error_line(code: int, out: str, err: str, expected_code: int = 2) -> str:
    """The one error line (progress notes may come before it)."""
    assert code == expected_code and out == "" and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(lines) == 1 and err.strip().endswith(lines[0])
    return lines[0]


def test_output_holding_the_current_directory_or_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing the output with --force would delete it: refused, and nothing is left behind."""
    work = tmp_path / "work"
    work.mkdir()
    _model(work / "m.onnx")
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", str(tmp_path)):
        line = _one_error_line(*_run(["extract", "m.onnx", "-o", out, "--force"], capsys))
        assert "holds the current directory" in line
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(*_run(["extract", "work/m.onnx", "-o", "work", "--force"], capsys))
    assert "holds the input 'work/m.onnx'" in line
    line = _one_error_line(*_run(["share", "work/m.onnx", "-o", "work", "--force"], capsys))
    assert "holds the input 'work/m.onnx'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and [p.name for p in work.iterdir()] == ["m.onnx"]


def test_unusable_output_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    (tmp_path / "file.txt").write_text("x")
    line = _one_error_line(*_run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "file.txt" / "sub")],
                                 capsys))
    assert "cannot create output directory" in line and "choose another path" in line
    (tmp_path / "locked").mkdir(mode=0o500)
    try:
        if os.access(tmp_path / "locked", os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        line = _one_error_line(*_run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "locked" / "out")],
                                     capsys))
        assert "Permission denied" in line
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "locked", "m.onnx"]


def test_machine_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError the library does not expect (a full disk) is one line and exit code 1, not a traceback."""
    import bridge.store

    _model(tmp_path / "m.onnx")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bridge.store, "_write_npy_file", disk_full)
    line = _one_error_line(*_run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out")], capsys), 1)
    assert "No space left on device" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_lookup_json_is_strict_json_with_nan_and_infinity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Non-finite values are the strings "NaN", "Infinity", "-Infinity": every JSON parser accepts the document."""
    table = _model(tmp_path / "m.onnx", rows=4, dim=3)
    table[1] = [np.nan, np.inf, -np.inf]
    _model_with(tmp_path / "m.onnx", table)
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    code, out, _ = _run(["lookup", str(tmp_path / "s"), "--table", "emb.weight", "--ids", "1,2", "--json"], capsys)

    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} is not JSON")

    doc = json.loads(out, parse_constant=refuse)
    assert code == 0 and doc["vectors"][0] == ["NaN", "Infinity", "-Infinity"]
    assert doc["vectors"][1] == table[2].astype(np.float64).tolist()


def _model_with(path: Path, table: np.ndarray) -> None:
    """ids -> Gather(emb.weight) over the given table."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb.weight", "ids"], ["vec"], name="lookup")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("vec", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "emb.weight")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def test_inspect_text_sizes_strings_and_packed_ints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A string table has no fixed size ("?"); int4 packs two values in a byte (10 x 4 -> 20 B)."""
    words = helper.make_tensor("words", TensorProto.STRING, [2, 2], [b"a", b"b", b"c", b"d"])
    nibbles = helper.make_tensor("nibbles", TensorProto.INT4, [10, 4], [1] * 40)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["words", "ids"], ["w"]), helper.make_node("Gather", ["nibbles", "ids"], ["n"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["k"])],
        [helper.make_tensor_value_info("w", TensorProto.STRING, None),
         helper.make_tensor_value_info("n", TensorProto.INT4, None)], initializer=[words, nibbles],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / "m.onnx")
    code, out, err = _run(["inspect", str(tmp_path / "m.onnx")], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["words"][4] == "?" and rows["nibbles"][4:6] == ["20", "B"]


def test_parity_refuses_unknown_backends_and_a_missing_onnx_model(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    line = _one_error_line(*_run(["parity", str(tmp_path / "s"), "--backends", "numpy,foo"], capsys))
    assert "unknown backend(s) 'foo'; choose from numpy, onnxruntime, torch" in line
    line = _one_error_line(*_run(["parity", str(tmp_path / "s"), "--onnx", str(tmp_path / "nope.onnx")], capsys))
    assert "nope.onnx' does not exist" in line
    line = _one_error_line(*_run(["lookup", str(tmp_path / "missing"), "--table", "t", "--ids", "1"], capsys))
    assert "does not exist; check the path" in line


@pytest.mark.parametrize("policy", ["clip", "zero", "oov", "wrap"])
def test_parity_under_a_policy_gives_the_onnx_model_the_ids_it_maps_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    """The ONNX model has no clip/zero/oov policy: it is given the policy's ids (it failed every bad-id set)."""
    table = _model(tmp_path / "m.onnx")
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    if policy == "oov":  # the oov policy needs an OOV row: give the table one
        manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
        manifest["tables"][0]["oov_id"] = 3
        (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _run(["parity", str(tmp_path / "s"), "--onnx", str(tmp_path / "m.onnx"), "--policy", policy,
                           "--json"], capsys)
    doc = json.loads(out)
    assert code == 0, [c for c in doc["comparisons"] if not c["passed"]]
    onnx_rows = [c for c in doc["comparisons"] if c["backend"] == "onnx-model"]
    assert onnx_rows and {c["case"] for c in onnx_rows} >= {"edges", "random_7"}
    assert table.shape == (50, 8)


def test_parity_input_errors_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    store = str(tmp_path / "s")
    cases = {
        ("--report", f"{store}/manifest.json"): "is inside the store",
        ("--tables", "nope"): "no table 'nope'",
        ("--backends", ","): "--backends is empty",
        ("--onnx", str(tmp_path)): "is a directory",
    }
    for args, message in cases.items():
        line = _one_error_line(*_run(["parity", store, *args], capsys))
        assert message in line, (args, line)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["format"] == "embedding-bridge/1"
    line = _one_error_line(*_run(["lookup", store, "--table", "nope", "--ids", "1"], capsys))
    assert "no table 'nope'" in line
    _model_with(tmp_path / "other.onnx", np.zeros((50, 8), np.float32))
    other = onnx.load(tmp_path / "other.onnx")
    other.graph.initializer[0].name = "renamed"
    other.graph.node[0].input[0] = "renamed"
    onnx.save(other, tmp_path / "other.onnx")
    line = _one_error_line(*_run(["parity", store, "--onnx", str(tmp_path / "other.onnx")], capsys))
    assert "holds none of the store's tables" in line


def test_parity_tables_are_stripped_and_counted_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model(tmp_path / "m.onnx")
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    code, out, _ = _run(["parity", str(tmp_path / "s"), "--json"], capsys)
    once = json.loads(out)["total"]
    code, out, _ = _run(["parity", str(tmp_path / "s"), "--tables", " emb.weight, emb.weight", "--json"], capsys)
    assert code == 0 and json.loads(out)["total"] == once


def test_parity_of_a_table_without_rows_under_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every id maps to a zero vector: the ONNX model is not asked for row 0 of a table that has none."""
    _model_with(tmp_path / "m.onnx", np.zeros((0, 4), np.float32))
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    code, out, err = _run(["parity", str(tmp_path / "s"), "--onnx", str(tmp_path / "m.onnx"), "--policy", "zero"],
                          capsys)
    assert code == 0, out + err


@pytest.mark.parametrize("command", ["extract", "share"])
def test_output_holding_an_inputs_external_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """--force would delete the model's own data file: refused, and the model still loads."""
    table = _model(tmp_path / "plain.onnx")
    model = onnx.load(tmp_path / "plain.onnx")
    (tmp_path / "ext").mkdir()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="ext/w.bin", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(*_run([command, "m.onnx", "-o", "ext", "--force"], capsys))
    assert "holds the input" in line and "w.bin" in line
    assert (tmp_path / "ext" / "w.bin").is_file()
    onnx.load(tmp_path / "m.onnx")
    assert table.shape == (50, 8)
