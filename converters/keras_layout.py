"""How a Keras 3 ``.keras`` file is laid out, as far as streaming its big tables needs to know.

- Whether it is a valid archive at all (:func:`check_archive`, :func:`open_archive`,
  :func:`read_config`): a file that is no zip, a damaged member (bad CRC-32, truncated), a
  ``config.json`` that is not JSON or not a model's config, or a ``model.weights.h5`` h5py cannot
  open raises :class:`~bridge.errors.ModelFormatError` naming the file and what is wrong. That is
  bad input for the caller to report, never a reason to fall back; the streamed and the ordinary
  load both check it, so they report a broken file the same way.
- The archive: where a stored (uncompressed) zip entry's bytes start, and a read-only file object
  over them that h5py can open in place (:func:`data_offset`, :class:`OffsetFile`).
- The weights: ``model.weights.h5`` holds ``layers/<auto-name>/vars/<i>`` per layer, the layer's
  name in ``vars.attrs["name"]``, a nested model's layers under ``layers/<auto-name>/layers/...``;
  :func:`match_layers` pairs them with ``config.json``'s layers and raises :class:`LayoutError`
  for anything else.
- The big tables: built-in float ``Embedding`` layers (not quantized, no LoRA) stored as one
  contiguous dataset (:func:`big_tables`).
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import InputError, ModelFormatError

_FLOATS = ("float16", "float32", "float64")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
#: What reading a damaged zip member raises (a bad CRC-32, a truncated or corrupt deflate stream).
ZIP_DAMAGE = (zipfile.BadZipFile, EOFError, zlib.error)
#: A member is a zip bomb when it expands past BOMB_FLOOR bytes (config.json: CONFIG_FLOOR) and more than
#: MAX_COMPRESSION times its compressed size. Keras itself refuses members past 4 GiB and 100x; a config
#: holding a vocabulary of millions of ids is tens of megabytes, stored uncompressed.
MAX_COMPRESSION = 100
BOMB_FLOOR = 4 << 30
CONFIG_FLOOR = 64 << 20

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ZIP_DAMAGE", "LayerEntry", "LayoutError", "OffsetFile", "StreamedTable",
           "archive_error", "big_tables", "check_archive", "data_offset", "entry_at", "layer_at", "match_layers",
           "open_archive", "read_config", "weights_error"]


class LayoutError(Exception):
    """The ``.keras`` file's layout is not one the streamed loader understands (the caller falls back)."""


# ----------------------------------------------------------------------------- is it a valid archive?


def archive_error(path: Path, what: str) -> ModelFormatError:
    """The error for a ``.keras`` file that is no valid Keras archive: the file, what is wrong, the fix."""
    return ModelFormatError(f"could not load {str(path)!r}: not a valid .keras archive: {what}; re-save the model "
                            "with model.save(...)")


