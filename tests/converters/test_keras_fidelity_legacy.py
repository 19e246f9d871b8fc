"""Keras 2 (tf_keras) models: ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is imported, so the
conversion runs in a subprocess that prints one JSON document; the assertions are made here.

tf_keras's Embedding is a plain ``Gather`` on ``.../embedding_lookup/<N>:0`` fed by the ids themselves:
there is no negative-id wrap (Keras 2 raises on ``-1``; the ONNX Gather wraps it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None,
                                reason="tf_keras is not installed (pip install tf_keras --no-deps)")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os, sys
import numpy as np
import tensorflow as tf
from bridge.backends import lookup
from converters.keras import convert
from converters.keras_env import import_keras
from converters.keras_parity import conversion_parity

out_dir = sys.argv[1]
k = tf.keras
_, keras = import_keras()
k.utils.set_random_seed(0)
ids = k.Input((None,), dtype="int32", name="ids")
x = k.layers.Embedding(11, 4, name="tok_emb")(ids)
y = k.layers.Embedding(7, 3, name="other_emb")(ids)
model = k.Model(ids, [k.layers.Dense(3, name="head")(x), y], name="legacy")
model.save(os.path.join(out_dir, "legacy.keras"))
report = {"keras_module": keras.__name__, "keras_version": keras.__version__, "model_module": type(model).__module__}
for source in ("memory", "file"):
    result = convert(model if source == "memory" else os.path.join(out_dir, "legacy.keras"),
                     os.path.join(out_dir, f"store_{source}"))
    parity = conversion_parity(result)
    tables = {}
    for table in result.tables:
        layer = (result.keras_model or model).get_layer(table.sources[0].layer)
        every_id = np.arange(table.rows, dtype=np.int32)
        want = np.asarray(layer(every_id))
        tables[table.name] = {
            "initializer": table.initializer, "sources": [[s.layer, s.weight] for s in table.sources],
            "consumers": table.metadata["onnx"]["consumers"],
            "weight_equal": table.data.tobytes() == layer.embeddings.numpy().tobytes(),
            "adapters_equal_keras": {b: lookup(table, b)(every_id).tobytes() == want.tobytes()
                                     for b in ("numpy", "onnxruntime", "torch")},
        }
    try:
        model.get_layer("tok_emb")(np.array([-1], np.int32))
        negative = "served"
    except Exception as exc:
        negative = type(exc).__name__
    import onnxruntime as ort
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    onnx_negative = session.run(["other_emb"], {"ids": np.array([[-1]], np.int32)})[0][0, 0]
    report[source] = {
        "tables": tables, "warnings": result.warnings, "parity": bool(parity),
        "parity_backends": sorted({c.backend for c in parity.comparisons}),
        "failures": parity.to_text() if not parity else "",
        "keras_negative_id": negative,
        "onnx_negative_is_last_row":
            onnx_negative.tobytes() == np.asarray(result.store["other_emb"].data[-1]).tobytes(),
        "gather_inputs": [list(n.input) for n in __import__("onnx").load(str(result.onnx_path)).graph.node
                          if n.op_type == "Gather" and "embedding_lookup" in n.input[0]],
    }
print("JSON" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("legacy")
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    return json.loads(line[4:])


def test_conversion_runs_on_tf_keras(legacy: dict[str, Any]) -> None:
    assert legacy["keras_module"] == "tf_keras" and legacy["keras_version"].startswith("2.")
    assert legacy["model_module"].startswith("tf_keras")


@pytest.mark.parametrize("source", ["memory", "file"])
def test_tables_are_found_and_mapped_to_tf_keras_layers(legacy: dict[str, Any], source: str) -> None:
    got = legacy[source]
    assert set(got["tables"]) == {"tok_emb", "other_emb"}
    for name, table in got["tables"].items():
        assert table["sources"] == [[name, f"{name}/embeddings"]]
        assert "embedding_lookup/" in table["initializer"]
        assert table["weight_equal"]
        assert table["adapters_equal_keras"] == {"numpy": True, "onnxruntime": True, "torch": True}
    assert got["warnings"] == []


@pytest.mark.parametrize("source", ["memory", "file"])
def test_plain_gather_without_negative_wrap(legacy: dict[str, Any], source: str) -> None:
    got = legacy[source]
    for table in got["tables"].values():
        (use,) = table["consumers"]
        assert use["op_type"] == "Gather" and use["role"] == "gather" and use["via"] == []
    assert all(inputs[1] == "ids" for inputs in got["gather_inputs"])  # the ids themselves, no wrap
    assert got["keras_negative_id"] != "served"  # Keras 2 rejects -1 ...
    assert got["onnx_negative_is_last_row"]  # ... the ONNX Gather serves row V-1 for it


@pytest.mark.parametrize("source", ["memory", "file"])
def test_parity_passes_on_tf_keras(legacy: dict[str, Any], source: str) -> None:
    got = legacy[source]
    assert got["parity"], got["failures"]
    assert {"numpy", "onnxruntime", "torch", "keras", "onnx-model"} <= set(got["parity_backends"])
