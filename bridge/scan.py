"""Find the embedding tables of an ONNX model without reading any tensor data.

A table is a rank-2 constant (an initializer, or the ``value`` of a ``Constant`` node) that
is the data input of a ``Gather(axis=0)`` or of a ``Slice`` reading its first rows (the only
tensor data read: a Slice's few inline starts/axes/steps), directly or through the link patterns of
:mod:`bridge.scan_patterns` (Identity, Cast, DequantizeLinear, Cast -> Mul by a constant
scale), and the rows a Gather returns are checked for a dequantization after the lookup (Keras int8,
int4); the scale and zero point constants of such a table are not reported as tables themselves.
Subgraphs (Loop/If/Scan bodies) are searched too; an outer-scope constant read inside a body
counts; a dequantization's scale and zero point are resolved in the scope of the node reading them
(recorded as ``quantization["scale_graph"]``, ... where that is not the table's graph). A model that calls
model-local functions is refused unless they are inlined (:func:`bridge.onnx_io.load_model` inlines
them). One pass over all nodes builds the indexes; each constant's uses are then
followed through its consumers only, so the cost is linear in the size of the graph.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bridge.errors import InputError, ModelFormatError, UnsupportedError
from bridge.names import unique_name_nocase
from bridge.onnx_io import (
    ExternalData,
    external_data_info,
    iter_graphs,
    load_model,
    local_function_calls,
    node_label,
    subgraphs,
    tensor_dtype,
)
from bridge.scan_patterns import (
    LINK_PATTERNS,
    ROLE_PATTERNS,
    Link,
    Step,
    attr_int,
    gather_miss_reason,
    match_after_gather,
    match_link,
    match_role,
)

_Key = tuple[str, str]  # (graph path, value name)
_Scope = tuple[tuple[str, frozenset[str] | None], ...]  # enclosing graphs, innermost last; None: main graph
_MAX_CHAIN = 64
#: Ops that pass a constant's values on (Cast: in another dtype): constant_key looks through them
#: for a scale, and bridge.ties for a tied projection.
PASS_THROUGH = frozenset({"Identity", "Cast"})
_READERS = frozenset({"Gather", "Slice"})  # ops whose use of a constant makes it worth classifying
_SMALL = 64  # most elements a constant may have for its value to be read (Slice starts, axes, steps)


@dataclass(frozen=True)
class Use:
    """One node that reads a table; ``via`` lists the link ops between the table and it."""

    node: str
    op_type: str
    graph: str
    input_index: int
    via: tuple[str, ...] = ()

    def to_json(self, role: str) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "graph": self.graph, "role": role,
                "input_index": self.input_index, "via": list(self.via)}


TableKey = tuple[str, str]  # (graph path, initializer): see TableRef.key


@dataclass(frozen=True)
class TableRef:
    """An embedding table found in a model: where it is and who reads it.

    ``source`` is ``"initializer"`` or ``"constant"`` (the output of a ``Constant`` node).
    ``quantization`` comes from the first gather that dequantizes the table, if any; ``dequantizations``
    holds what each of ``gathers + slices`` reads, in that order (None: the raw table), so that
    :mod:`bridge.quantization_onnx` can refuse a table dequantized two ways, or read both dequantized
    and raw. ``slices`` are ``Slice`` nodes reading the first rows (``W[:n]``, a position table read by length).
    """

    initializer: str
    shape: tuple[int, ...]
    dtype: str
    graph: str
    gathers: tuple[Use, ...]
    tied: tuple[Use, ...] = ()
    other: tuple[Use, ...] = ()
    external: ExternalData | None = None
    quantization: dict[str, Any] | None = field(default=None, hash=False)
    source: str = "initializer"
    slices: tuple[Use, ...] = ()
    dequantizations: tuple[dict[str, Any] | None, ...] = field(default=(), hash=False)

    @property
    def consumers(self) -> tuple[Use, ...]:
        """Every use: gathers, slices, then tied uses, then the rest, each in graph order."""
        return self.gathers + self.slices + self.tied + self.other

    @property
    def key(self) -> TableKey:
        """The table's identity in its model, ``(graph path, initializer)``: a name alone is not one, as
        each branch of an ``If`` (any subgraph) may define its own ``W``."""
        return (self.graph, self.initializer)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (lists, strings, ints, None)."""
        roles = [("gather", self.gathers), ("slice", self.slices), ("tied", self.tied), ("other", self.other)]
        return {
            "initializer": self.initializer, "shape": list(self.shape), "dtype": self.dtype, "graph": self.graph,
            "source": self.source,
            "consumers": [use.to_json(role) for role, uses in roles for use in uses],
            "external": self.external.to_json() if self.external else None,
            "quantization": dict(self.quantization) if self.quantization else None,
        }


