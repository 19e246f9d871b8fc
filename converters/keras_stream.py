"""Stream a ``.keras`` file into the large-table path without loading its big tables into Keras.

``keras.saving.load_model`` holds the weights file's bytes, a NumPy copy and the variable: about
5x a big table. For a ``.keras`` file that takes the large path (:mod:`converters.keras_large`),
this module instead:

1. reads ``config.json`` from the zip and maps ``model.weights.h5`` onto it: Keras 3 writes
   ``layers/<auto-name>/vars/<i>`` per layer (``vars.attrs["name"]`` is the layer's name) and a
   nested model's layers under ``layers/<auto-name>/layers/...``; anything else is "not understood"
   and the caller falls back to the ordinary load with a warning;
2. builds the **skeleton** straight from the config with Keras's own deserialization
   (``safe_mode`` honoured: a ``Lambda`` layer is still refused): every big float ``Embedding``
   gets ``input_dim = k`` (17, 18, ...), so no full table is ever allocated; small weights are
   loaded with each layer's ``load_own_variables``;
3. exposes each big table as a read-only memory map of its bytes inside the ``.keras`` file (the
   zip entry is stored uncompressed and Keras writes contiguous datasets; otherwise the h5 entry
   is first extracted to a temporary file). The store writer streams from that map;
   :meth:`StreamedKeras.release` drops its pages afterwards;
4. :meth:`StreamedKeras.full_model` rebuilds the real model for parity checks *after* the store
   is written, filling big tables in row chunks from h5py (another read path than the store's).

Legacy ``.h5`` files and SavedModels keep the ordinary load (their layout differs).
"""

from __future__ import annotations

import copy
import json
import mmap
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import ModelFormatError
from bridge.render import human_bytes
from converters.keras_env import captured_logs, import_keras
from converters.keras_skeleton import LARGE_THRESHOLD, TF2ONNX_LIMIT, ShrunkTable, skeleton_pattern

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
#: Rows filled per chunk when the full model's big tables are filled from h5.
FILL_ROWS = 16_384
_FLOATS = ("float16", "float32", "float64")

__all__ = ["LayoutError", "StreamedKeras", "StreamedTable", "build_streamed_skeleton", "layer_at", "open_streamed",
           "stream_large"]


class LayoutError(Exception):
    """The ``.keras`` file's layout is not one this module understands (the caller falls back)."""


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
class _Layer:
    """A layer of the config matched to its h5 group."""

    config_path: tuple[int, ...]
    layer_path: str
    entry: dict[str, Any]
    h5_path: str
    var_shapes: list[tuple[int, ...]]
    var_dtypes: list[str]


