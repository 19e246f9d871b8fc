"""``embridge share`` on quantized tables: the shared store keeps the quantization, and serves what the model serves.

Each model is rewritten to read its integer table from the store; the store holds the integers, the scale
and zero point files and the scheme, so every backend's lookup equals the original model's dequantized
Gather bit for bit, and the rewritten model gives the original's outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_quantization import (  # the model builders of test_quantization.py
    BACKENDS,
    BLOCK,
    Q8,
    QU8,
    RNG,
    D,
    G,
    V,
    _dql,
    _init,
    _keras_int4,
    _keras_int8,
    _model,
    _mul,
    _scale,
)
from test_share import _save

from bridge.backends import lookup
from bridge.cli import main
from bridge.errors import UnsupportedError
from bridge.extract import extract
from bridge.quantization import dense
from bridge.share import share
from bridge.store import open_store
from bridge.store_parity import store_parity


def _half_exact(*shape: int) -> np.ndarray:
    return _scale(*shape).astype(np.float16).astype(np.float32)


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "dql_per_tensor": lambda: _dql(Q8, np.float32(0.0371), np.int8(-3)),
    "dql_per_row_uint8": lambda: _dql(QU8, _scale(V), RNG.integers(0, 256, V).astype(np.uint8), axis=0),
    "dql_blocked": lambda: _dql(Q8, _scale(V, G), RNG.integers(-8, 8, (V, G)).astype(np.int8), opset=21, axis=1,
                                block_size=BLOCK),
    "dql_output_float16": lambda: _dql(Q8, _half_exact(V), None, opset=23, out_type=TensorProto.FLOAT16, axis=0,
                                       output_dtype=TensorProto.FLOAT16),
    "mul_per_column": lambda: _mul(_scale(1, D)),
    "keras_int8": _keras_int8,
    "keras_int4_blocks": _keras_int4,
}


def _run(model: onnx.ModelProto | Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids.reshape(-1).astype(np.int64)})[0].reshape(ids.shape + (D,))


def _assert_serves(table: Any, model: onnx.ModelProto | Path) -> None:
    """Every backend (and the dense table) equals ``model``'s output for every id, bit for bit."""
    expected = _run(model, np.arange(V))
    assert table.served_dtype == expected.dtype and dense(table).tobytes() == expected.tobytes()
    for backend in BACKENDS:
        fn = lookup(table, backend)
        for ids in (np.arange(V), RNG.integers(0, V, (3, 5)), np.array(V - 1)):
            assert fn(ids).tobytes() == expected[ids].tobytes(), (backend, ids)


@pytest.mark.parametrize("case", CASES)
def test_shared_quantized_table_keeps_its_quantization(tmp_path: Path, case: str) -> None:
    model = CASES[case]()
    src = _save(model, tmp_path / "src" / "model.onnx")
    result = share([src], tmp_path / "out")
    (shared,) = result.models
    assert shared.check.verified, shared.check
    store = open_store(tmp_path / "out")  # verifies every sha256, scale and zero point files included
    table = store["Q"]
    extract(src, tmp_path / "extracted")
    extracted = open_store(tmp_path / "extracted")["Q"]
    assert table.quantization is not None and extracted.quantization is not None
    assert table.quantization.metadata() == extracted.quantization.metadata()
    assert table.data.tobytes() == extracted.data.tobytes() and table.dtype == extracted.dtype
    assert table.quantization.scale.tobytes() == extracted.quantization.scale.tobytes()
    entry = store.entry("Q")["quantization"]
    assert all((tmp_path / "out" / entry[k]["file"]).is_file() for k in ("scale", "zero_point") if entry.get(k))
    _assert_serves(table, model)
    ids = RNG.integers(0, V, (4, 3))
    rewritten = tmp_path / "out" / shared.file
    assert _run(rewritten, ids).tobytes() == _run(model, ids).tobytes()
    report = store_parity(tmp_path / "out", onnx_model=src)
    assert report, report.to_text()


def test_same_integers_with_other_parameters_are_other_tables(tmp_path: Path) -> None:
    scale = _scale(V)
    models = {"a": _dql(Q8, scale, axis=0), "b": _dql(Q8, scale * 2, axis=0), "c": _dql(Q8, scale, axis=0),
              "plain": _model([helper.make_node("Gather", ["Q", "ids"], ["out"])], [_init("Q", Q8)],
                              out_type=TensorProto.INT8)}
    paths = [_save(m, tmp_path / "src" / f"{name}.onnx", external=name == "c") for name, m in models.items()]
    result = share(paths, tmp_path / "out")
    assert all(m.check.verified for m in result.models)
    store = open_store(tmp_path / "out")
    names = [m.tables["Q"] for m in result.models]
    assert len(store) == 3 and names[0] == names[2] and len(set(names)) == 3
    assert [u["model"] for u in store.entry(names[0])["metadata"]["shared_by"]] == [str(paths[0]), str(paths[2])]
    for name, path in zip(names, paths, strict=True):
        _assert_serves(store[name], path)
    assert store[names[3]].quantization is None and store[names[3]].dtype == np.int8


def test_cut_keeps_quantized_lookups_and_says_so(tmp_path: Path) -> None:
    model = _keras_int8()
    result = share([_save(model, tmp_path / "m.onnx")], tmp_path / "out", cut=True)
    (shared,) = result.models
    assert not shared.cut and shared.check.verified
    assert len(shared.kept) == 1 and "dequantizes" in shared.kept[0]
    _assert_serves(open_store(tmp_path / "out")["Q"], model)


@pytest.mark.parametrize(("model", "why"), [
    (lambda: _mul(_scale(V, D)), "scale has shape"),
    (lambda: _dql(Q8, np.array(0.0123456789, np.float32), opset=23, out_type=TensorProto.FLOAT16,
                  output_dtype=TensorProto.FLOAT16), "output_dtype is float16"),
])
def test_a_quantization_the_store_cannot_serve_is_refused(tmp_path: Path, model: Callable[[], onnx.ModelProto],
                                                          why: str) -> None:
    src = _save(model(), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match=rf"table 'Q' is quantized .*{why}"):
        share([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_share_then_lookup_serves_dequantized_vectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _dql(Q8, _scale(V), axis=0)
    src = _save(model, tmp_path / "m.onnx")
    assert main(["share", str(src), "-o", str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    assert main(["lookup", str(tmp_path / "out"), "--table", "Q", "--ids", "0,7", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dtype"] == "float32"
    assert np.array(doc["vectors"], np.float32).tobytes() == _run(model, np.array([0, 7])).tobytes()
