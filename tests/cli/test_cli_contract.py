"""The CLI contract under hurried use: reports never replace inputs, empty or loose option values are refused,
usage errors are one line, and Ctrl-C or a failure after a complete write says what was written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge import open_store
from bridge.cli import main, model_cmds
from bridge.parity import REPORT_MARK
from tests.cli.test_model_cmds import _model, _one_error_line, _run


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An extracted store of ``tmp_path/m.onnx`` (one 50 x 8 table, ``emb.weight``)."""
    _model(tmp_path / "m.onnx")
    assert _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)[0] == 0
    return tmp_path / "s"


def test_parity_report_never_replaces_the_onnx_model_or_another_file(store: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    before = model.read_bytes()
    line = _one_error_line(*_run(["parity", str(store), "--onnx", str(model), "--report", str(model)], capsys))
    assert "is the --onnx model" in line and model.read_bytes() == before
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    line = _one_error_line(*_run(["parity", str(store), "--report", str(notes)], capsys))
    assert "is not an embridge parity report" in line and notes.read_text() == "my own notes\n"
    report = tmp_path / "parity.md"
    for _ in range(2):  # a report it wrote is replaced by the next one
        code, out, _ = _run(["parity", str(store), "--report", str(report)], capsys)
        assert code == 0 and report.read_text().startswith(REPORT_MARK + "\n| table |")


@pytest.mark.parametrize(("args", "message"), [
    (["--tables", ","], "--tables is empty"),
    (["--tables", ""], "--tables is empty"),
    (["--tables", "emb.weight,,x"], "has an empty item"),
    (["--report", ""], "--report is empty"),
    (["--onnx", " "], "--onnx is empty"),
    (["--keras", ""], "--keras is empty"),
])
def test_parity_refuses_empty_values(store: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    assert message in _one_error_line(*_run(["parity", str(store), *args], capsys))


@pytest.mark.parametrize(("ids", "message"), [
    ("", "--ids is empty"), (" ", "--ids is empty"), ("1,,2", "has an empty item"), ("1,", "has an empty item"),
    ("1_0", "'1_0' is not one"), ("\u0661\u0662", "is not one"), ("0x1", "'0x1' is not one"),
    ("99999999999999999999", "does not fit in int64"),
])
def test_lookup_ids_must_be_plain_decimal_integers(store: Path, capsys: pytest.CaptureFixture[str], ids: str,
                                                   message: str) -> None:
    line = _one_error_line(*_run(["lookup", str(store), "--table", "emb.weight", f"--ids={ids}"], capsys))
    assert message in line


def test_lookup_token_options_take_a_token_with_a_comma_whole(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from bridge import EmbeddingTable, Vocabulary, write_store

    data = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_store(tmp_path / "v", [EmbeddingTable("t", data, vocab=Vocabulary(["[UNK]", "a,b", "a", "b"], oov_id=0))])
    code, out, _ = _run(["lookup", str(tmp_path / "v"), "--table", "t", "--token", "a,b", "--token", "b", "--json"],
                        capsys)
    doc = json.loads(out)
    assert code == 0 and doc["keys"] == ["a,b", "b"] and doc["vectors"] == data[[1, 3]].tolist()


@pytest.mark.parametrize("argv", [
    [], ["lookup"], ["lookup", "s", "--table", "t", "--ids", "1", "--backend", "foo"], ["inspect", "--nope", "x"],
    ["convert", "m.keras", "-o", "o", "--opset", "x"], ["convert", "m.keras", "-o", "o", "--large", "--no-large"],
])
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("embridge") and ": error: " in err and "--help" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--batches", ""], "bad batch sizes ''"), (["--variants", ""], "--variants is empty"),
    (["--variants", "np.take,,memcpy"], "has an empty item"),
])
def test_bench_refuses_empty_values_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    line = _one_error_line(*_run(["bench", "--quick", "--no-plots", "--out", str(tmp_path / "b"), *argv], capsys))
    assert message in line and not (tmp_path / "b").exists()


def test_interrupt_after_the_store_is_written_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "m.onnx")

    def interrupted(store: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(model_cmds, "store_rows", interrupted)  # Ctrl-C while the summary is printed
    code, out, err = _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)
    assert code == 130 and err.count("\n") == 1 and "nothing was written" not in err
    assert f"interrupted; '{tmp_path / 's'}' had already been written completely" in err
    assert open_store(tmp_path / "s", verify=True)["emb.weight"].rows == 50


def test_interrupt_before_anything_is_written_says_nothing_was(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "m.onnx")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bridge.extract.write_store", interrupted)
    code, _, err = _run(["extract", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s")], capsys)
    assert (code, err) == (130, "embridge extract: interrupted; nothing was written\n")
    assert not (tmp_path / "s").exists()


def test_a_swallowed_ctrl_c_still_exits_130_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C landing in a finalizer: Python reports it ("Exception ignored in ...", a traceback) and goes on;
    the command must still exit 130, with its one line. Run as a process: pytest catches such reports itself."""
    _model(tmp_path / "m.onnx")
    script = f"""
import os, signal, sys
from bridge.cli import main, model_cmds
rows = model_cmds.store_rows
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
def swallowing(store):
    Finalized()
    return rows(store)
model_cmds.store_rows = swallowing
code = main(["extract", {str(tmp_path / "m.onnx")!r}, "-o", {str(tmp_path / "s")!r}])
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    # (SIG_DFL: the premise is a terminal's Ctrl-C; a shell's background job would start with it ignored)
    assert proc.returncode == 130 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Exception ignored" not in proc.stderr and proc.stderr.endswith("had already been written completely\n")


def test_opset_out_of_range_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(*_run(["convert", str(tmp_path / "m.keras"), "-o", str(tmp_path / "o"), "--opset", "999"],
                                 capsys))
    assert "--opset 999 is not one tf2onnx" in line and "choose 9.." in line


def test_bad_ids_and_unknown_tokens_are_bad_input(store: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(*_run(["lookup", str(store), "--table", "emb.weight", "--ids", "1,50"], capsys))
    assert "id 50 at position (1,) is out of range" in line
    from bridge import EmbeddingTable, Vocabulary, write_store

    write_store(tmp_path / "v", [EmbeddingTable("t", np.ones((2, 2), np.float32), vocab=Vocabulary(["a", "b"]))])
    line = _one_error_line(*_run(["lookup", str(tmp_path / "v"), "--table", "t", "--tokens", "a,zz"], capsys))
    assert "token 'zz' (position 1) is not in the vocabulary" in line


def test_share_warns_of_a_model_it_could_not_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from tests.bridge.conftest import OnnxKit
    from tests.bridge.test_onnx_vocab import lookup_model

    table = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    onnx.save(lookup_model(OnnxKit, table, ["a", "b"], [1, 2], 0), tmp_path / "m.onnx")  # string input
    code, out, err = _run(["share", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "sh")], capsys)
    assert code == 0 and "not checked" in out
    assert "warning: m.onnx was not checked against" in err and "dtype object" in err


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """A background job of a shell script inherits SIGINT ignored; embridge must not take it back."""
    _model(tmp_path / "m.onnx")
    script = f"""
import os, signal, sys
from bridge.cli import main, model_cmds
rows = model_cmds.store_rows
def interrupted(store):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the terminal, while the command runs
    return rows(store)
model_cmds.store_rows = interrupted
sys.exit(main(["extract", {str(tmp_path / "m.onnx")!r}, "-o", {str(tmp_path / "s")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    assert proc.returncode == 0 and "interrupted" not in proc.stderr and "store written" in proc.stdout