def weights_error(path: Path, exc: Exception) -> ModelFormatError:
    """The error for a ``model.weights.h5`` that h5py cannot read (``exc``: h5py's OSError)."""
    return archive_error(path, f"{WEIGHTS_FILE} is truncated or damaged (h5py: {_first_line(exc)})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_archive(path: Path) -> zipfile.ZipFile:
    """``path`` opened as a zip archive; a file that is none (empty, truncated, garbage) is a ModelFormatError."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        empty = path.stat().st_size == 0
        what = "the file is empty" if empty else "it is not a zip archive (truncated, or not a .keras file)"
        raise archive_error(path, what) from exc
    except OSError as exc:
        raise InputError(f"cannot read model file {str(path)!r}: {exc.strerror or exc}") from exc


def read_config(path: Path, zf: zipfile.ZipFile) -> dict[str, Any]:
    """``config.json`` of the archive ``zf`` (of ``path``), checked to be a model's config (has a class_name)."""
    try:
        info = zf.getinfo(CONFIG_FILE)
        if is_bomb(info.file_size, info.compress_size, CONFIG_FLOOR):
            raise archive_error(path, f"its {CONFIG_FILE} expands to {info.file_size:,} bytes from "
                                      f"{info.compress_size:,} (the archive looks like a zip bomb)")
        raw = zf.read(CONFIG_FILE)
    except KeyError as exc:
        raise archive_error(path, f"it holds no {CONFIG_FILE}") from exc
    except ZIP_DAMAGE as exc:
        raise archive_error(path, f"{CONFIG_FILE} is damaged ({exc})") from exc
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise archive_error(path, f"{CONFIG_FILE} is not valid JSON (line {exc.lineno}, column {exc.colno})") from exc
    except ValueError as exc:  # UnicodeDecodeError: not UTF-8/16/32 text
        raise archive_error(path, f"{CONFIG_FILE} is not text ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        kind = "an object without a class_name" if isinstance(config, dict) else f"a JSON {type(config).__name__}"
        raise archive_error(path, f"{CONFIG_FILE} is not a Keras model config ({kind})")
    return config


def check_archive(path: Path) -> dict[str, Any]:
    """``path``'s config, after checking the archive, its config and (stored in place) its weights' HDF5 header.

    Cheap: reads ``config.json`` and the start of ``model.weights.h5``, never the weights. A
    deflated weights entry is not checked here (that would mean decompressing it).
    """
    with open_archive(path) as zf:
        config = read_config(path, zf)
        info = zf.getinfo(WEIGHTS_FILE) if WEIGHTS_FILE in zf.namelist() else None
    if info is not None and info.compress_type == zipfile.ZIP_STORED:
        import h5py

        weights = OffsetFile(path, data_offset(path, info), info.file_size)
        try:
            h5py.File(weights, "r").close()
        except OSError as exc:
            raise weights_error(path, exc) from exc
        finally:
            weights.close()
    return config


# ----------------------------------------------------------------------------- where things are


@dataclass
class StreamedTable:
    """One big Embedding table kept out of Keras: where it sits in the h5 file and in the config."""

    h5_path: str
    config_paths: list[tuple[int, ...]]
    layer_paths: list[str]
    shape: tuple[int, int]
    dtype: np.dtype[Any]
    file_offset: int

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


@dataclass
class LayerEntry:
    """A layer of the config matched to its h5 group."""

    config_path: tuple[int, ...]
    layer_path: str
    entry: dict[str, Any]
    h5_path: str
    var_shapes: list[tuple[int, ...]]
    var_dtypes: list[str]


def layer_at(model: Any, path: str) -> Any:
    """The layer at ``outer/inner`` (names of nested models, then the layer's name)."""
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def entry_at(config: dict[str, Any], cpath: tuple[int, ...]) -> dict[str, Any]:
    entry = config
    for index in cpath:
        entry = entry["config"]["layers"][index]
    return entry


def data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored entry's bytes start in the archive (after its local header)."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)
    if head[:4] != b"PK\x03\x04":
        raise archive_error(path, f"the local zip header of {info.filename} is damaged")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class OffsetFile:
    """A read-only file object over ``size`` bytes of ``path`` starting at ``base`` (for h5py)."""

    def __init__(self, path: Path, base: int, size: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by h5py through close()
        self._base, self._size, self._pos = base, size, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        self._fh.seek(self._base + self._pos)
        got = self._fh.readinto(view[:want])
        self._pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n < 0 else n
        buf = bytearray(max(0, min(n, self._size - self._pos)))
        return bytes(buf[: self.readinto(buf)])

    def close(self) -> None:
        self._fh.close()


def is_bomb(size: int, packed: int, floor: int = BOMB_FLOOR) -> bool:
    """True if ``packed`` bytes expanding to ``size`` look like a bomb (past ``floor`` and the ratio)."""
    return size > floor and size > MAX_COMPRESSION * max(packed, 1)


def check_weights(path: Path, h5: Any) -> None:
    """ModelFormatError for a ``model.weights.h5`` that reads outside itself or claims data it does not hold.

    Refused: links (external links name other files; Keras writes none), datasets whose data lives in
    other files (HDF5 external storage, virtual datasets), an uncompressed dataset declaring more bytes than
    it stores (a tiny file asking for a huge array of fill values), and a compressed one that is a bomb
    (:func:`is_bomb`). Checked before any weight is read.
    """
    import h5py

    def walk(group: Any, prefix: str) -> None:
        for key in group:
            name = f"{prefix}/{key}"
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                where = "another file" if isinstance(link, h5py.ExternalLink) else "another object"
                raise archive_error(path, f"{WEIGHTS_FILE} links {name!r} to {where}; Keras writes no links")
            item = group[key]
            if isinstance(item, h5py.Group):
                walk(item, name)
            elif isinstance(item, h5py.Dataset):
                _check_dataset(path, item, name)

    walk(h5, "")


def _check_dataset(path: Path, dataset: Any, name: str) -> None:
    if dataset.external or dataset.is_virtual:
        raise archive_error(path, f"weight {name!r} of {WEIGHTS_FILE} keeps its data in other files; "
                                  "Keras never writes such datasets")
    declared = int(dataset.size) * dataset.dtype.itemsize
    stored = int(dataset.id.get_storage_size())
    if is_bomb(declared, stored) if dataset.compression else declared > stored:
        raise archive_error(path, f"weight {name!r} of {WEIGHTS_FILE} declares {declared:,} bytes but the file "
                                  f"holds {stored:,} for it; the file is damaged or hostile")


def _children(entry: dict[str, Any]) -> list[dict[str, Any]] | None:
    layers = entry.get("config", {}).get("layers") if isinstance(entry.get("config"), dict) else None
    return layers if isinstance(layers, list) and all(isinstance(c, dict) for c in layers) else None


def match_layers(entry: dict[str, Any], h5: Any, cpath: tuple[int, ...], lpath: str,
                 hpath: str) -> Iterator[LayerEntry]:
    """Pair the model config ``entry``'s layers with the h5 groups under ``hpath/layers``, recursively."""
    children = _children(entry)
    if children is None:
        raise LayoutError(f"config at {lpath or 'the model'} lists no layers")
    by_name = {str(c.get("config", {}).get("name")): (i, c) for i, c in enumerate(children)}
    group = h5[f"{hpath}/layers" if hpath else "layers"]
    for key in group:
        sub = f"{group.name.lstrip('/')}/{key}"
        node = h5[sub]
        if set(node) - {"vars", "layers"} or "vars" not in node:
            raise LayoutError(f"h5 group {sub!r} holds {sorted(node)}")
        name = str(node["vars"].attrs.get("name", ""))
        if name not in by_name:
            raise LayoutError(f"h5 group {sub!r} names layer {name!r}, not in the config")
        index, child = by_name[name]
        path = f"{lpath}/{name}" if lpath else name
        vars_ = node["vars"]
        keys = sorted(vars_, key=int) if all(k.isdigit() for k in vars_) else None
        if keys is None:
            raise LayoutError(f"h5 group {sub}/vars holds {sorted(vars_)}")
        yield LayerEntry((*cpath, index), path, child, f"{sub}/vars", [tuple(vars_[k].shape) for k in keys],
                     [str(vars_[k].dtype) for k in keys])
        if "layers" in node:
            yield from match_layers(child, h5, (*cpath, index), path, sub)


def _is_plain_embedding(layer: LayerEntry, min_rows: int) -> bool:
    entry = layer.entry
    cfg = entry.get("config", {})
    builtin = entry.get("class_name") == "Embedding" and str(entry.get("module", "")).startswith("keras")
    quantized = isinstance(cfg.get("dtype"), dict) and "Quantized" in str(cfg["dtype"].get("class_name", ""))
    return (builtin and not quantized and not cfg.get("lora_rank") and len(layer.var_shapes) == 1
            and len(layer.var_shapes[0]) == 2 and layer.var_shapes[0][0] > min_rows
            and layer.var_dtypes[0] in _FLOATS)


def big_tables(layers: list[LayerEntry], h5: Any, base: int, min_rows: int) -> list[StreamedTable]:
    tables: list[StreamedTable] = []
    for layer in layers:
        if not _is_plain_embedding(layer, min_rows):
            continue
        dataset = h5[f"{layer.h5_path}/0"]
        offset = dataset.id.get_offset()
        if dataset.chunks is not None or dataset.compression or offset is None:
            raise LayoutError(f"dataset {dataset.name} is chunked or compressed")
        rows, dim = layer.var_shapes[0]
        tables.append(StreamedTable(dataset.name.lstrip("/"), [layer.config_path], [layer.layer_path], (rows, dim),
                                    np.dtype(layer.var_dtypes[0]), base + offset))
    return tables
