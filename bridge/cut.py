"""Cut embedding lookups out of an ONNX model: the gathered vectors become a model input.

``Gather(table, f(ids))`` in the main graph is replaced by ``Identity(<table>__vectors)``, a new
graph input; the bridge computes the vectors once (``bridge.backends.lookup`` over the shared
store) and feeds them to every model that uses the table. Only gathers whose index computation
``f`` an index policy reproduces are cut: ``f`` must be elementwise on a single
graph input (Identity, Cast, comparisons, arithmetic with scalar constants, Where, ...), on
every id in ``[-rows, rows)`` the row it finally selects (after Gather's own negative wrap) must be
the ``wrap`` policy's row, and on ids outside that range (which a cut lookup refuses) it must select
no row (so ``Gather(W, Mod(ids, rows))``, the hashing trick, is not cut). This is checked by running
``f`` in onnxruntime on every id in the range and on probes outside it (:func:`_outside_ids`; ids in
``[-2 * rows, -rows)`` are not required to fail, as the Keras wrap serves them). The Keras
negative-index wrap and a plain ``Gather(W, ids)`` both pass; anything else is left in the
model (the table is then read from the store as external data) and the reason recorded. A table or
scalar constant that is also a graph input (IR >= 4) can be overridden by the caller, so its
lookups are not cut (:func:`overridable_initializers`).

Every cut model carries its cuts as JSON in its ``metadata_props`` (key :data:`CUT_KEY`), so
:class:`CutModel` can feed it from the original model's inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from bridge import dtypes
from bridge.errors import BackendError, InputError, UnsupportedError
from bridge.external import onnx_elem_type
from bridge.names import unique_name
from bridge.onnx_io import iter_graphs, node_label, tensor_dtype

CUT_KEY = "embedding_bridge.cut"
_ELEMENTWISE = frozenset({
    "Identity", "Cast", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Sign", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor", "Where", "Max", "Min", "Clip",
})
_PROBE_CHUNK = 1 << 20


@dataclass(frozen=True)
class CutSpec:
    """One cut lookup: feed ``lookup(store[table], policy)(feeds[ids_input])`` as graph input ``input``."""

    input: str
    table: str
    ids_input: str
    policy: str
    gather: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CutSpec:
        return cls(**{k: str(obj[k]) for k in ("input", "table", "ids_input", "policy", "gather")})


@dataclass(frozen=True)
class TableCut:
    """What to cut for one table of a model: its store name, its gathers (main-graph node labels), shape, dtype."""

    table: str
    gathers: tuple[str, ...]
    shape: tuple[int, int]
    dtype: np.dtype[Any]


# ------------------------------------------------------------------------------ graph surgery


def cut_gathers(model: onnx.ModelProto, cuts: Sequence[TableCut]) -> tuple[list[CutSpec], list[str]]:
    """Cut the listed gathers of ``model``'s main graph in place; return ``(specs, reasons_kept)``.

    A gather that cannot be cut exactly stays in the model; ``reasons_kept`` says why. Nodes,
    initializers and inputs that only fed the cut gathers are removed; the cuts are recorded in
    ``model.metadata_props[CUT_KEY]``.
    """
    graph = model.graph
    labels = {node_label(n, i): i for i, n in enumerate(graph.node)}
    taken = _all_names(model)
    node_names = {n.name for _, g in iter_graphs(model) for n in g.node}
    specs, kept, candidates = [], [], set()
    for cut in cuts:
        for label in cut.gathers:
            if label not in labels:
                kept.append(f"table {cut.table!r}, {label}: not a node of the main graph")
                continue
            node = graph.node[labels[label]]
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                kept.append(f"table {cut.table!r}, {label}: the node is a {node.op_type}, not a Gather(table, ids)")
                continue
            try:
                ids_input, chain = index_source(model, node.input[1], cut.shape[0])
            except UnsupportedError as exc:
                kept.append(f"table {cut.table!r}, {label}: {exc}")
                continue
            name = unique_name(f"{cut.table}__vectors", taken)
            candidates.update(chain | {node.input[0], node.input[1]})
            _replace_with_input(model, node, name, ids_input, cut, unique_name(f"{name}_in", node_names))
            specs.append(CutSpec(input=name, table=cut.table, ids_input=ids_input, policy="wrap", gather=label))
    if specs:
        _prune(model, candidates)
        _record(model, specs)
    return specs, kept


def _replace_with_input(model: onnx.ModelProto, node: onnx.NodeProto, name: str, ids_input: str, cut: TableCut,
                        node_name: str) -> None:
    graph = model.graph
    ids_info = next(v for v in graph.input if v.name == ids_input)
    value = helper.make_tensor_value_info(name, onnx_elem_type(cut.dtype), None)
    if ids_info.type.tensor_type.HasField("shape"):  # elementwise index math keeps the ids' shape
        shape = value.type.tensor_type.shape
        shape.CopyFrom(ids_info.type.tensor_type.shape)
        shape.dim.add().dim_value = cut.shape[1]
    graph.input.append(value)
    out = node.output[0]
    node.Clear()
    node.op_type, node.name = "Identity", node_name
    node.input.append(name)
    node.output.append(out)


def _all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for _, g in iter_graphs(model):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    return names


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for _, g in iter_graphs(model):
        for node in g.node:
            used.update(node.input)
        if g is not model.graph:
            used.update(o.name for o in g.output)
    return used


def _prune(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove main-graph nodes, initializers and inputs among ``candidates`` (or producing them) now unused."""
    graph = model.graph
    while True:
        used = _used_names(model)
        dead = [i for i, n in enumerate(graph.node)
                if n.output and all(o in candidates and o not in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            candidates.update(graph.node[i].input)
            del graph.node[i]
    used = _used_names(model)
    for field in (graph.initializer, graph.input):
        for i in reversed(range(len(field))):
            if field[i].name in candidates and field[i].name not in used:
                del field[i]
    produced = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name not in produced:
            del graph.value_info[i]


def _record(model: onnx.ModelProto, specs: Sequence[CutSpec]) -> None:
    existing = [p for p in model.metadata_props if p.key == CUT_KEY]
    for p in existing:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=CUT_KEY, value=json.dumps([s.to_json() for s in specs]))


def cut_specs(metadata: Mapping[str, str]) -> list[CutSpec]:
    """The cuts recorded in a model's metadata (``session.get_modelmeta().custom_metadata_map``)."""
    raw = metadata.get(CUT_KEY)
    if not raw:
        return []
    try:
        return [CutSpec.from_json(obj) for obj in json.loads(raw)]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"the model's {CUT_KEY!r} metadata is malformed ({exc}); "
                         "re-run `embridge share --cut`") from exc


