"""Stream a ``.keras`` file into the large-table path without loading its big tables into Keras.

``keras.saving.load_model`` holds the weights file's bytes, a NumPy copy and the variable: about
5x a big table. For a ``.keras`` file that takes the large path (:mod:`converters.keras_large`),
this module instead:

1. reads ``config.json`` from the zip and maps ``model.weights.h5`` onto it: Keras 3 writes
   ``layers/<auto-name>/vars/<i>`` per layer (``vars.attrs["name"]`` is the layer's name) and a
   nested model's layers under ``layers/<auto-name>/layers/...``; anything else is "not understood"
   and the caller falls back to the ordinary load with a warning (the layout itself is read by
   :mod:`converters.keras_layout`);
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

A file that is no valid ``.keras`` archive (not a zip, a damaged member, ``config.json`` not a
model's config, ``model.weights.h5`` truncated) raises :class:`~bridge.errors.ModelFormatError`
(:mod:`converters.keras_layout` words it as the ordinary load does); only a valid file whose layout
is not understood falls back.

Legacy ``.h5`` files and SavedModels keep the ordinary load (their layout differs).
"""

from __future__ import annotations

import copy
import mmap
import shutil
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import ModelFormatError
from bridge.render import human_bytes
from converters.keras_env import captured_logs, import_keras
from converters.keras_layout import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ZIP_DAMAGE,
    LayerEntry,
    LayoutError,
    OffsetFile,
    StreamedTable,
    archive_error,
    big_tables,
    check_weights,
    data_offset,
    entry_at,
    is_bomb,
    layer_at,
    match_layers,
    open_archive,
    read_config,
    weights_error,
)
from converters.keras_load import load_error
from converters.keras_skeleton import LARGE_THRESHOLD, TF2ONNX_LIMIT, ShrunkTable, skeleton_pattern

#: Rows filled per chunk when the full model's big tables are filled from h5.
FILL_ROWS = 16_384
#: Bytes read per step when checking the CRC-32 of a stored ``model.weights.h5``.
CRC_CHUNK = 16 * 2**20

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "LayoutError", "StreamedKeras", "StreamedTable", "build_streamed_skeleton",
           "layer_at", "open_streamed", "stream_large"]


@dataclass
class StreamedKeras:
    """A ``.keras`` file opened for the large path: its config, layer map, big tables and sizes."""

    path: Path
    config: dict[str, Any]
    layers: list[LayerEntry]
    tables: list[StreamedTable]
    weight_bytes: int
    safe_mode: bool
    h5_span: tuple[int, int] | None = None
    h5_crc: int | None = None
    _tmp: Any = field(default=None, repr=False)
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)

    @property
    def table_bytes(self) -> int:
        """Bytes of the big Embedding tables (each distinct h5 dataset once)."""
        return sum(t.nbytes for t in self.tables)

    @property
    def weights_file(self) -> Path:
        return Path(self._tmp.name) / WEIGHTS_FILE if self._tmp is not None else self.path

    def verify_crc(self) -> None:
        """Check a stored ``model.weights.h5`` against its zip CRC-32; a damaged one is a ModelFormatError.

        h5py reads it in place, so zipfile never checks it (an extracted copy was checked while
        extracting). One sequential read of the weights, about a third of what their sha256 costs.
        """
        if self.h5_span is None or self.h5_crc is None:
            return
        crc, (base, size) = 0, self.h5_span
        with open(self.path, "rb") as fh:
            fh.seek(base)
            while size > 0 and (chunk := fh.read(min(CRC_CHUNK, size))):
                crc, size = zlib.crc32(chunk, crc), size - len(chunk)
        if size or crc != self.h5_crc:
            raise archive_error(self.path, f"{WEIGHTS_FILE} is damaged (Bad CRC-32 for file {WEIGHTS_FILE!r})")

    def open_h5(self) -> Any:
        """``model.weights.h5`` opened read-only with h5py (in place inside the zip when stored)."""
        import h5py

        if self.h5_span is None:
            return h5py.File(self.weights_file, "r")
        fileobj = OffsetFile(self.path, *self.h5_span)
        try:
            return h5py.File(fileobj, "r")
        except BaseException:
            fileobj.close()
            raise

    def build(self, rows: dict[str, int] | None = None) -> Any:
        """A keras.Model from the config; Embedding tables in ``rows`` (h5 path -> rows) get that ``input_dim``."""
        _, keras = import_keras()
        config = copy.deepcopy(self.config)
        config["compile_config"] = None
        for table in self.tables:
            for cpath in table.config_paths:
                entry = entry_at(config, cpath)["config"]
                entry["input_dim"] = (rows or {}).get(table.h5_path, table.shape[0])
                entry["embeddings_initializer"] = "zeros"
        try:
            with captured_logs():
                model = keras.saving.deserialize_keras_object(config, safe_mode=self.safe_mode)
        except Exception as exc:
            raise load_error(self.path, exc) from exc
        if not isinstance(model, keras.Model):
            raise ModelFormatError(f"{str(self.path)!r} holds a {type(model).__name__}, not a keras.Model")
        self._restore_initializers(model)
        return model

    def _restore_initializers(self, model: Any) -> None:
        _, keras = import_keras()
        for table in self.tables:
            for cpath, lpath in zip(table.config_paths, table.layer_paths, strict=True):
                original = entry_at(self.config, cpath)["config"].get("embeddings_initializer")
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