@dataclass(frozen=True)
class NotATable:
    """A constant read as Gather data that is not a row lookup table, and why."""

    initializer: str
    shape: tuple[int, ...]
    dtype: str
    graph: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "shape": list(self.shape), "dtype": self.dtype,
                "graph": self.graph, "reason": self.reason}


@dataclass(frozen=True)
class ScanResult:
    """The tables of a model, and the Gather data that was looked at and rejected."""

    tables: tuple[TableRef, ...]
    not_tables: tuple[NotATable, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"tables": [t.to_json() for t in self.tables], "not_tables": [n.to_json() for n in self.not_tables]}


# ----------------------------------------------------------------------------- public API


def scan(model: onnx.ModelProto | str | os.PathLike[str]) -> list[TableRef]:
    """The embedding tables of ``model`` (a proto or a path), ordered by their first Gather (or Slice)."""
    return list(scan_model(model).tables)


def scan_model(model: onnx.ModelProto | str | os.PathLike[str]) -> ScanResult:
    """Like :func:`scan`, also returning constants gathered as data that are not tables (rank != 2, axis != 0)."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    _check_no_function_calls(proto)
    index = _Index()
    index.add_graph("", proto.graph, ())
    tables: list[tuple[int, TableRef]] = []
    rejected: list[NotATable] = []
    for const in index.consts.values():
        found = _trace(index, const)
        ref = _table_ref(const, found)
        if ref is not None:
            tables.append((min(f.consumer.seq for f in found if f.role in ("gather", "slice")), ref))
        else:
            rejected.extend(_not_table(const, found))
    tables.sort(key=lambda item: item[0])
    params = {key for _, ref in tables for key in _quantization_params(ref)}
    kept = tuple(ref for _, ref in tables if ref.key not in params)
    return ScanResult(tables=kept, not_tables=tuple(rejected))


def _check_no_function_calls(model: onnx.ModelProto) -> None:
    """UnsupportedError when a node calls a model-local function: the tables it reads would be missed."""
    calls = local_function_calls(model)
    if calls:
        raise UnsupportedError(
            f"the model calls model-local function(s) {', '.join(calls)}, whose nodes the scan does not search; "
            "inline them first (bridge.onnx_io.inline_functions; load_model does this)"
        )


def _quantization_params(ref: TableRef) -> list[TableKey]:
    """``(graph path, name)`` of the scale / zero point constants of ``ref``'s dequantizations: parameters, not
    tables of their own (Keras int4 gathers its ``[rows, groups]`` scale and zero point with the table's ids)."""
    infos = [q for q in (ref.quantization, *ref.dequantizations) if q]
    infos += [also for q in infos for also in q.get("also", ())]
    return [(str(quant.get(f"{role}_graph", ref.graph)), name) for quant in infos for role in ("scale", "zero_point")
            if isinstance(name := quant.get(role), str)]


def table_tensor(model: onnx.ModelProto, ref: TableRef) -> onnx.TensorProto:
    """The TensorProto behind ``ref`` (the initializer, or the Constant node's value) in ``model``."""
    for path, graph in iter_graphs(model):
        if path != ref.graph:
            continue
        for tensor in graph.initializer:
            if tensor.name == ref.initializer:
                return tensor
        for node in graph.node:
            value = _constant_value(node)
            if value is not None and node.output[0] == ref.initializer:
                return value
    raise InputError(f"table {ref.initializer!r} (graph {ref.graph!r}) is not in this model; scan this model again")


_NOISE = frozenset({
    "GatherV2", "Gather", "ReadVariableOp", "Read", "read", "embedding_lookup", "StatefulPartitionedCall",
    "PartitionedCall", "Identity", "Cast", "resource", "embeddings",
})
_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})


