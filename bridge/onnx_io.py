"""Read ONNX models safely: parse without external data, confine paths, map initializers.

Nothing here copies a table that lives in external data: :func:`initializer_array` returns a
read-only ``np.memmap`` over the external file. Inline ``raw_data`` costs exactly the one
copy the protobuf runtime makes when it hands out the bytes; numpy adds none.
"""

from __future__ import annotations

import math
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bridge.errors import InputError, ModelFormatError, UnsupportedError
from bridge.paths import safe_child_path

_PROTOBUF_LIMIT = 2**31 - 1
_ZIP_MAGIC = b"PK\x03\x04"
_LARGE_MODEL_ENTRY = "__MODEL_PROTO.onnx"

#: ONNX element types this package reads, with their numpy dtype (one byte or more per element).
_DTYPES: dict[int, np.dtype[Any]] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64),
    TensorProto.BOOL: np.dtype(np.bool_),
    TensorProto.FLOAT8E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    TensorProto.FLOAT8E4M3FNUZ: np.dtype(ml_dtypes.float8_e4m3fnuz),
    TensorProto.FLOAT8E5M2: np.dtype(ml_dtypes.float8_e5m2),
    TensorProto.FLOAT8E5M2FNUZ: np.dtype(ml_dtypes.float8_e5m2fnuz),
}

#: Typed (non-raw) storage: the TensorProto field holding the values, and the unsigned
#: integer type whose bits carry one element when the field is wider than the element.
_TYPED_FIELDS: dict[int, tuple[str, type[np.generic] | None]] = {
    TensorProto.FLOAT: ("float_data", None),
    TensorProto.DOUBLE: ("double_data", None),
    TensorProto.INT32: ("int32_data", None),
    TensorProto.INT64: ("int64_data", None),
    TensorProto.UINT32: ("uint64_data", np.uint32),
    TensorProto.UINT64: ("uint64_data", None),
    TensorProto.FLOAT16: ("int32_data", np.uint16),
    TensorProto.BFLOAT16: ("int32_data", np.uint16),
    TensorProto.INT16: ("int32_data", np.uint16),
    TensorProto.UINT16: ("int32_data", np.uint16),
    TensorProto.INT8: ("int32_data", np.uint8),
    TensorProto.UINT8: ("int32_data", np.uint8),
    TensorProto.BOOL: ("int32_data", np.uint8),
    TensorProto.FLOAT8E4M3FN: ("int32_data", np.uint8),
    TensorProto.FLOAT8E4M3FNUZ: ("int32_data", np.uint8),
    TensorProto.FLOAT8E5M2: ("int32_data", np.uint8),
    TensorProto.FLOAT8E5M2FNUZ: ("int32_data", np.uint8),
}


@dataclass(frozen=True)
class ExternalData:
    """Where an initializer's bytes live: ``location`` relative to the model's directory."""

    location: str
    offset: int = 0
    length: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"location": self.location, "offset": self.offset, "length": self.length}


# ---------------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = False) -> onnx.ModelProto:
    """Parse the binary ONNX model at ``path``.

    External data is left on disk unless ``load_external_data`` is true; then every external
    tensor is read (paths confined to the model's directory) into the returned proto.
    Model-local functions that a node calls are inlined (:func:`inline_functions`), so the tables
    they read are found; names are checked (:func:`_check_graphs`). A tf2onnx ``large_model`` zip
    archive is refused with :class:`UnsupportedError` saying how to unzip it. Raises
    :class:`InputError` for a missing path or a directory and :class:`ModelFormatError` for
    anything that is not a complete ONNX model.
    """
    p = Path(path)
    _check_model_path(p)
    data = p.read_bytes()
    if data[:4] == _ZIP_MAGIC:
        raise _zip_error(p)
    model = _parse_model(p, data)
    _check_graphs(model, p)
    inlined = inline_functions(model, repr(str(p)))
    if inlined is not model:
        model = inlined
        _check_graphs(model, p)
    if load_external_data:
        _load_external_tensors(model, p.parent)
    return model


