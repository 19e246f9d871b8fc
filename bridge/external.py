"""Point ONNX initializers at bytes in a file (ONNX external data), and keep those paths safe.

The store's ``.npy`` files hold each table's data 64-byte aligned at ``data_offset``, so a model can
read a table straight from the store: its initializer becomes external data with
``location = "tables/x.npy"``, ``offset = data_offset``, ``length = nbytes``, and onnxruntime
memory-maps that range instead of copying it. These helpers do the rewriting for ``embridge share``
and for converters that build a model around a table too large for protobuf (2 GiB).

Every location written or accepted here is relative to the model's directory and stays inside it
(no ``..``, no absolute path, no symlink leading out), the rule onnxruntime 1.31 also enforces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from bridge.atomic import atomic_file
from bridge.errors import InputError, ModelFormatError, UnsafePathError
from bridge.onnx_io import (
    ExternalData,
    attribute_tensors,
    external_data_info,
    initializer_array,
    iter_graphs,
    safe_child_path,
)

_PROTOBUF_LIMIT = 2**31 - 1
_ALIGN = 64
_COPY_CHUNK = 64 * 1024 * 1024


def onnx_elem_type(dtype: np.dtype[Any] | type) -> int:
    """The ONNX element type of a numpy dtype (``ml_dtypes.bfloat16`` -> ``BFLOAT16``)."""
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"dtype {np.dtype(dtype)} has no ONNX element type") from exc


def check_location(location: str) -> None:
    """Refuse (:class:`UnsafePathError`) a location that is empty, absolute or contains ``..``.

    A lexical check for locations about to be written; :func:`check_external_locations` also
    resolves symlinks against the model's directory.
    """
    parts = location.replace("\\", "/").split("/")
    windows = PureWindowsPath(location)
    if not location or "\x00" in location or PurePosixPath(location).is_absolute() or windows.drive or windows.root:
        raise UnsafePathError(f"external data location {location!r} is empty or absolute; "
                              "use a path relative to the model")
    if ".." in parts:
        raise UnsafePathError(f"external data location {location!r} contains '..'; "
                              "keep data inside the model's directory")


def find_initializer(model: onnx.ModelProto, name: str, graph: str = "") -> TensorProto | None:
    """The initializer ``name`` of the graph at path ``graph`` (``""``: the main graph), or None."""
    for path, g in iter_graphs(model):
        if path == graph:
            return next((t for t in g.initializer if t.name == name), None)
    return None


def point_initializer_at_file(
    model: onnx.ModelProto,
    initializer_name: str,
    location: str,
    offset: int,
    length: int,
    shape: Sequence[int],
    dtype: np.dtype[Any] | type,
    *,
    graph: str = "",
) -> TensorProto:
    """Make ``initializer_name`` read ``length`` bytes at ``offset`` of ``location`` (external data).

    ``location`` is relative to the directory the model will be saved in. The initializer may be
    inline, already external, or a small placeholder (e.g. from a skeleton conversion with a tiny
    vocabulary): its data is dropped and its dims and element type become ``shape`` and ``dtype``.
    A ``Constant`` node producing ``initializer_name`` becomes ``Identity`` of a new initializer
    ``<initializer_name>__data`` (node positions do not change).
    Returns the rewritten TensorProto (part of ``model``). Nothing is read from or written to disk.
    """
    tensor = find_initializer(model, initializer_name, graph)
    if tensor is None:
        tensor = _constant_to_initializer(model, initializer_name, graph)
    return set_external_data(tensor, location, offset, length, shape, dtype)


def set_external_data(
    tensor: TensorProto, location: str, offset: int, length: int, shape: Sequence[int], dtype: np.dtype[Any] | type
) -> TensorProto:
    """Rewrite ``tensor`` in place as external data (``length`` bytes at ``offset`` of ``location``)."""
    check_location(location)
    shape = tuple(int(d) for d in shape)
    need = math.prod(shape) * np.dtype(dtype).itemsize
    if length != need or offset < 0:
        raise InputError(
            f"initializer {tensor.name!r}: external length {length} at offset {offset} does not fit "
            f"shape {shape} {np.dtype(dtype)} ({need} bytes)"
        )
    _clear_data(tensor)
    tensor.data_type = onnx_elem_type(dtype)
    del tensor.dims[:]
    tensor.dims.extend(shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _clear_data(tensor: TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _constant_to_initializer(model: onnx.ModelProto, name: str, graph: str) -> TensorProto:
    """Turn ``Constant -> name`` into ``Identity(<name>__data) -> name`` over a new initializer.

    The node stays at its position, so the labels of unnamed nodes (and subgraph paths) do not move.
    """
    for path, g in iter_graphs(model):
        if path != graph:
            continue
        for node in g.node:
            if node.op_type == "Constant" and list(node.output) == [name]:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is None:
                    break
                tensor = g.initializer.add()
                tensor.CopyFrom(value)
                tensor.name = _fresh_name(g, f"{name}__data")
                node.ClearField("attribute")
                node.op_type = "Identity"
                node.input.append(tensor.name)
                return tensor
    raise ModelFormatError(f"graph {graph!r} has no initializer or Constant named {name!r}")


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    names.update(o for n in graph.node for o in n.output)
    name, n = base, 1
    while name in names:
        n += 1
        name = f"{base}_{n}"
    return name


# ------------------------------------------------------------------------------ checking


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor of ``model`` with its graph path: initializers and tensor attributes, subgraphs too."""
    for path, graph in iter_graphs(model):
        for tensor in graph.initializer:
            yield path, tensor
        for tensor in attribute_tensors(graph):
            yield path, tensor