def stored_ref(initializer: str | None, metadata: Mapping[str, Any] | None,
               refs: Sequence[TableRef]) -> TableRef | None:
    """The table of ``refs`` a stored table came from: by graph and initializer where its ``metadata``
    records the graph (``metadata["onnx"]["graph"]``, as extract writes it), else by initializer where
    only one table of ``refs`` has that name; None when neither finds one."""
    onnx_meta = (metadata or {}).get("onnx")
    graph = onnx_meta.get("graph") if isinstance(onnx_meta, Mapping) else None
    named = [ref for ref in refs if ref.initializer == (initializer or "")]
    if isinstance(graph, str):
        return next((ref for ref in named if ref.graph == graph), None)
    return named[0] if len(named) == 1 else None


def default_table_name(initializer: str, taken: set[str]) -> str:
    """A short, filesystem-safe name for a table, unique (case-insensitively) among ``taken``.

    TensorFlow-style paths keep their layer component without scope suffixes:
    ``"model_1/tok_emb_1/GatherV2/ReadVariableOp:0"`` -> ``"tok_emb"``. Other names keep
    ``[A-Za-z0-9._-]`` and replace the rest by ``_``: ``"emb.weight"`` -> ``"emb.weight"``.
    A clash gets ``_2``, ``_3``, ... ``taken`` is not modified.
    """
    return unique_name_nocase(_sanitize(_layer_part(initializer)) or "table", taken)


# ----------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class _Const:
    key: _Key
    tensor: TensorProto
    source: str


class _Consumer(NamedTuple):
    seq: int  # position of the node in a depth-first walk of all graphs: the model's graph order
    graph: str
    position: int  # index of the node in its own graph
    node: onnx.NodeProto
    op_type: str
    input_index: int

    @property
    def label(self) -> str:
        return node_label(self.node, self.position)


class _Index:
    """Constants, uses and producers of every value, built in one pass over all nodes.

    Per node it stores atoms only (strings and ints in flat lists): keeping a Python object per
    node or per edge makes the garbage collector's cost grow with the model (measured: +50% on
    100k nodes). Node protos are fetched again by (graph, position) when a pattern needs one.
    """

    def __init__(self) -> None:
        self.consts: dict[_Key, _Const] = {}
        self.graphs: dict[str, onnx.GraphProto] = {}
        self.scopes: dict[str, _Scope] = {}
        self.uses: dict[str, dict[str, list[int]]] = defaultdict(dict)  # graph -> name -> [seq, input, ...]
        self.made_by: dict[str, dict[str, int]] = defaultdict(dict)  # graph -> name -> seq of its producer
        self.node_graph: list[str] = []
        self.node_position: list[int] = []
        self.node_op: list[str] = []

    def add_graph(self, path: str, graph: onnx.GraphProto, outer: _Scope) -> None:
        """Index ``graph`` and its subgraphs. The main graph (no ``outer``) owns every name not defined
        in a subgraph, so only subgraphs collect their local names first."""
        local = None if not outer else frozenset(itertools.chain(
            (t.name for t in graph.initializer), (v.name for v in graph.input),
            (out for node in graph.node for out in node.output if out),
        ))
        scope = (*outer, (path, local))
        if path in self.graphs:
            raise ModelFormatError(f"two subgraphs get the path {path!r} (node names with '/' spell another node's "
                                   "subgraph path); rename one of the nodes holding them")
        self.graphs[path], self.scopes[path] = graph, scope
        for tensor in graph.initializer:
            self.consts.setdefault((path, tensor.name), _Const((path, tensor.name), tensor, "initializer"))
        for position, node in enumerate(graph.node):
            self._add_node(path, position, node, scope)

    def _add_node(self, path: str, position: int, node: onnx.NodeProto, scope: _Scope) -> None:
        seq, op_type = len(self.node_op), node.op_type
        self.node_graph.append(path)
        self.node_position.append(position)
        self.node_op.append(op_type)
        if op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                self.consts[(path, node.output[0])] = _Const((path, node.output[0]), value, "constant")
        for input_index, name in enumerate(node.input):
            if name:
                uses = self.uses[self.resolve(scope, name)[0]]
                found = uses.get(name)
                if found is None:
                    uses[name] = [seq, input_index]
                else:
                    found += (seq, input_index)
        made_by = self.made_by[path]
        for out in node.output:
            made_by[out] = seq
        if node.attribute:
            for sub_path, sub in subgraphs(path, position, node):
                self.add_graph(sub_path, sub, scope)

    @staticmethod
    def resolve(scope: _Scope, name: str) -> _Key:
        """The innermost graph of ``scope`` defining ``name`` (the main graph if no subgraph does)."""
        for path, names in reversed(scope):
            if names is None or name in names:
                return (path, name)
        return (scope[0][0], name)

    def node(self, seq: int) -> onnx.NodeProto:
        return self.graphs[self.node_graph[seq]].node[self.node_position[seq]]

    def consumer(self, seq: int, input_index: int) -> _Consumer:
        return _Consumer(seq, self.node_graph[seq], self.node_position[seq], self.node(seq), self.node_op[seq],
                         input_index)

    def use_pairs(self, key: _Key) -> list[int]:
        """``[seq, input_index, seq, input_index, ...]`` of the nodes reading the value ``key``."""
        return self.uses.get(key[0], {}).get(key[1], [])

    def producer(self, key: _Key) -> int | None:
        return self.made_by.get(key[0], {}).get(key[1])

    def constant_key(self, scope: _Scope, name: str, *, same_type: bool = False) -> _Key | None:
        """The constant that ``name`` is, directly or through Identity/Cast nodes; None otherwise.

        With ``same_type``, only through Casts to the constant's own type: a dequantization parameter is
        read as stored, so a Cast that changes it (``Cast(S_f16, to=FLOAT)``) makes it no constant.
        """
        casts: set[int] = set()
        for _ in range(_MAX_CHAIN):
            if not name:
                return None
            key = self.resolve(scope, name)
            if key in self.consts:
                return key if not same_type or casts <= {self.consts[key].tensor.data_type} else None
            seq = self.producer(key)
            if seq is None or self.node_op[seq] not in PASS_THROUGH:
                return None
            node = self.node(seq)
            if self.node_op[seq] == "Cast":
                casts.add(attr_int(node, "to", 0))
            name, scope = (node.input[0] if node.input else ""), self.scopes[self.node_graph[seq]]
        return None


