"""converters.keras_env: TensorFlow's start-up notices never reach the user's stderr; real messages do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from converters.keras_env import native_notices_dropped

NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796419578.394612   11018 port.cc:153] oneDNN custom operations are on. You may see "
    b"slightly different numerical results due to floating-point round-off errors.\n"
)


def test_notices_written_by_native_code_are_dropped_and_other_lines_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with native_notices_dropped():
        os.write(2, NOTICES + b"E0000 something real went wrong\n")
        print("a Python warning", file=sys.stderr)
    lines = capfd.readouterr().err.splitlines()  # under capfd, sys.stderr bypasses fd 2: order may differ
    assert sorted(lines) == ["E0000 something real went wrong", "a Python warning"]
    os.write(2, b"after the block\n")  # file descriptor 2 is restored
    assert capfd.readouterr().err == "after the block\n"


def test_lines_are_kept_when_the_block_raises(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImportError), native_notices_dropped():
        os.write(2, NOTICES + b"dlopen failed: libfoo.so\n")
        raise ImportError("no module")
    assert capfd.readouterr().err == "dlopen failed: libfoo.so\n"


def test_importing_tensorflow_keras_and_tf2onnx_prints_nothing() -> None:
    """Real TensorFlow 2.21 writes these notices whatever TF_CPP_MIN_LOG_LEVEL says (fresh process)."""
    code = "from converters.keras_env import import_tf2onnx; import_tf2onnx()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