# ----------------------------------------------------------------------------- opening the file


def open_streamed(path: Path, *, safe_mode: bool = True, min_rows: int = 17) -> StreamedKeras:
    """Read ``path``'s config and weights layout.

    Raises :class:`~bridge.errors.ModelFormatError` when ``path`` is no valid ``.keras`` archive
    (see :func:`converters.keras_layout.check_archive`) and :class:`LayoutError` when its layout is
    not understood. Big tables are the built-in float ``Embedding`` layers (not quantized, no LoRA)
    with more than ``min_rows`` rows. Layers sharing one table (a layer used twice) are one entry.
    """
    with open_archive(path) as zf:
        config = read_config(path, zf)
        if WEIGHTS_FILE not in zf.namelist():
            raise LayoutError(f"no {WEIGHTS_FILE} in the archive")
        span, tmp = _weights_location(path, zf)
        crc = zf.getinfo(WEIGHTS_FILE).CRC
    streamed = StreamedKeras(path, config, [], [], 0, safe_mode, h5_span=span, h5_crc=crc, _tmp=tmp)
    try:
        _read_layout(streamed, min_rows)
    except Exception:
        streamed.close()  # removes the extracted copy, if one was made
        raise
    return streamed


def _weights_location(path: Path, zf: zipfile.ZipFile) -> tuple[tuple[int, int] | None, Any]:
    """``(span, None)`` for a stored ``model.weights.h5`` (read in place), else ``(None, tmp)``: an extracted copy."""
    info = zf.getinfo(WEIGHTS_FILE)
    if info.compress_type == zipfile.ZIP_STORED:
        return (data_offset(path, info), info.file_size), None
    tmp = tempfile.TemporaryDirectory(prefix="embridge-keras-")
    free = shutil.disk_usage(tmp.name).free
    if info.file_size > free or is_bomb(info.file_size, info.compress_size):
        tmp.cleanup()
        raise archive_error(path, f"{WEIGHTS_FILE} expands to {info.file_size:,} bytes from {info.compress_size:,} "
                                  f"({free:,} bytes free for it); the archive is damaged, hostile or too big here")
    try:
        with zf.open(info) as src, open(Path(tmp.name) / WEIGHTS_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 2**20)
    except BaseException as exc:
        tmp.cleanup()
        if isinstance(exc, ZIP_DAMAGE):
            raise archive_error(path, f"{WEIGHTS_FILE} is damaged ({exc})") from exc
        raise
    return None, tmp


