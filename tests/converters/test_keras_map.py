"""Value matching of tables to weights (NumPy only), and the lazy-import rule of converters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

from converters.keras_map import Candidate, digest, match_tables, same_bytes

ROOT = Path(__file__).resolve().parents[2]


def cand(layer: str, arr: np.ndarray, primary: bool = True, calls: list[str] | None = None) -> Candidate:
    def load() -> np.ndarray:
        if calls is not None:
            calls.append(layer)
        return arr

    return Candidate(layer, f"{layer}/embeddings", tuple(arr.shape), load, primary=primary)


def test_same_bytes_is_bitwise() -> None:
    a = np.array([[0.0, np.nan]], np.float32)
    assert same_bytes(a, a.copy())
    assert not same_bytes(a, np.array([[-0.0, np.nan]], np.float32))  # -0.0 == 0.0 numerically, not in bytes
    assert not same_bytes(a, a.astype(np.float64))
    assert not same_bytes(a, a.reshape(2, 1))


def test_digest_covers_dtype_and_shape() -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a.reshape(3, 2))
    assert digest(a) != digest(a.view(np.float32))
    assert digest(np.asfortranarray(a)) == digest(a)


def test_match_finds_every_equal_weight() -> None:
    rng = np.random.default_rng(0)
    t1, t2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    cands = [cand("a", t1), cand("b", t1.copy()), cand("c", t2), cand("d", t2 + 1)]
    got = match_tables([t1, t2, np.zeros((2, 2), np.float32)], cands)
    assert [[c.layer for c in hits] for hits in got] == [["a", "b"], ["c"], []]


def test_primary_candidates_win_over_other_weights() -> None:
    t = np.ones((3, 2), np.float16)
    got = match_tables([t], [cand("kernel", t, primary=False), cand("emb", t)])
    assert [c.layer for c in got[0]] == ["emb"]
    got = match_tables([t], [cand("kernel", t, primary=False)])
    assert [c.layer for c in got[0]] == ["kernel"]


def test_candidates_of_other_shapes_are_never_loaded() -> None:
    calls: list[str] = []
    t = np.zeros((3, 2), np.float32)
    match_tables([t], [cand("fits", t, calls=calls), cand("other", np.zeros((2, 3), np.float32), calls=calls)])
    assert calls == ["fits"]


def test_same_values_other_dtype_do_not_match() -> None:
    t = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert match_tables([t], [cand("f16", t.astype(np.float16))]) == [[]]


def test_importing_the_converter_loads_no_framework() -> None:
    code = (
        "import sys, converters.keras, converters.keras_load, converters.keras_onnx, converters.keras_vocab;"
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnxruntime', 'torch') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_init_imports_nothing() -> None:
    tree = ast.parse((ROOT / "converters" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