@dataclass(frozen=True)
class _View:
    """:class:`bridge.scan_patterns.GraphView` over the index, in the scope of one graph."""

    index: _Index
    scope: _Scope

    def key(self, name: str) -> _Key:
        return self.index.resolve(self.scope, name)

    def constant(self, name: str) -> _Key | None:
        return self.index.constant_key(self.scope, name, same_type=True)

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        key = self.index.constant_key(self.scope, name)
        return tuple(int(d) for d in self.index.consts[key].tensor.dims) if key else None

    def constant_value(self, name: str) -> np.ndarray | None:
        key = self.index.constant_key(self.scope, name)
        tensor = self.index.consts[key].tensor if key else None
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
            return None
        size = 1
        for d in tensor.dims:
            size *= int(d)
        if size > _SMALL:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError):
            return None

    def producer(self, name: str) -> tuple[onnx.NodeProto, _View] | None:
        seq = self.index.producer(self.index.resolve(self.scope, name)) if name else None
        return None if seq is None else (self.index.node(seq), self._at(seq))

    def consumers(self, name: str) -> list[tuple[onnx.NodeProto, int, _View]]:
        pairs = self.index.use_pairs(self.index.resolve(self.scope, name)) if name else []
        return [(self.index.node(seq), input_index, self._at(seq))
                for seq, input_index in zip(pairs[::2], pairs[1::2], strict=True)]

    def _at(self, seq: int) -> _View:
        """The view of the graph holding node ``seq``."""
        return _View(self.index, self.index.scopes[self.index.node_graph[seq]])


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


# ----------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class _Found:
    consumer: _Consumer
    via: tuple[str, ...]
    role: str
    quantization: dict[str, Any] | None
    miss: str | None = None  # why a Gather on this value is not a row lookup


def _step(index: _Index, consumer: _Consumer, via: tuple[str, ...], const: _Const) -> Step:
    return Step(consumer.node, consumer.label, consumer.input_index, via, len(const.tensor.dims),
                _View(index, index.scopes[consumer.graph]), table_graph=const.key[0],
                table_type=int(const.tensor.data_type))


