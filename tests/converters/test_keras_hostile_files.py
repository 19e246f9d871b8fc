"""Hostile ``.keras`` files on the streamed (large-table) path, which reads the archive with h5py itself:
nothing outside the file is read, no claimed-but-absent data is allocated, no bomb is expanded. Each is a
one-line error (exit 2) that writes nothing; the ordinary path refuses them too (Keras itself, or the same
checks)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_keras_corrupt_files import WEIGHTS, _error_line, _rezip, _run, saved  # noqa: F401 - saved is a fixture


def _with_weights(src: Path, dst: Path, tmp: Path, edit: Callable[[Any], None]) -> Path:
    """``src`` with its ``model.weights.h5`` changed by ``edit`` (on the Dense kernel's ``vars`` group)."""
    import h5py

    with zipfile.ZipFile(src) as zf:
        (tmp / "w.h5").write_bytes(zf.read(WEIGHTS))
    with h5py.File(tmp / "w.h5", "r+") as h5:
        edit(h5["layers/dense/vars"])  # the Dense layer's group (named after its class)
    weights = (tmp / "w.h5").read_bytes()
    _rezip(src, dst, lambda name, data: weights if name == WEIGHTS else data)
    return dst


def _external_storage(target: Path) -> Callable[[Any], None]:
    def edit(vars_: Any) -> None:
        shape, dtype = vars_["0"].shape, vars_["0"].dtype
        del vars_["0"]
        vars_.create_dataset("0", shape=shape, dtype=dtype, external=[(str(target), 0, int(np.prod(shape)) * 4)])
    return edit


def _external_link(target: Path) -> Callable[[Any], None]:
    import h5py

    def edit(vars_: Any) -> None:
        del vars_["0"]
        vars_["0"] = h5py.ExternalLink(str(target), "/k")
    return edit


def _declared_huge(vars_: Any) -> None:
    del vars_["0"]
    vars_.create_dataset("0", shape=(200_000, 50_000), dtype="<f4", chunks=(1024, 1024))  # 40 GB, never written


@pytest.mark.parametrize(("case", "message"), [
    ("external_storage", "keeps its data in other files"),
    ("external_fifo", "keeps its data in other files"),
    ("external_link", "links '/layers/dense/vars/0' to another file"),
    ("declared_huge", "declares 40,000,000,000 bytes but the file holds 0"),
])
def test_hostile_weights_are_refused_on_the_streamed_path(saved: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str], case: str,
                                                          message: str) -> None:
    import h5py

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.arange(100, dtype=np.float32).tobytes())
    with h5py.File(outside / "other.h5", "w") as other:
        other.create_dataset("k", data=np.full((4, 2), 999.0, np.float32))
    fifo = outside / "fifo"
    os.mkfifo(fifo)  # reading it would block forever
    edits = {"external_storage": _external_storage(secret), "external_fifo": _external_storage(fifo),
             "external_link": _external_link(outside / "other.h5"), "declared_huge": _declared_huge}
    model = _with_weights(saved["keras"], tmp_path / f"{case}.keras", outside, edits[case])
    args = ["convert", str(model), "-o", str(tmp_path / "out"), "--large", "--no-parity"]
    line = _error_line(*_run(args, capsys))
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("deflate", "refused"), [(True, True), (False, False)])
def test_a_config_is_a_zip_bomb_when_it_expands_past_the_floor_and_the_ratio(
        saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, deflate: bool, refused: bool) -> None:
    """A big config stored as it is (a vocabulary of millions of ids) converts; one inflating 100x is refused."""
    import converters.keras_layout as layout

    padded = tmp_path / "padded.keras"
    _rezip(saved["keras"], padded, lambda name, data: data + b" " * 1_000_000 if name == "config.json" else data,
           deflate=deflate)
    monkeypatch.setattr(layout, "CONFIG_FLOOR", 4096)  # the real floor, 64 MiB, scaled down for the test
    code, out, err = _run(["convert", str(padded), "-o", str(tmp_path / "out"), "--no-parity"], capsys)
    if refused:
        line = _error_line(code, out, err)
        assert "config.json expands to 1,00" in line and "zip bomb" in line and not (tmp_path / "out").exists()
    else:
        assert code == 0, err


def test_negative_dims_in_an_onnx_initializer_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("W", TensorProto.FLOAT, [-4, -3], np.zeros(12, np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Gather", ["W", "ids"], ["v"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "m.onnx")
    model = str(tmp_path / "m.onnx")
    for command in (["extract", model, "-o", str(tmp_path / "s")], ["inspect", model]):
        code, out, err = _run(command, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and "declares negative dims [-4, -3]" in err