def _read_layout(streamed: StreamedKeras, min_rows: int) -> None:
    """Fill ``streamed``'s layer map, big tables and weight bytes from its ``model.weights.h5``."""
    base = streamed.h5_span[0] if streamed.h5_span is not None else 0
    try:
        with streamed.open_h5() as h5:  # in place inside the zip (span), else the extracted copy (tmp)
            check_weights(streamed.path, h5)  # nothing outside the file, no claimed data it lacks
            streamed.layers = list(match_layers(streamed.config, h5, (), "", "")) if "layers" in h5 else []
            streamed.tables = big_tables(streamed.layers, h5, base, min_rows)
    except (OSError, KeyError) as exc:  # h5py: a truncated or damaged HDF5 file, a dangling name
        raise weights_error(streamed.path, exc) from exc
    streamed.weight_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for layer in streamed.layers
                                for s, d in zip(layer.var_shapes, layer.var_dtypes, strict=True))


def fallback_warning(path: Path, reason: str) -> None:
    """Warn that ``path`` is loaded the ordinary way (Keras holds several copies of its weights)."""
    warnings.warn(f"{str(path)!r}: cannot stream its weights ({reason}); loading it with keras.saving.load_model, "
                  "which needs several times the weights' size in memory", UserWarning, stacklevel=3)


def fallback_note(path: Path, reason: str) -> str:
    """The conversion warning saying that the large-table path loaded ``path`` the ordinary way."""
    return (f"{str(path)!r}: cannot stream its weights ({reason}), so the large-table path loaded it with "
            "keras.saving.load_model, which needs several times the weights' size in memory")


# ----------------------------------------------------------------------------- the large path


def stream_large(source: Any, *, safe_mode: bool, large: bool | None, threshold: int | None,
                 skeleton_rows: int, fallback: list[str] | None = None) -> tuple[StreamedKeras, str] | None:
    """``(streamed, reason)`` when ``source`` is a ``.keras`` file that takes the large path; else None.

    Mirrors :func:`converters.keras_large.large_path_reason` from the file's layout alone. None
    (the ordinary load) for other inputs, ``large=False``, a model without a big table, or a
    layout this module does not understand: then :func:`fallback_note` is appended to ``fallback``
    (for the caller to report once it knows the model takes the large path), or without
    ``fallback`` a UserWarning is issued. A damaged ``.keras`` file raises
    :class:`~bridge.errors.ModelFormatError` here, before any output is written.
    """
    if large is False or not isinstance(source, (str, Path)) or Path(source).suffix.lower() != ".keras":
        return None
    path = Path(source)
    if not path.is_file():
        return None
    try:
        streamed = open_streamed(path, safe_mode=safe_mode, min_rows=skeleton_rows)
    except LayoutError as exc:
        if fallback is None:
            fallback_warning(path, str(exc))
        else:
            fallback.append(fallback_note(path, str(exc)))
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
    try:
        streamed.verify_crc()  # the ordinary load's zipfile checks it; reading in place does not
    except BaseException:
        streamed.close()
        raise
    return streamed, reason


def build_streamed_skeleton(streamed: StreamedKeras, skeleton_rows: int,
                            keep: frozenset[str] = frozenset()) -> tuple[Any, list[ShrunkTable]]:
    """The skeleton built from the config (small weights loaded) and its plan, each table a map of the file.

    The big tables whose first layer path is in ``keep`` stay whole in the skeleton, read from the file.
    """
    rows = {t.h5_path: skeleton_rows + i for i, t in enumerate(streamed.tables) if t.layer_paths[0] not in keep}
    skeleton = streamed.build(rows)
    with streamed.open_h5() as h5:
        streamed.load_small_weights(skeleton, h5)
        for table in streamed.tables:
            if table.h5_path not in rows:
                for lpath in table.layer_paths:
                    _fill(layer_at(skeleton, lpath).embeddings, h5[table.h5_path])
    plan: list[ShrunkTable] = []
    for table in streamed.tables:
        if table.h5_path not in rows:
            continue
        k = rows[table.h5_path]
        pattern = skeleton_pattern(k, table.shape[1], table.dtype)
        layers = [layer_at(skeleton, p) for p in table.layer_paths]
        for layer in layers:
            layer.embeddings.assign(pattern)
        plan.append(ShrunkTable(layers, list(table.layer_paths), table.shape[0], table.shape[1], table.dtype, k,
                                pattern, source=streamed.table_array(table)))
    return skeleton, plan