def _check_graphs(model: onnx.ModelProto, p: Path) -> None:
    """ModelFormatError for names this package (and onnxruntime) cannot tell apart, in any graph.

    Checked: every name is UTF-8 (protobuf hands a name that is not back as bytes), no two nodes of a
    graph share a non-empty name, no value of a graph is defined twice (two initializers, an initializer
    and a node output, two node outputs), no two subgraphs get the same path, and no initializer
    declares a negative dim.
    """
    paths: set[str] = set()
    for path, graph in iter_graphs(model):
        where = f"subgraph {path!r}" if path else "the main graph"
        if path in paths:
            raise ModelFormatError(
                f"{str(p)!r}: two subgraphs get the path {path!r} (node names with '/' spell another node's "
                "subgraph path); rename one of the nodes holding them"
            )
        paths.add(path)
        node_names = [node.name for node in graph.node]
        defined = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
        inits = len(defined)
        defined += [out for node in graph.node for out in node.output if out]
        _check_utf8(graph, [*node_names, *defined], f"{str(p)!r}: a name in {where}")
        _check_node_names(node_names, f"{str(p)!r}: two nodes of {where}")
        _check_definitions(graph, defined, inits, f"{str(p)!r}: {{name!r}} is defined twice in {where}")
        negative = next((t for t in graph.initializer if any(d < 0 for d in t.dims)), None)
        if negative is not None:
            raise ModelFormatError(f"{str(p)!r}: initializer {negative.name!r} in {where} declares negative dims "
                                   f"{list(negative.dims)}; the model is damaged or hostile: re-export it")


def _check_utf8(graph: onnx.GraphProto, names: list[str], where: str) -> None:
    """ModelFormatError naming the first of ``names`` or of ``graph``'s input, output and value_info
    names that is not UTF-8 (``where`` starts the message)."""
    names = [*names, *(v.name for v in (*graph.input, *graph.output, *graph.value_info))]
    if bytes in set(map(type, names)):
        bad = next(n for n in names if isinstance(n, bytes))
        raise ModelFormatError(f"{where} is not UTF-8 text ({bad!r}); ONNX requires UTF-8 names: give it a "
                               "UTF-8 name where the model is made")


def _check_node_names(names: list[str], where: str) -> None:
    """ModelFormatError for two nodes of a graph with the same non-empty name (``where`` starts the message).

    The ONNX checker allows it, but onnxruntime refuses such a model, and this package names nodes
    (and the subgraphs under them) by their names: a repeated name would make two places one.
    """
    named = [name for name in names if name]
    if len(set(named)) != len(named):
        raise ModelFormatError(f"{where} are named {_first_repeat(named)!r}; onnxruntime refuses such a model too: "
                               "give every node a unique name (or none)")


def _check_definitions(graph: onnx.GraphProto, defined: list[str], inits: int, message: str) -> None:
    """ModelFormatError for a value of ``graph`` defined twice (``defined``: its ``inits`` initializer names,
    then its node outputs; ``message`` formats ``name``). onnxruntime would serve one of them (the first
    initializer of a name), this package could read the other."""
    if len(set(defined)) == len(defined):
        return
    name = _first_repeat(defined)
    first = defined.index(name)
    second = defined.index(name, first + 1)
    raise ModelFormatError(
        f"{message.format(name=name)} ({_definers(graph, name, first < inits, second < inits)}); "
        "onnxruntime reads only one of them: give each initializer and node output a unique name"
    )


def _first_repeat(names: list[str]) -> str:
    """The first of ``names`` seen before (``names`` has one)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    raise ValueError("no name is repeated")


def _definers(graph: onnx.GraphProto, name: str, *initializer: bool) -> str:
    """``"two initializers"``, ``"an initializer and an output of node 'n'"``, ``"outputs of nodes 'a', 'b'"``."""
    if all(initializer):
        return "two initializers"
    nodes = [repr(node_label(node, i)) for i, node in enumerate(graph.node) if name in node.output]
    if any(initializer):
        return f"an initializer and an output of node {nodes[0]}"
    return f"outputs of nodes {', '.join(nodes)}" if len(nodes) > 1 else f"two outputs of node {nodes[0]}"


def _check_model_path(p: Path) -> None:
    if not p.exists():
        raise InputError(f"model file {str(p)!r} does not exist; check the path")
    if p.is_dir():
        raise InputError(f"model path {str(p)!r} is a directory; pass the .onnx file inside it")
    size = p.stat().st_size
    if size == 0:
        raise ModelFormatError(f"{str(p)!r} is not a valid ONNX model (the file is empty); check the file is complete")
    if size > _PROTOBUF_LIMIT:
        raise ModelFormatError(
            f"{str(p)!r} is {size} bytes, past protobuf's 2 GiB limit, so it cannot be a valid ONNX file; "
            "save the model with its weights as external data (onnx.save(..., save_as_external_data=True))"
        )


def _zip_error(p: Path) -> UnsupportedError:
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        return UnsupportedError(f"{str(p)!r} starts like a zip archive but cannot be read ({exc}); pass an .onnx file")
    if _LARGE_MODEL_ENTRY in names:
        return UnsupportedError(
            f"{str(p)!r} is a tf2onnx large_model zip archive, which is not read directly yet; "
            f"unzip it (python -m zipfile -e {str(p)!r} OUT_DIR) and pass OUT_DIR/{_LARGE_MODEL_ENTRY}"
        )
    return UnsupportedError(f"{str(p)!r} is a zip archive, not an ONNX model; extract the .onnx file from it")


def _parse_model(p: Path, data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelFormatError(
            f"{str(p)!r} is not a valid ONNX model (protobuf parse failed: {exc}); check the file is complete"
        ) from None
    missing = [what for what, ok in (
        ("ir_version", model.ir_version > 0),
        ("graph", model.HasField("graph")),
        ("opset_import", len(model.opset_import) > 0),
    ) if not ok]
    if missing:
        raise ModelFormatError(
            f"{str(p)!r} is not a valid ONNX model (it parsed but has no {', '.join(missing)}); "
            "check the file is complete and is a binary .onnx file"
        )
    return model


def _load_external_tensors(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in _all_tensors(model):
        if external_data_info(tensor) is not None:
            data = initializer_array(tensor, base_dir)
            tensor.raw_data = np.ascontiguousarray(data).tobytes()
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for _, graph in iter_graphs(model):
        yield from graph.initializer
        yield from attribute_tensors(graph)


def attribute_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """The tensor attributes (``Constant`` values, ...) of ``graph``'s own nodes."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