def external_tensors(model: onnx.ModelProto) -> list[tuple[str, TensorProto, ExternalData]]:
    """``(graph path, tensor, external data)`` for every tensor stored outside the model file."""
    found = []
    for path, tensor in iter_tensors(model):
        ext = external_data_info(tensor)
        if ext is not None:
            found.append((path, tensor, ext))
    return found


def check_external_locations(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> list[Path]:
    """Resolve every external-data location of ``model`` inside ``base_dir``; return the files.

    Raises :class:`UnsafePathError` for a location that escapes ``base_dir`` (``..``, absolute, a
    symlink leading out) and :class:`InputError` for a missing file.
    """
    files = []
    for _, tensor, ext in external_tensors(model):
        path = safe_child_path(Path(base_dir), ext.location)
        if not path.is_file():
            raise InputError(
                f"external data file {ext.location!r} of initializer {tensor.name!r} is missing from "
                f"{str(base_dir)!r}; keep the data files next to the model"
            )
        files.append(path)
    return files


# ------------------------------------------------------------------------------ writing


def move_external_tensors(
    model: onnx.ModelProto,
    src_dir: Path,
    dest_dir: Path,
    location: str,
    *,
    skip: frozenset[tuple[str, str]] = frozenset(),
) -> int:
    """Copy every external tensor of ``model`` (except initializers ``(graph path, name)`` in ``skip``) into one file.

    ``skip`` names initializers only: a tensor attribute (a ``Constant``'s value) with the same name
    is still moved. The data are read from ``src_dir`` (paths confined there), written 64-byte
    aligned to ``dest_dir / location`` and the tensors re-pointed at it. Returns the bytes written
    (0: no file).
    """
    moving = [t for t in _tensors_outside_skip(model, skip) if external_data_info(t) is not None]
    if not moving:
        return 0
    check_location(location)
    target = safe_child_path(dest_dir, location)
    written = 0
    with open(target, "wb") as fh:
        for tensor in moving:
            array = initializer_array(tensor, src_dir)
            written += (-written) % _ALIGN
            fh.seek(written)
            start = written
            written += _copy_array(fh, array)
            set_external_data(tensor, location, start, array.nbytes, array.shape, array.dtype)
        fh.flush()
        os.fsync(fh.fileno())
    return written


def _tensors_outside_skip(model: onnx.ModelProto, skip: frozenset[tuple[str, str]]) -> Iterator[TensorProto]:
    """Every tensor of ``model`` but the initializers ``(graph path, name)`` in ``skip``."""
    for path, graph in iter_graphs(model):
        yield from (t for t in graph.initializer if (path, t.name) not in skip)
        yield from attribute_tensors(graph)


def _copy_array(fh: Any, array: np.ndarray) -> int:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.nbytes, _COPY_CHUNK):
        fh.write(flat[start : start + _COPY_CHUNK].data)
    return int(flat.nbytes)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (external data stays where it points) atomically; return its size in bytes.

    Refuses a model past protobuf's 2 GiB limit with a message saying to use external data, and a
    model whose external locations are not safe relative paths.
    """
    for _, tensor, ext in external_tensors(model):
        try:
            check_location(ext.location)
        except UnsafePathError as exc:
            raise UnsafePathError(f"initializer {tensor.name!r}: {exc}") from None
    size = model.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise InputError(
            f"the model would be {size} bytes, past protobuf's 2 GiB limit; point its large initializers at "
            "external data (bridge.external.point_initializer_at_file) before saving"
        )
    with atomic_file(path) as fh:
        fh.write(model.SerializeToString())  # type: ignore[attr-defined]
    return size
