"""Damaged model files are bad input: ``embridge convert`` prints one line naming the file and what is wrong,
exits 2, writes nothing and shows no traceback, on the streamed (``--large``), the default and the ordinary
(``--no-large``) path alike; the library raises a ModelFormatError chained to the real cause.

Every damaged file is made from one tiny saved model (ids -> Embedding(40 x 4) -> Dense), big enough
(more than the skeleton's rows) for ``--large`` to take the streamed path.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.errors import ModelFormatError

WEIGHTS = "model.weights.h5"
MODES = ["", "--large", "--no-large"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model saved as ``.keras`` and as legacy ``.h5``."""
    from converters.keras_env import import_keras

    _, keras = import_keras()
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int64", name="ids")
    vec = keras.layers.Embedding(40, 4, name="tok_emb")(ids)
    model = keras.Model(ids, keras.layers.Dense(2, name="head")(vec), name="tiny")
    root = tmp_path_factory.mktemp("good")
    model.save(root / "tiny.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras calls .h5 legacy
        model.save(root / "tiny.h5")
    return {"keras": root / "tiny.keras", "h5": root / "tiny.h5"}


# ----------------------------------------------------------------------------- making damaged files


def _rezip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], deflate: bool = False) -> None:
    """Copy the archive ``src`` to ``dst``, each member through ``edit`` (None drops it)."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", method) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def _member_start(archive: bytes, name: str) -> int:
    """Where the stored bytes of member ``name`` start in ``archive``."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", archive[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _table_offset(weights: bytes) -> int:
    """Where the Embedding's (40, 4) dataset's bytes start in ``model.weights.h5``."""
    import h5py

    found: list[int] = []
    with h5py.File(io.BytesIO(weights), "r") as h5:
        h5.visititems(lambda _, obj: found.append(obj.id.get_offset())
                      if isinstance(obj, h5py.Dataset) and obj.shape == (40, 4) else None)
    return found[0]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _config_edit(text: str) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: text.encode() if name == "config.json" else data


def _truncated_member(member: str) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: data[: len(data) // 3] if name == member else data


def make_damaged(case: str, good: dict[str, Path], root: Path) -> Path:
    """The file (or directory) for ``case``, made under ``root``."""
    keras_bytes = good["keras"].read_bytes()
    path = root / ("bad.h5" if case.startswith("h5") else "bad" if case == "dir_no_saved_model" else "bad.keras")
    if case == "truncated":
        path.write_bytes(keras_bytes[: len(keras_bytes) // 2])
    elif case == "garbage":
        path.write_bytes(b"hello world, not a model")
    elif case in ("empty", "h5_empty"):
        path.write_bytes(b"")
    elif case == "no_config":
        _rezip(good["keras"], path, lambda name, data: None if name == "config.json" else data)
    elif case == "config_truncated":
        _rezip(good["keras"], path, lambda name, data: data[: len(data) // 2] if name == "config.json" else data)
    elif case in ("config_list", "config_object"):
        _rezip(good["keras"], path, _config_edit("[]" if case == "config_list" else '{"layers": []}'))
    elif case == "config_crc":
        path.write_bytes(keras_bytes)
        _flip(path, _member_start(keras_bytes, "config.json") + 5)
    elif case in ("weights_truncated", "weights_truncated_deflated"):
        _rezip(good["keras"], path, _truncated_member(WEIGHTS), deflate=case.endswith("deflated"))
    elif case == "weights_crc":
        weights = zipfile.ZipFile(good["keras"]).read(WEIGHTS)
        path.write_bytes(keras_bytes)
        _flip(path, _member_start(keras_bytes, WEIGHTS) + _table_offset(weights) + 3)
    elif case == "h5_truncated":
        data = good["h5"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "dir_no_saved_model":
        path.mkdir()
        (path / "variables.txt").write_text("not a SavedModel")
    return path


#: case -> what the error line says (besides the file's name).
EXPECTED = {
    "truncated": "not a valid .keras archive: it is not a zip archive",
    "garbage": "not a valid .keras archive: it is not a zip archive",
    "empty": "not a valid .keras archive: the file is empty",
    "no_config": "not a valid .keras archive: it holds no config.json",
    "config_truncated": "not a valid .keras archive: config.json is not valid JSON (line 1, column",
    "config_list": "not a valid .keras archive: config.json is not a Keras model config (a JSON list)",
    "config_object": "config.json is not a Keras model config (an object without a class_name)",
    "config_crc": "not a valid .keras archive: config.json is damaged (Bad CRC-32",
    "weights_truncated": "not a valid .keras archive: model.weights.h5 is truncated or damaged",
    "weights_truncated_deflated": "not a valid .keras archive: model.weights.h5 is truncated or damaged",
    "weights_crc": "Bad CRC-32 for file 'model.weights.h5'",
    "h5_truncated": "not a valid HDF5 model file: Unable to synchronously open file (truncated file",
    "h5_empty": "not a valid HDF5 model file: the file is empty",
    "dir_no_saved_model": "is not a SavedModel (no saved_model.pb)",
}


# ----------------------------------------------------------------------------- the CLI contract


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(code: int, out: str, err: str) -> str:
    """The one error line: exit 2, nothing on stdout, no traceback, only progress notes before it."""
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    assert all(line.startswith("converting ") for line in lines[:-1]), err
    return lines[-1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_damaged_model_is_one_line_exit_2_and_writes_nothing(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, mode: str
) -> None:
    path = make_damaged(case, saved, tmp_path)
    args = ["convert", str(path), "-o", str(tmp_path / "out"), "--no-parity"] + ([mode] if mode else [])
    with warnings.catch_warnings(record=True) as caught:  # a damaged file is an error, never a fallback
        warnings.simplefilter("always")
        line = _error_line(*_run(args, capsys))
    assert line.startswith("embridge convert: error: ") and repr(str(path)) in line
    assert EXPECTED[case] in line, line
    assert not [w for w in caught if "cannot stream" in str(w.message)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_intact_files_still_convert(saved: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The checks accept what Keras writes (stored and deflated), on the streamed path too."""
    deflated = tmp_path / "deflated.keras"
    _rezip(saved["keras"], deflated, lambda name, data: data, deflate=True)
    for i, source in enumerate([saved["keras"], deflated]):
        code, out, err = _run(["convert", str(source), "-o", str(tmp_path / f"out{i}"), "--large", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["tables"][0]["shape"] == [40, 4]
        manifest = json.loads((tmp_path / f"out{i}" / "manifest.json").read_text())
        assert manifest["provenance"]["large_tables"].get("streamed"), "--large takes the streamed path"


# ----------------------------------------------------------------------------- the library


@pytest.mark.parametrize(("case", "cause"), [
    ("config_truncated", json.JSONDecodeError), ("config_crc", zipfile.BadZipFile),
    ("truncated", zipfile.BadZipFile), ("weights_truncated", OSError),
])
def test_both_loaders_raise_the_same_error_chained_to_the_cause(
    saved: dict[str, Path], tmp_path: Path, case: str, cause: type[Exception]
) -> None:
    from converters.keras_load import load
    from converters.keras_stream import open_streamed

    path = make_damaged(case, saved, tmp_path)
    errors: list[Any] = []
    for read in (load, open_streamed):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