# ---------------------------------------------------------------------------------- graphs


def iter_graphs(model: onnx.ModelProto | onnx.GraphProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """Yield ``("", main_graph)`` then every subgraph, depth first in node order.

    A subgraph's path is its parent's path, the node's label and the attribute name joined by
    ``/``: ``"loop_node/body"``, ``"outer/if_node/then_branch/inner_loop/body"``; a GRAPHS
    attribute adds ``[i]``. Unnamed nodes are labelled by :func:`node_label`.
    """
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    yield from _walk_graph("", graph)


def _walk_graph(path: str, graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    yield path, graph
    for index, node in enumerate(graph.node):
        for sub_path, sub in subgraphs(path, index, node):
            yield from _walk_graph(sub_path, sub)


def subgraphs(parent: str, index: int, node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graph attributes of ``node`` (the ``index``-th node of graph ``parent``), with their paths."""
    prefix = ""  # made when the node has a graph attribute: most nodes have none
    for attr in node.attribute:
        if attr.type not in _GRAPH_ATTRIBUTES:
            continue
        if not prefix:
            prefix = f"{parent}/{node_label(node, index)}/" if parent else f"{node_label(node, index)}/"
        if attr.type == onnx.AttributeProto.GRAPH:
            yield f"{prefix}{attr.name}", attr.g
        else:
            for i, g in enumerate(attr.graphs):
                yield f"{prefix}{attr.name}[{i}]", g


_GRAPH_ATTRIBUTES = frozenset({onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS})


def node_label(node: onnx.NodeProto, index: int) -> str:
    """``node.name``, or ``"<op_type>#<index>"`` for an unnamed node (its position in its graph).

    Labels are unique in a graph (node names are, see :func:`load_model`): a name that could be an
    unnamed node's label, or the escape of one (``"Gather#1"``, ``"Gather#1#"``), gets one more ``#``.
    """
    name = node.name
    if not name:
        return f"{node.op_type}#{index}"
    return f"{name}#" if "#" in name and _LABEL_LIKE.fullmatch(name) else name


#: names ending like an unnamed node's label (``#<digits>``), or its escape (``#`` appended, again and again)
_LABEL_LIKE = re.compile(r".*#[0-9]+#*", re.DOTALL)


def inline_functions(model: onnx.ModelProto, what: str = "the model") -> onnx.ModelProto:
    """``model`` with its model-local functions inlined, or ``model`` itself when no node calls one.

    A table read inside a function (``model.functions``) is only visible to the scanner once the
    function's nodes are in a graph. onnx's inliner keeps the caller's value names and gives the
    function's own values and nodes unique names (``W`` -> ``W__1``). ``what`` names the model in errors.
    """
    if not local_function_calls(model):
        return model
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # noqa: BLE001 - the C++ inliner raises plain exceptions of several types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedError(
            f"{what} calls model-local functions, which must be inlined to find the tables they read, and onnx "
            f"cannot inline them ({reason}); inline or remove the functions in the exporter"
        ) from None


def local_function_calls(model: onnx.ModelProto) -> list[str]:
    """``"domain:name"`` of each model-local function a node of a graph calls (each once, in graph order)."""
    local = {(f.domain, f.name) for f in model.functions}
    if not local:
        return []
    calls = {(n.domain, n.op_type): None for _, g in iter_graphs(model) for n in g.node
             if (n.domain, n.op_type) in local}
    return [f"{domain}:{name}" for domain, name in calls]


# ---------------------------------------------------------------------------------- paths


# ---------------------------------------------------------------------------------- tensors


def external_data_info(tensor: TensorProto) -> ExternalData | None:
    """The external-data reference of ``tensor``, or None when its data is inline."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    if not entries.get("location"):
        raise ModelFormatError(f"initializer {tensor.name!r} is marked external but has no 'location'")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise ModelFormatError(
            f"initializer {tensor.name!r} has a non-integer external offset/length: {entries}"
        ) from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelFormatError(f"initializer {tensor.name!r} has a negative external offset/length: {entries}")
    return ExternalData(location=entries["location"], offset=offset, length=length)


def tensor_dtype(tensor: TensorProto | int) -> np.dtype[Any]:
    """The numpy dtype of a TensorProto (or of an ONNX element type number).

    bfloat16 and the float8 types come from ml_dtypes. Packed sub-byte types (int4, uint4,
    int2, uint2, float4e2m1, float6), strings and complex numbers are unsupported: they raise
    :class:`UnsupportedError`, since they cannot be memory-mapped element for element.
    """
    elem = tensor if isinstance(tensor, int) else tensor.data_type
    dtype = _DTYPES.get(elem)
    if dtype is None:
        name = TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)
        what = f"initializer {tensor.name!r}" if isinstance(tensor, TensorProto) else "a tensor"
        raise UnsupportedError(
            f"{what} has ONNX element type {name}, which embedding-bridge cannot read; "
            f"supported: {', '.join(sorted(TensorProto.DataType.Name(k) for k in _DTYPES))}"
        )
    return dtype


def initializer_array(tensor: TensorProto, base_dir: Path | None) -> np.ndarray:
    """The values of ``tensor`` as a read-only array, without reading external data into RAM.

    External data becomes ``np.memmap(mode="r")`` at the stored offset (the file is confined
    to ``base_dir`` and its size checked); ``raw_data`` becomes an ``np.frombuffer`` view;
    typed fields (``float_data``, ``int32_data``, ...) are converted bit-exactly.
    """
    dtype = tensor_dtype(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"initializer {tensor.name!r} declares negative dims {list(shape)}; the model is "
                               "damaged or hostile: re-export it")
    if tensor.HasField("segment"):
        raise UnsupportedError(f"initializer {tensor.name!r} is a segment of a larger tensor; not supported")
    if sys.byteorder != "little" and dtype.itemsize > 1:
        raise UnsupportedError("reading multi-byte ONNX tensors needs a little-endian machine")
    ext = external_data_info(tensor)
    if ext is not None:
        return _external_array(tensor, ext, base_dir, dtype, shape)
    if tensor.HasField("raw_data"):
        return _raw_array(tensor, dtype, shape)
    return _typed_array(tensor, dtype, shape)


def _expected_nbytes(dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _external_array(
    tensor: TensorProto, ext: ExternalData, base_dir: Path | None, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    if base_dir is None:
        raise InputError(
            f"initializer {tensor.name!r} is stored in external file {ext.location!r}; "
            "pass base_dir (the model's directory) to read it"
        )
    path = safe_child_path(Path(base_dir), ext.location)
    need = _expected_nbytes(dtype, shape)
    if ext.length is not None and ext.length != need:
        raise ModelFormatError(
            f"initializer {tensor.name!r}: external length {ext.length} != {need} bytes for shape {shape} {dtype}"
        )
    if not path.is_file():
        raise ModelFormatError(
            f"external data file {ext.location!r} of initializer {tensor.name!r} is missing from "
            f"{str(base_dir)!r}; keep the data file next to the model"
        )
    size = path.stat().st_size
    if ext.offset + need > size:
        raise ModelFormatError(
            f"external data file {str(path)!r} is truncated: initializer {tensor.name!r} needs bytes "
            f"[{ext.offset}, {ext.offset + need}) but the file has {size}; re-export the model"
        )
    if need == 0:
        return _readonly(np.empty(shape, dtype=dtype))
    return np.memmap(path, dtype=dtype, mode="r", offset=ext.offset, shape=shape)


def _raw_array(tensor: TensorProto, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    raw = tensor.raw_data
    need = _expected_nbytes(dtype, shape)
    if len(raw) != need:
        raise ModelFormatError(
            f"initializer {tensor.name!r} has {len(raw)} bytes of raw_data, expected {need} for shape {shape} {dtype}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _typed_array(tensor: TensorProto, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    field, bits = _TYPED_FIELDS[tensor.data_type]
    values = getattr(tensor, field)
    if len(values) != math.prod(shape):
        raise ModelFormatError(
            f"initializer {tensor.name!r} has {len(values)} values in {field}, expected {math.prod(shape)} "
            f"for shape {shape}"
        )
    if bits is None:
        arr = np.asarray(values, dtype=dtype)
    else:
        wide = np.uint32 if field == "int32_data" else np.uint64
        storage = np.int32 if field == "int32_data" else np.uint64
        arr = np.asarray(values, dtype=storage).view(wide).astype(bits).view(dtype)
    return _readonly(arr.reshape(shape))


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr
