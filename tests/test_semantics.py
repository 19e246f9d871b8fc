"""The README's semantics table, checked against the real frameworks (V = 1000 rows).

| id    | Keras 3 | ONNX Runtime (Keras graph) | numpy.take | torch.embedding |
| 1000  | error   | error                      | error      | error           |
| -1    | row 999 | row 999                    | row 999    | error           |
| -1001 | error   | row 999                    | error      | error           |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROWS, DIM = 1000, 4
ERROR = "error"
CASES = {1000: (ERROR, ERROR, ERROR, ERROR), -1: (999, 999, 999, ERROR), -1001: (ERROR, 999, ERROR, ERROR)}


def _outcome(fn, table: np.ndarray, idx: int) -> int | str:  # type: ignore[no-untyped-def]
    try:
        row = np.asarray(fn(np.array([idx], dtype=np.int64)))[0]
    except Exception:  # noqa: BLE001 - each framework raises its own type
        return ERROR
    (match,) = np.flatnonzero((table == row).all(axis=1))
    return int(match)


@pytest.fixture(scope="module")
def keras_and_onnx(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from converters.keras import convert
    from converters.keras_env import import_keras

    _, keras = import_keras()
    keras.utils.set_random_seed(3)
    ids = keras.Input(shape=(None,), dtype="int64", name="ids")
    layer = keras.layers.Embedding(ROWS, DIM, name="emb")
    model = keras.Model(ids, layer(ids))
    result = convert(model, tmp_path_factory.mktemp("sem") / "out")
    table = np.asarray(layer.embeddings.numpy())
    return layer, Path(result.onnx_path), table


def test_keras_and_onnxruntime(keras_and_onnx) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    layer, onnx_path, table = keras_and_onnx
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run_onnx(ids: np.ndarray) -> np.ndarray:
        return session.run(None, {"ids": ids[None, :]})[0][0]

    def run_keras(ids: np.ndarray) -> np.ndarray:
        return np.asarray(layer(ids))

    for idx, (keras_row, ort_row, _, _) in CASES.items():
        assert _outcome(run_keras, table, idx) == keras_row, f"Keras, id {idx}"
        assert _outcome(run_onnx, table, idx) == ort_row, f"onnxruntime, id {idx}"


def test_numpy_and_torch() -> None:
    import torch

    table = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    weight = torch.from_numpy(table)
    for idx, (_, _, np_row, torch_row) in CASES.items():
        assert _outcome(lambda i: np.take(table, i, axis=0), table, idx) == np_row, f"numpy, id {idx}"
        assert _outcome(lambda i: torch.nn.functional.embedding(torch.from_numpy(i), weight).numpy(),
                        table, idx) == torch_row, f"torch, id {idx}"
    # unsigned ids: np.take wraps 2**64-1 to the last row silently; the bridge refuses it
    assert _outcome(lambda i: np.take(table, np.array([2**64 - 1], np.uint64), axis=0), table, 0) == ROWS - 1


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torch"])
def test_bridge_policy_is_the_same_everywhere(backend: str) -> None:
    import bridge
    from bridge.errors import IdError

    table = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    wrap = bridge.lookup(table, backend, "wrap")
    assert wrap(np.array([-1])).tobytes() == table[[999]].tobytes()
    for policy in ("error", "wrap"):
        fn = bridge.lookup(table, backend, policy)
        for bad in (np.array([1000]), np.array([-1001]), np.array([2**64 - 1], np.uint64)):
            with pytest.raises(IdError):
                fn(bad)
    assert bridge.lookup(table, backend, "clip")(np.array([2**64 - 1], np.uint64)).tobytes() == table[[999]].tobytes()