def _trace(index: _Index, const: _Const) -> list[_Found]:
    """Follow ``const`` through link nodes; return the gather/slice/tied/other uses ending each chain, in
    graph order, or [] when no chain ends in a Gather or Slice (then nothing else is worth building)."""
    ends: dict[tuple[int, int, tuple[str, ...]], dict[str, Any] | None] = {}
    stack: list[tuple[_Key, tuple[str, ...], dict[str, Any] | None]] = [(const.key, (), None)]
    visited = {const.key}
    while stack:
        key, via, quant = stack.pop()
        pairs = index.use_pairs(key)
        for seq, input_index in zip(pairs[::2], pairs[1::2], strict=True):
            followed = _follow(index, seq, input_index, via, const)
            if followed is None:
                ends.setdefault((seq, input_index, via), quant)
            elif followed[0] not in visited:
                out_key, link = followed
                visited.add(out_key)
                stack.append((out_key, (*via, link.op), quant or link.quantization))
    if not any(index.node_op[seq] in _READERS for seq, _, _ in ends):
        return []
    return [_classify(index, index.consumer(seq, i), via, const, ends[seq, i, via]) for seq, i, via in sorted(ends)]


def _follow(index: _Index, seq: int, input_index: int, via: tuple[str, ...], const: _Const
            ) -> tuple[_Key, Link] | None:
    """The output the node ``seq`` passes the table on to, and how; None if the chain ends there."""
    if index.node_op[seq] not in LINK_PATTERNS:
        return None
    consumer = index.consumer(seq, input_index)
    link = match_link(_step(index, consumer, via, const))
    out = consumer.node.output[0] if consumer.node.output else ""
    return ((consumer.graph, out), link) if link is not None and out else None


def _classify(index: _Index, consumer: _Consumer, via: tuple[str, ...], const: _Const,
              quant: dict[str, Any] | None) -> _Found:
    if consumer.op_type not in ROLE_PATTERNS:
        return _Found(consumer, via, "other", quant)
    step = _step(index, consumer, via, const)
    role = match_role(step)
    if role == "slice":
        return _Found(consumer, via, role, quant)
    if role != "gather":
        return _Found(consumer, via, role, quant, gather_miss_reason(step))
    return _Found(consumer, via, role, quant or match_after_gather(step))


def _dtype_name(tensor: TensorProto) -> str:
    """The numpy name of the element type; the ONNX name (``"int4"``, ``"string"``) where numpy has none."""
    try:
        return tensor_dtype(tensor).name
    except UnsupportedError:
        known = tensor.data_type in TensorProto.DataType.values()
        return TensorProto.DataType.Name(tensor.data_type).lower() if known else f"onnx_type_{tensor.data_type}"


def _use(found: _Found) -> Use:
    c = found.consumer
    return Use(node=c.label, op_type=c.op_type, graph=c.graph, input_index=c.input_index, via=found.via)


def _table_ref(const: _Const, found: list[_Found]) -> TableRef | None:
    by_role: dict[str, list[_Found]] = {"gather": [], "slice": [], "tied": [], "other": []}
    for f in found:
        by_role[f.role].append(f)
    if not by_role["gather"] and not by_role["slice"]:
        return None
    quant = next((f.quantization for f in by_role["gather"] if f.quantization), None)
    return TableRef(
        initializer=const.key[1], shape=tuple(int(d) for d in const.tensor.dims), dtype=_dtype_name(const.tensor),
        graph=const.key[0], gathers=tuple(_use(f) for f in by_role["gather"]),
        tied=tuple(_use(f) for f in by_role["tied"]), other=tuple(_use(f) for f in by_role["other"]),
        external=external_data_info(const.tensor), quantization=quant, source=const.source,
        slices=tuple(_use(f) for f in by_role["slice"]),
        dequantizations=tuple(f.quantization for f in by_role["gather"] + by_role["slice"]) if quant else (),
    )


def _not_table(const: _Const, found: list[_Found]) -> list[NotATable]:
    reasons = [f.miss for f in found if f.miss]
    if not reasons:
        return []
    return [NotATable(initializer=const.key[1], shape=tuple(int(d) for d in const.tensor.dims),
                      dtype=_dtype_name(const.tensor), graph=const.key[0], reason="; ".join(reasons))]


# ----------------------------------------------------------------------------- naming


def _layer_part(initializer: str) -> str:
    parts = [re.sub(r"(__\d+)?(:\d+)?$", "", p) for p in initializer.split("/")]
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else initializer
    keep = [p for p in parts if re.sub(r"_\d+$", "", p) not in _NOISE and not p.isdigit()]
    layer = keep[-1] if keep else parts[0]
    return re.sub(r"(?<=.)_\d+$", "", layer)


def _sanitize(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    name = re.sub(r"_{2,}", "_", name).lstrip("._-").rstrip(".")[:80]
    if name.split(".")[0].lower() in _RESERVED:
        name = f"{name}_"
    return name