# ------------------------------------------------------------------------------ index analysis


def index_source(model: onnx.ModelProto, indices: str, rows: int) -> tuple[str, set[str]]:
    """The graph input that ``indices`` is computed from, and the values of that computation.

    Raises :class:`UnsupportedError` unless ``indices`` is an elementwise function of exactly one
    main-graph input (plus scalar constants no caller can override) whose rows on ``[-rows, rows)``
    equal the ``wrap`` policy's and which selects no row for the probed ids outside that range.
    """
    graph = model.graph
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    consts = {t.name: t for t in graph.initializer}
    overridable = overridable_initializers(model)
    chain: set[str] = set()
    nodes: set[int] = set()
    sources: set[str] = set()
    stack = [indices]
    while stack:
        name = stack.pop()
        if name in chain or not name:
            continue
        chain.add(name)
        if name in inputs:
            sources.add(name)
        elif name in consts:
            _check_scalar(consts[name], name)
            if name in overridable:
                raise UnsupportedError(f"the ids are combined with {name!r}, an initializer that is also a graph "
                                       "input: a caller may override it, and a cut would not see that")
        elif name in producers:
            node = graph.node[producers[name]]
            _check_elementwise(node)
            nodes.add(producers[name])
            stack.extend(node.input)
        else:
            raise UnsupportedError(f"the ids {indices!r} come from an outer scope or unknown value {name!r}")
    if len(sources) != 1:
        raise UnsupportedError(f"the ids are computed from {len(sources)} graph inputs ({sorted(sources)}), not one")
    source = sources.pop()
    if nodes:
        _probe(model, source, indices, [graph.node[i] for i in sorted(nodes)], consts, rows)
    return source, chain


def overridable_initializers(model: onnx.ModelProto) -> set[str]:
    """Main-graph initializers a caller may override by feeding them: those also listed as graph inputs.

    onnxruntime honours such a feed from IR version 4 on (before, every initializer is listed as an
    input and none can be fed).
    """
    if model.ir_version < 4:
        return set()
    inputs = {v.name for v in model.graph.input}
    return {t.name for t in model.graph.initializer if t.name in inputs}


