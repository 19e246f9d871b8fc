"""How a Keras 3 ``.keras`` file is laid out, as far as streaming its big tables needs to know.

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

import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_FLOATS = ("float16", "float32", "float64")

__all__ = ["LayerEntry", "LayoutError", "NotAnArchive", "OffsetFile", "StreamedTable", "big_tables", "data_offset",
           "entry_at", "layer_at", "match_layers"]


class LayoutError(Exception):
    """The ``.keras`` file's layout is not one the streamed loader understands (the caller falls back)."""


class NotAnArchive(LayoutError):
    """The file is no zip archive at all: a corrupt file, left to the ordinary loader to report."""


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
        raise LayoutError("bad local zip header")
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


def _children(entry: dict[str, Any]) -> list[dict[str, Any]] | None:
    layers = entry.get("config", {}).get("layers") if isinstance(entry.get("config"), dict) else None
    return layers if isinstance(layers, list) else None


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
