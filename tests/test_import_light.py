"""`import bridge` (and its backends and parity modules) must not load any heavy framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "torch", "onnxruntime", "keras", "tf2onnx")

SCRIPT = """
import json, sys
import bridge
import bridge.backends
import bridge.backends.base, bridge.backends.numpy, bridge.backends.torch, bridge.backends.onnxruntime
import bridge.parity
import bridge.policy
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_import_bridge_loads_no_framework() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT % (HEAVY,)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == []


def test_the_check_would_see_a_framework() -> None:
    """The same probe, after importing torch, reports it: the test above cannot pass vacuously."""
    pytest.importorskip("torch")
    script = SCRIPT.replace("import bridge.policy", "import bridge.policy, torch")
    proc = subprocess.run(
        [sys.executable, "-c", script % (HEAVY,)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch" in json.loads(proc.stdout.strip().splitlines()[-1])