def _check_elementwise(node: onnx.NodeProto) -> None:
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedError(f"the ids pass through {node.domain}:{node.op_type}")
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is None:
            raise UnsupportedError("the ids use a Constant without a tensor value")
        _check_scalar(value, node.output[0])
    elif node.op_type not in _ELEMENTWISE:
        raise UnsupportedError(f"the ids pass through {node.op_type}, which is not an elementwise op")


def _check_scalar(tensor: TensorProto, name: str) -> None:
    if int(np.prod(tensor.dims)) != 1:
        raise UnsupportedError(f"the ids are combined with the non-scalar constant {name!r}")


def _probe(model: onnx.ModelProto, source: str, indices: str, nodes: Sequence[onnx.NodeProto],
           consts: Mapping[str, TensorProto], rows: int) -> None:
    """Run the index computation on ids in and out of ``[-rows, rows)``; the cut must serve what the original does.

    Every id in ``[-rows, rows)`` must select the ``wrap`` policy's row. A cut lookup refuses any
    other id (:class:`~bridge.errors.IdError`), so no probed id outside must select a row either
    (``Mod``, ``Clip``, ``Min``, a narrowing ``Cast`` ... fold large ids into the table).
    """
    session, in_dtype = _probe_session(model, source, indices, nodes, consts)
    if in_dtype.kind not in "iu" or np.iinfo(in_dtype).max < rows - 1:
        raise UnsupportedError(f"the ids input {source!r} has dtype {in_dtype}, which cannot hold every row id")
    for start in range(max(-rows, int(np.iinfo(in_dtype).min)), rows, _PROBE_CHUNK):
        ids = np.arange(start, min(start + _PROBE_CHUNK, rows), dtype=np.int64)
        row = _selected_rows(session, source, in_dtype, ids, rows)
        want = np.where(ids < 0, ids + rows, ids)
        if not np.array_equal(row, want):
            bad = int(ids[np.argmax(row != want)])
            raise UnsupportedError(f"the index computation maps id {bad} to row {int(row[ids == bad][0])}, "
                                   "not the 'wrap' policy's row")
    _probe_outside(session, source, in_dtype, rows)