@dataclass
class StreamedKeras:
    """A ``.keras`` file opened for the large path: its config, layer map, big tables and sizes."""

    path: Path
    config: dict[str, Any]
    layers: list[_Layer]
    tables: list[StreamedTable]
    weight_bytes: int
    safe_mode: bool
    h5_span: tuple[int, int] | None = None
    _tmp: Any = field(default=None, repr=False)
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)

    @property
    def table_bytes(self) -> int:
        """Bytes of the big Embedding tables (each distinct h5 dataset once)."""
        return sum(t.nbytes for t in self.tables)

    @property
    def weights_file(self) -> Path:
        return Path(self._tmp.name) / WEIGHTS_FILE if self._tmp is not None else self.path

    def open_h5(self) -> Any:
        """``model.weights.h5`` opened read-only with h5py (in place inside the zip when stored)."""
        import h5py

        if self.h5_span is not None:
            return h5py.File(_OffsetFile(self.path, *self.h5_span), "r")
        return h5py.File(self.weights_file, "r")

    def build(self, rows: dict[str, int] | None = None) -> Any:
        """A keras.Model from the config; Embedding tables in ``rows`` (h5 path -> rows) get that ``input_dim``."""
        _, keras = import_keras()
        config = copy.deepcopy(self.config)
        config["compile_config"] = None
        for table in self.tables:
            for cpath in table.config_paths:
                entry = _entry_at(config, cpath)["config"]
                entry["input_dim"] = (rows or {}).get(table.h5_path, table.shape[0])
                entry["embeddings_initializer"] = "zeros"
        try:
            with captured_logs():
                model = keras.saving.deserialize_keras_object(config, safe_mode=self.safe_mode)
        except Exception as exc:
            from converters.keras_load import _load_error

            raise _load_error(self.path, exc) from exc
        if not isinstance(model, keras.Model):
            raise ModelFormatError(f"{str(self.path)!r} holds a {type(model).__name__}, not a keras.Model")
        self._restore_initializers(model)
        return model

    def _restore_initializers(self, model: Any) -> None:
        _, keras = import_keras()
        for table in self.tables:
            for cpath, lpath in zip(table.config_paths, table.layer_paths, strict=True):
                original = _entry_at(self.config, cpath)["config"].get("embeddings_initializer")
                if original is not None:
                    layer_at(model, lpath).embeddings_initializer = keras.initializers.get(original)

    def load_small_weights(self, model: Any, h5: Any) -> None:
        """``load_own_variables`` for every layer that is not a big table; checks every weight was set."""
        big = {p for t in self.tables for p in t.layer_paths}
        for layer in self.layers:
            if layer.layer_path in big or not layer.var_shapes:
                continue
            target = layer_at(model, layer.layer_path)
            group = h5[layer.h5_path]
            values = {key: np.asarray(group[key][()]) for key in group}
            try:
                target.load_own_variables(values)
            except Exception as exc:
                raise LayoutError(f"layer {layer.layer_path!r}: {exc}") from exc

    def table_array(self, table: StreamedTable) -> np.ndarray:
        """A read-only map of ``table``'s bytes in the weights file (no copy; pages come from the page cache)."""
        gran = mmap.ALLOCATIONGRANULARITY
        start = table.file_offset - table.file_offset % gran
        with open(self.weights_file, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), table.file_offset - start + table.nbytes, access=mmap.ACCESS_READ,
                               offset=start)
        self._maps.append(mapped)
        count = table.shape[0] * table.shape[1]
        return np.frombuffer(mapped, table.dtype, count, table.file_offset - start).reshape(table.shape)

    def release(self) -> None:
        """Drop the mapped tables' pages from this process (the maps stay valid; a later read re-faults)."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)

    def full_model(self) -> Any:
        """The real model: built from the config, every weight loaded; big tables filled in row chunks."""
        model = self.build()
        with self.open_h5() as h5:
            self.load_small_weights(model, h5)
            for table in self.tables:
                dataset = h5[table.h5_path]
                for lpath in table.layer_paths:
                    _fill(layer_at(model, lpath).embeddings, dataset)
        return model

    def close(self) -> None:
        """Remove the extracted weights file, if one was made."""
        self._maps.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _fill(variable: Any, dataset: Any) -> None:
    """Write ``dataset`` into ``variable`` in place, row chunk by row chunk (never a whole extra copy).

    ``ResourceStridedSliceAssign`` on the handle: ``variable[a:b].assign`` would first read the
    whole variable (a full copy per chunk).
    """
    tf, _ = import_keras()
    handle = variable.value.handle
    rows, dim = (int(d) for d in dataset.shape)
    for start in range(0, rows, FILL_ROWS):
        stop = min(start + FILL_ROWS, rows)
        tf.raw_ops.ResourceStridedSliceAssign(ref=handle, begin=[start, 0], end=[stop, dim], strides=[1, 1],
                                              value=dataset[start:stop])


def layer_at(model: Any, path: str) -> Any:
    """The layer at ``outer/inner`` (names of nested models, then the layer's name)."""
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def _entry_at(config: dict[str, Any], cpath: tuple[int, ...]) -> dict[str, Any]:
    entry = config
    for index in cpath:
        entry = entry["config"]["layers"][index]
    return entry


# ----------------------------------------------------------------------------- opening the file


def open_streamed(path: Path, *, safe_mode: bool = True, min_rows: int = 17) -> StreamedKeras:
    """Read ``path``'s config and weights layout; raise :class:`LayoutError` when it is not understood.

    Big tables are the built-in float ``Embedding`` layers (not quantized, no LoRA) with more than
    ``min_rows`` rows. Layers sharing one table (a layer used twice) are one entry.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:  # the ordinary loader reports a corrupt file in its words
        raise NotAnArchive(f"{str(path)!r} is not a zip archive: {exc}") from exc
    with zf:
        names = set(zf.namelist())
        if CONFIG_FILE not in names or WEIGHTS_FILE not in names:
            raise LayoutError(f"no {CONFIG_FILE} / {WEIGHTS_FILE} in the archive")
        config = json.loads(zf.read(CONFIG_FILE))
        info = zf.getinfo(WEIGHTS_FILE)
        tmp, base = None, None
        if info.compress_type == zipfile.ZIP_STORED:
            base = _data_offset(path, info)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="embridge-keras-")
            with zf.open(info) as src, open(Path(tmp.name) / WEIGHTS_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
    span = (base, info.file_size) if base is not None else None
    streamed = StreamedKeras(path, config, [], [], 0, safe_mode, span, tmp)
    try:
        with streamed.open_h5() as h5:  # in place inside the zip (span), else the extracted copy (tmp)
            streamed.layers = list(_match(config, h5, (), "", "")) if "layers" in h5 else []
            streamed.tables = _big_tables(streamed.layers, h5, base or 0, min_rows)
            streamed.weight_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for layer in streamed.layers
                                        for s, d in zip(layer.var_shapes, layer.var_dtypes, strict=True))
    except Exception:
        streamed.close()  # removes the extracted copy, if one was made
        raise
    return streamed


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored entry's bytes start in the archive (after its local header)."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)
    if head[:4] != b"PK\x03\x04":
        raise LayoutError("bad local zip header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _OffsetFile:
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


def _match(entry: dict[str, Any], h5: Any, cpath: tuple[int, ...], lpath: str, hpath: str) -> Iterator[_Layer]:
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
        yield _Layer((*cpath, index), path, child, f"{sub}/vars", [tuple(vars_[k].shape) for k in keys],
                     [str(vars_[k].dtype) for k in keys])
        if "layers" in node:
            yield from _match(child, h5, (*cpath, index), path, sub)


def _is_plain_embedding(layer: _Layer, min_rows: int) -> bool:
    entry = layer.entry
    cfg = entry.get("config", {})
    builtin = entry.get("class_name") == "Embedding" and str(entry.get("module", "")).startswith("keras")
    quantized = isinstance(cfg.get("dtype"), dict) and "Quantized" in str(cfg["dtype"].get("class_name", ""))
    return (builtin and not quantized and not cfg.get("lora_rank") and len(layer.var_shapes) == 1
            and len(layer.var_shapes[0]) == 2 and layer.var_shapes[0][0] > min_rows
            and layer.var_dtypes[0] in _FLOATS)


def _big_tables(layers: list[_Layer], h5: Any, base: int, min_rows: int) -> list[StreamedTable]:
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


def fallback_warning(path: Path, reason: str) -> None:
    """Warn that ``path`` is loaded the ordinary way (Keras holds several copies of its weights)."""
    warnings.warn(f"{str(path)!r}: cannot stream its weights ({reason}); loading it with keras.saving.load_model, "
                  "which needs several times the weights' size in memory", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------- the large path


def stream_large(source: Any, *, safe_mode: bool, large: bool | None, threshold: int | None,
                 skeleton_rows: int) -> tuple[StreamedKeras, str] | None:
    """``(streamed, reason)`` when ``source`` is a ``.keras`` file that takes the large path; else None.

    Mirrors :func:`converters.keras_large.large_path_reason` from the file's layout alone. None
    (the ordinary load) for other inputs, ``large=False``, a model without a big table, or a
    layout this module does not understand (with a warning).
    """
    if large is False or not isinstance(source, (str, Path)) or Path(source).suffix.lower() != ".keras":
        return None
    path = Path(source)
    if not path.is_file():
        return None
    try:
        streamed = open_streamed(path, safe_mode=safe_mode, min_rows=skeleton_rows)
    except NotAnArchive:
        return None
    except LayoutError as exc:
        fallback_warning(path, str(exc))
        return None
    limit = LARGE_THRESHOLD if threshold is None else int(threshold)
    reason = None
    if streamed.tables:
        if large:
            reason = "requested (large=True)"
        elif streamed.table_bytes >= limit:
            reason = (f"embedding tables total {human_bytes(streamed.table_bytes)}, "
                      f"at least the {human_bytes(limit)} threshold")
        elif streamed.weight_bytes > TF2ONNX_LIMIT:
            reason = f"weights total {human_bytes(streamed.weight_bytes)}, past tf2onnx's 2 GiB limit"
    if reason is None:
        streamed.close()
        return None
    return streamed, reason


def build_streamed_skeleton(streamed: StreamedKeras, skeleton_rows: int) -> tuple[Any, list[ShrunkTable]]:
    """The skeleton built from the config (small weights loaded) and its plan, each table a map of the file."""
    rows = {t.h5_path: skeleton_rows + i for i, t in enumerate(streamed.tables)}
    skeleton = streamed.build(rows)
    with streamed.open_h5() as h5:
        streamed.load_small_weights(skeleton, h5)
    plan: list[ShrunkTable] = []
    for table in streamed.tables:
        k = rows[table.h5_path]
        pattern = skeleton_pattern(k, table.shape[1], table.dtype)
        layers = [layer_at(skeleton, p) for p in table.layer_paths]
        for layer in layers:
            layer.embeddings.assign(pattern)
        plan.append(ShrunkTable(layers, list(table.layer_paths), table.shape[0], table.shape[1], table.dtype, k,
                                pattern, source=streamed.table_array(table)))
    return skeleton, plan