def _probe_session(model: onnx.ModelProto, source: str, indices: str, nodes: Sequence[onnx.NodeProto],
                   consts: Mapping[str, TensorProto]) -> tuple[Any, np.dtype[Any]]:
    """An onnxruntime session computing ``indices`` from ``source`` alone, and the dtype of ``source``."""
    import onnxruntime as ort

    elem = next(v for v in model.graph.input if v.name == source).type.tensor_type.elem_type
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(list(nodes), "ids", [helper.make_tensor_value_info(source, elem, ["n"])], [],
                              initializer=[consts[c] for c in used if c in consts])
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(probe)
    out_elem = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == indices), 0)
    if out_elem not in (TensorProto.INT32, TensorProto.INT64):
        raise UnsupportedError(f"cannot infer an integer type for the ids {indices!r}")
    probe.graph.output.append(helper.make_tensor_value_info(indices, out_elem, ["n"]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session, tensor_dtype(elem)


def _selected_rows(session: Any, source: str, in_dtype: np.dtype[Any], ids: np.ndarray, rows: int) -> np.ndarray:
    """The row Gather selects for each of ``ids`` (after its own negative wrap); out of ``[0, rows)``: none."""
    got = session.run(None, {source: ids.astype(in_dtype)})[0].astype(np.int64)
    return np.where(got < 0, got + rows, got)


def _probe_outside(session: Any, source: str, in_dtype: np.dtype[Any], rows: int) -> None:
    """No probed id outside ``[-rows, rows)`` may select a row: the cut refuses those ids (IdError)."""
    ids = _outside_ids(in_dtype, rows)
    row = _selected_rows(session, source, in_dtype, ids, rows)
    served = (row >= 0) & (row < rows)
    if served.any():
        bad = int(np.argmax(served))
        raise UnsupportedError(f"the index computation maps id {int(ids[bad])} (outside [-{rows}, {rows})) to row "
                               f"{int(row[bad])}: the original model serves that id, a cut lookup would refuse it")


def _outside_ids(dtype: np.dtype[Any], rows: int) -> np.ndarray:
    """Ids of ``dtype`` outside ``[-rows, rows)`` to probe: just past the table, powers of two, extremes, random.

    Ids in ``[-2 * rows, -rows)`` are left out: the Keras negative-id wrap (``ids + rows`` where
    ``ids < 0``) sends them through Gather's own wrap a second time, while the cut refuses them.
    The type's minimum is left out too (integer ``Div(min, -1)`` traps in onnxruntime).
    """
    info = np.iinfo(dtype)
    low, high = max(int(info.min) + 1, -(2**63) + 1), min(int(info.max), 2**63 - 1)
    near = [rows * k + d for k in (1, 2, 3) for d in (-1, 0, 1)]
    powers = [2**k + d for k in range(1, 63) for d in (-1, 0, 1)] + [2**63 - 1]
    rng = np.random.default_rng(0)
    spread = [int(x) for x in rng.integers(rows, high, size=256, endpoint=True)] if rows <= high else []
    if low < -2 * rows:
        spread += [int(x) for x in rng.integers(low, -2 * rows, size=256)]
    positive = [p for p in near + powers if p >= rows]
    found = {i for i in positive + [-p for p in positive] + spread + [low, high]
             if low <= i <= high and (i >= rows or i < -2 * rows)}
    return np.array(sorted(found, key=abs), dtype=np.int64)  # the first failing id reported is the plainest


# ------------------------------------------------------------------------------ feeding


class CutModel:
    """A cut model's session with the lookups that feed it: call :meth:`run` with the ORIGINAL inputs.

    ``store`` is a :class:`bridge.store.Store` (or any mapping from table name to
    :class:`~bridge.table.EmbeddingTable`); ``lookups`` may be shared between models, keyed by
    ``(table, policy)``, so one process holds one lookup per table.
    """

    def __init__(self, session: Any, store: Mapping[str, Any], *, backend: str = "numpy",
                 lookups: dict[tuple[str, str], Any] | None = None) -> None:
        self.session = session
        self.specs = cut_specs(session.get_modelmeta().custom_metadata_map)
        overridable = session.get_overridable_initializers()  # fed like inputs, but not among get_inputs()
        self._inputs = {i.name for i in (*session.get_inputs(), *overridable)}
        self._lookups = lookups if lookups is not None else {}
        for spec in self.specs:
            key = (spec.table, spec.policy)
            if key not in self._lookups:
                self._lookups[key] = make_lookup(store[spec.table], backend, spec.policy)

    def feeds(self, feeds: Mapping[str, Any], vectors: dict[tuple[str, str, str], np.ndarray] | None = None
              ) -> dict[str, Any]:
        """The cut model's feeds from the original model's ``feeds``; ``vectors`` caches lookups across models.

        Feeds the cut model does not take (ids consumed only by cut lookups) are left out; an
        overridable initializer the session still has is fed.
        """
        cache = vectors if vectors is not None else {}
        out = {k: v for k, v in feeds.items() if k in self._inputs}
        for spec in self.specs:
            if spec.ids_input not in feeds:
                raise InputError(f"the cut model needs the ids input {spec.ids_input!r} (for table {spec.table!r})")
            key = (spec.table, spec.policy, spec.ids_input)
            if key not in cache:
                cache[key] = self._lookups[(spec.table, spec.policy)](feeds[spec.ids_input])
            out[spec.input] = ort_input(cache[key])
        return out

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[Any]:
        """``session.run`` on the original model's inputs."""
        return self.session.run(output_names, self.feeds(feeds))


def ort_input(array: np.ndarray) -> Any:
    """``array`` as onnxruntime takes it: itself, or an ``OrtValue`` for bfloat16/float8 (no numpy type in ORT)."""
    storage = dtypes.storage_dtype(array.dtype)
    if storage == array.dtype:
        return array
    import onnxruntime as ort

    contiguous = np.ascontiguousarray(array)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(contiguous.view(storage), onnx_elem_type(array.dtype))


def make_lookup(table: Any, backend: str, policy: str) -> Any:
    """``bridge.backends.lookup(table, backend, policy)``, with a clear error if backends are missing."""
    try:
        from bridge.backends import lookup
    except ImportError as exc:  # pragma: no cover - the package ships bridge.backends
        raise BackendError(f"bridge.backends is not available ({exc}); reinstall embedding-bridge") from exc
    return lookup(table, backend, policy)


def feed_cut_model(session: Any, store: Mapping[str, Any], feeds: Mapping[str, Any], *,
                   backend: str = "numpy", output_names: Iterable[str] | None = None) -> list[Any]:
    """Run a cut model on the original model's ``feeds``: look the ids up in ``store``, feed the vectors."""
    return CutModel(session, store, backend=backend).run(list(output_names) if output_names else None, feeds)
