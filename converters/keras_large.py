"""Keras models whose embedding tables are too large for tf2onnx: convert a skeleton, keep the tables outside.

tf2onnx needs about 10x a model's weights in RAM and cannot write a model past protobuf's 2 GiB
limit. The large path never shows it the big tables:

1. **plan**: every float ``Embedding`` layer with more rows than the skeleton size is "shrunk";
   layers whose tables are equal (twins) share one entry;
2. **skeleton**: ``keras.models.clone_model`` rebuilds the Functional/Sequential graph, reusing
   every other layer as is (no weight is copied) and replacing each shrunk Embedding by one with
   ``input_dim = k`` (k = 17, 18, ...: one distinct value per table, so tf2onnx cannot merge the
   index arithmetic of two tables) whose table is a seeded random *pattern*;
3. tf2onnx converts the skeleton (small and fast);
4. each pattern is found in the ONNX graph **by value**; tf2onnx bakes the row count into the
   negative-id wrap in front of the Gather (``id < 0 ? id + k : id``): on the Gather's index path,
   the input holding ``k`` is re-pointed at a new constant holding the real row count;
5. the store is written, each table streamed straight from its Keras variable (a zero-copy view),
   and each pattern initializer becomes ONNX external data reading the store's
   ``tables/<name>.npy`` at ``data_offset`` for ``nbytes``: the table is on disk once, and
   onnxruntime memory-maps it.

Peak memory is the Keras model plus tf2onnx on the skeleton plus 64 MiB write chunks. Only what a
row lookup does with a table survives the swap, so a shrunk table used any other way (a tied
output projection, rows constant-folded by a lookup with constant ids) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bridge import manifest as mf
from bridge.atomic import atomic_directory
from bridge.errors import ConversionError, UnsupportedError
from bridge.external import check_external_locations, iter_tensors, point_initializer_at_file, save_model
from bridge.extract import read_tables
from bridge.npyio import file_sha256
from bridge.onnx_io import initializer_array, iter_graphs, node_label
from bridge.render import human_bytes
from bridge.scan import TableRef
from bridge.store import Store, build_store_files, open_store
from bridge.table import EmbeddingTable
from converters.keras import (  # the ordinary path's table building, shared on purpose
    ONNX_FILE,
    ConversionResult,
    _provenance,
    _table,
    _table_name,
    _warn_missing,
    summary_row,
)
from converters.keras_env import import_keras
from converters.keras_layers import embedding_layers, keras_candidates
from converters.keras_load import LoadedModel
from converters.keras_map import digest, match_tables, same_bytes
from converters.keras_onnx import to_onnx
from converters.keras_signature import Signature
from converters.keras_vocab import embedding_vocabularies

#: ``large=None``: Embedding tables totalling at least this many bytes take the large path.
LARGE_THRESHOLD = 256 * 2**20
#: tf2onnx cannot write a model past protobuf's limit; weights past it always take the large path.
TF2ONNX_LIMIT = 2**31 - 1
#: Rows of the first shrunk table in the skeleton; the next ones get 18, 19, ...
SKELETON_ROWS = 17
_FLOATS = ("float16", "float32", "float64")
#: Ops of the negative-id wrap that may hold the row count, and ops walked through on the index path.
_WRAP_OPS = frozenset({"Add", "Sub", "Where", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal",
                       "Min", "Max", "Clip", "Mod"})
_WALK_OPS = _WRAP_OPS | {"Mul", "Cast", "Not", "And", "Or", "Identity", "Neg", "Abs", "Reshape", "Squeeze",
                         "Unsqueeze", "Expand"}
_MAX_WALK = 64

__all__ = ["LARGE_THRESHOLD", "SKELETON_ROWS", "ShrunkTable", "build_skeleton", "convert_large",
           "large_path_reason", "patch_row_count", "plan_tables"]


@dataclass
class ShrunkTable:
    """One table the skeleton replaces by a ``[skeleton_rows, dim]`` pattern; ``layers`` hold equal tables."""

    layers: list[Any]
    paths: list[str]
    rows: int
    dim: int
    dtype: np.dtype[Any]
    skeleton_rows: int
    pattern: np.ndarray = field(repr=False)
    #: The real table when it is not read from ``layers[0]`` (a ``.keras`` file streamed by
    #: :mod:`converters.keras_stream`: ``layers`` are then the skeleton's small layers).
    source: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * self.dtype.itemsize


# ----------------------------------------------------------------------------- choosing the path


def _itemsize(dtype: Any) -> int:
    name = str(getattr(dtype, "name", dtype))
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


def _weight_bytes(weights: Iterable[Any]) -> int:
    return sum(math.prod(int(d) for d in w.shape) * _itemsize(w.dtype) for w in _unique(weights))


def _is_graph_model(model: Any) -> bool:
    """True for a Functional or Sequential model: what ``keras.models.clone_model`` can rebuild."""
    _, keras = import_keras()
    from keras.src.models.functional import Functional  # noqa: PLC0415 - no public name for the class

    return isinstance(model, (keras.Sequential, Functional))


def large_path_reason(loaded: LoadedModel, large: bool | None, threshold: int | None = None) -> str | None:
    """Why :func:`convert_large` should convert ``loaded``, or None for the ordinary tf2onnx path.

    ``large=True`` forces the large path, ``False`` the ordinary one; ``None`` takes it when the
    Embedding tables total at least ``threshold`` bytes (default :data:`LARGE_THRESHOLD`) or the
    weights exceed tf2onnx's 2 GiB limit, and the model has a table to shrink. A model the large
    path cannot rebuild (SavedModel, subclassed) raises :class:`UnsupportedError` when forced or
    when its weights are past 2 GiB (tf2onnx would fail after using ~10x their size in RAM).
    """
    if large is False:
        return None
    model = loaded.model
    weights = _weight_bytes(getattr(model, "weights", [])) if loaded.kind != "saved_model" else 0
    if loaded.kind == "saved_model" or not _is_graph_model(model):
        if large or weights > TF2ONNX_LIMIT:
            raise _not_rebuildable(loaded, weights)
        return None
    tables = _weight_bytes(layer.embeddings for layer in _embeddings(model) if layer.built)
    limit = LARGE_THRESHOLD if threshold is None else int(threshold)
    if large:
        return "requested (large=True)"
    if not any(_shrinkable(layer, SKELETON_ROWS) for layer in _embeddings(model)):
        return None
    if tables >= limit:
        return f"embedding tables total {human_bytes(tables)}, at least the {human_bytes(limit)} threshold"
    if weights > TF2ONNX_LIMIT:
        return f"weights total {human_bytes(weights)}, past tf2onnx's 2 GiB limit"
    return None


def _not_rebuildable(loaded: LoadedModel, weights: int) -> UnsupportedError:
    what = "a SavedModel" if loaded.kind == "saved_model" else f"a subclassed model ({type(loaded.model).__name__})"
    size = f" with {human_bytes(weights)} of weights" if weights else ""
    return UnsupportedError(
        f"model {loaded.name!r} is {what}{size}: the large-table path rebuilds the model with small tables, "
        "which needs a Functional or Sequential keras.Model (tf2onnx alone fails past 2 GiB); "
        "build the model functionally, save it as .keras, and convert that"
    )


# ----------------------------------------------------------------------------- plan and skeleton


def _embeddings(model: Any) -> list[Any]:
    return _unique(embedding_layers(model).values())


def _shrinkable(layer: Any, skeleton_rows: int) -> bool:
    """A built float Embedding, not quantized, without LoRA, with more rows than the skeleton's."""
    if not layer.built or getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return False
    shape = tuple(layer.embeddings.shape)
    return str(layer.embeddings.dtype) in _FLOATS and len(shape) == 2 and shape[0] > skeleton_rows


def table_view(layer: Any) -> np.ndarray:
    """A read-only NumPy view of ``layer.embeddings``: the TensorFlow buffer itself, no copy.

    Except for a variable TensorFlow keeps in copy-on-read mode (after a sparse update: an
    optimizer step on an Embedding, a slice assignment, ``scatter_*``): every read of such a
    variable copies it, so this costs one table. A model loaded from a file, or only called, has none.
    """
    tf, _ = import_keras()
    return np.asarray(tf.convert_to_tensor(layer.embeddings.value))


def plan_tables(model: Any, skeleton_rows: int = SKELETON_ROWS) -> list[ShrunkTable]:
    """The tables to shrink: each shrinkable Embedding, layers with equal tables grouped together."""
    paths = {id(layer): path for path, layer in reversed(embedding_layers(model).items())}
    groups: list[list[Any]] = []
    for layer in _embeddings(model):
        if not _shrinkable(layer, skeleton_rows):
            continue
        twin = next((g for g in groups if _same_table(g[0], layer)), None)
        if twin is not None:
            twin.append(layer)
        else:
            groups.append([layer])
    plan = []
    for group in groups:
        rows, dim = (int(d) for d in group[0].embeddings.shape)
        k = skeleton_rows + len(plan)
        if rows <= k:
            continue
        dtype = np.dtype(str(group[0].embeddings.dtype))
        pattern = np.random.default_rng((0xE8B, k, dim)).standard_normal((k, dim)).astype(dtype)
        plan.append(ShrunkTable(group, [paths[id(layer)] for layer in group], rows, dim, dtype, k, pattern))
    return plan


def _same_table(a: Any, b: Any) -> bool:
    if tuple(a.embeddings.shape) != tuple(b.embeddings.shape) or str(a.embeddings.dtype) != str(b.embeddings.dtype):
        return False
    va, vb = table_view(a), table_view(b)
    return digest(va) == digest(vb) and same_bytes(va, vb)


def build_skeleton(model: Any, plan: list[ShrunkTable]) -> tuple[Any, list[ShrunkTable]]:
    """``model`` rebuilt with each planned table replaced by its pattern; returns it and the plan it honoured.

    Every other layer is the original object (shared, not copied). An Embedding that the clone
    does not reach (inside a custom layer) keeps its full table and leaves the plan.
    """
    _, keras = import_keras()
    by_layer = {id(layer): entry for entry in plan for layer in entry.layers}
    reached: dict[int, Any] = {}

    def clone(layer: Any) -> Any:
        entry = by_layer.get(id(layer))
        if entry is None:
            return layer
        small = type(layer).from_config({**layer.get_config(), "input_dim": entry.skeleton_rows})
        reached[id(layer)] = small
        return small

    try:
        skeleton = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, TypeError, NotImplementedError ...
        raise UnsupportedError(
            f"cannot rebuild model {model.name!r} with small tables ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); the large-table path "
            "needs a Functional or Sequential model whose layers can be re-created from their config"
        ) from exc
    honoured = []
    for entry in plan:
        layers = [layer for layer in entry.layers if id(layer) in reached]
        for layer in layers:
            small = reached[id(layer)]
            if not small.built:
                small.build((None, None))
            small.embeddings.assign(entry.pattern)
        if layers:
            keep = [i for i, layer in enumerate(entry.layers) if id(layer) in reached]
            honoured.append(replace(entry, layers=layers, paths=[entry.paths[i] for i in keep]))
    return skeleton, honoured


def _still_read(skeleton: Any, plan: list[ShrunkTable]) -> list[str]:
    """Warnings for shrunk tables that another layer of the skeleton still reads in full (e.g. a tied head)."""
    ids = {id(w) for w in skeleton.weights}
    return [f"the table of {entry.paths[0]!r} is also read by another layer outside the Functional graph; "
            "tf2onnx converts that use with the full table inline" for entry in plan
            if any(id(layer.embeddings) in ids for layer in entry.layers)]


def _check_skeleton_size(skeleton: Any, model_name: str) -> None:
    size = _weight_bytes(skeleton.weights)
    if size > TF2ONNX_LIMIT:
        big = sorted(_unique(skeleton.weights), key=lambda w: -_weight_bytes([w]))[:3]
        names = ", ".join(f"{w.path} ({human_bytes(_weight_bytes([w]))})" for w in big)
        raise UnsupportedError(
            f"model {model_name!r} still holds {human_bytes(size)} of weights with its Embedding tables shrunk "
            f"(largest: {names}); tf2onnx cannot convert past 2 GiB, and only plain float Embedding layers of a "
            "Functional or Sequential graph can be kept outside it"
        )


# ----------------------------------------------------------------------------- the ONNX side


def locate_tables(model: onnx.ModelProto, plan: list[ShrunkTable]) -> dict[int, tuple[TableRef, ShrunkTable]]:
    """``{position in read_tables order: (ref, entry)}`` for each pattern found in the skeleton's ONNX model.

    Refuses a pattern that tf2onnx used other than through Gathers, or whose rows appear in any
    other constant (e.g. a lookup with constant ids folded by tf2onnx).
    """
    found: dict[int, tuple[TableRef, ShrunkTable]] = {}
    refs = read_tables(model, None)
    for entry in plan:
        hits = [i for i, (_, data) in enumerate(refs) if same_bytes(np.asarray(data), entry.pattern)]
        if len(hits) > 1:
            raise ConversionError(f"tf2onnx wrote the table of {entry.paths[0]!r} {len(hits)} times; "
                                  "convert with large=False")
        if not hits:
            continue
        ref = refs[hits[0]][0]
        uses = [f"{u.op_type} {u.node!r}" for u in ref.tied + ref.other]
        if uses:
            raise UnsupportedError(
                f"the table of Embedding {entry.paths[0]!r} is used other than by a row lookup ({', '.join(uses)}); "
                "the large-table path replaces it by a small stand-in, which would change such uses; "
                "convert with large=False if it fits in memory"
            )
        _check_no_copies(model, ref, entry)
        found[hits[0]] = (ref, entry)
    return found


def _check_no_copies(model: onnx.ModelProto, ref: TableRef, entry: ShrunkTable) -> None:
    first = set(entry.pattern[:, 0].tolist())
    rows = {row.tobytes() for row in entry.pattern}
    for graph, tensor in iter_tensors(model):
        if (graph, tensor.name) == (ref.graph, ref.initializer) or tensor.data_type != _elem(entry.dtype):
            continue
        arr = np.asarray(initializer_array(tensor, None))
        for view in (arr, arr.T) if arr.ndim == 2 else (arr,):
            if view.ndim == 0 or view.shape[-1] != entry.dim:
                continue
            flat = np.ascontiguousarray(view).reshape(-1, entry.dim)
            hit = np.isin(flat[:, 0], list(first))
            if any(row.tobytes() in rows for row in flat[hit]):
                raise UnsupportedError(
                    f"tf2onnx copied rows of Embedding {entry.paths[0]!r}'s table into constant {tensor.name!r} "
                    "(a lookup with constant ids, or a transposed use); the large-table path cannot replace "
                    "those rows; convert with large=False if it fits in memory"
                )


def _elem(dtype: np.dtype[Any]) -> int:
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """One-element numeric constants of ``graph``: initializers and ``Constant`` outputs."""
    out = {t.name: t for t in graph.initializer if math.prod(t.dims) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None and math.prod(value.dims) == 1:
                out[node.output[0]] = value
    return {name: t for name, t in out.items() if t.data_type not in (TensorProto.STRING, TensorProto.BOOL)}


def _index_path(graph: onnx.GraphProto, gather: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes computing the Gather's indices, walked back through element-wise ops (at most _MAX_WALK)."""
    producers = {out: node for node in graph.node for out in node.output}
    consts = _scalar_constants(graph)
    seen: dict[int, onnx.NodeProto] = {}
    stack = [gather.input[1]]
    while stack and len(seen) < _MAX_WALK:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen or node.op_type not in _WALK_OPS:
            continue
        seen[id(node)] = node
        stack.extend(name for name in node.input if name and name not in consts)
    return list(seen.values())


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def patch_row_count(graph: onnx.GraphProto, gather: onnx.NodeProto, skeleton_rows: int, rows: int) -> int:
    """Re-point wrap inputs holding ``skeleton_rows`` on ``gather``'s index path at a constant ``rows``.

    The constant itself is left alone (tf2onnx merges equal constants; others may read it).
    Returns how many inputs were re-pointed. Raises :class:`ConversionError` when a value derived
    from ``skeleton_rows`` (``k - 1``, ``-k``) or ``k`` feeding any other op remains on the path.
    """
    consts = _scalar_constants(graph)
    replaced: list[str] = []
    path = _index_path(graph, gather)
    for node in path:
        for i, name in enumerate(node.input):
            tensor = consts.get(name)
            if tensor is None or node.op_type not in _WRAP_OPS:
                continue
            value = numpy_helper.to_array(tensor)
            if value.reshape(-1)[0] != skeleton_rows:
                continue
            new = numpy_helper.from_array(_exact(value, rows, tensor.name), _fresh_name(graph, f"{name}__rows"))
            graph.initializer.append(new)
            node.input[i] = new.name
            replaced.append(name)
    _check_no_leftover(path, _scalar_constants(graph), skeleton_rows, gather)
    _drop_unread(graph, set(replaced))
    return len(replaced)


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers ``names`` that no node (subgraphs included) or output reads any more."""
    read = {name for _, g in iter_graphs(graph) for node in g.node for name in node.input}
    read.update(o.name for o in graph.output)
    keep = [t for t in graph.initializer if t.name not in names or t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _exact(like: np.ndarray, rows: int, name: str) -> np.ndarray:
    value = np.full(like.shape, rows, dtype=like.dtype)
    if value.reshape(-1)[0] != rows:
        raise ConversionError(f"constant {name!r} ({like.dtype}) cannot hold the row count {rows}")
    return value


def _check_no_leftover(path: list[onnx.NodeProto], consts: dict[str, TensorProto], k: int,
                       gather: onnx.NodeProto) -> None:
    for node in path:
        for name in node.input:
            if name in consts and numpy_helper.to_array(consts[name]).reshape(-1)[0] in (k, k - 1, -k):
                raise ConversionError(
                    f"the index path of Gather {gather.name!r} holds constant {name!r} (read by {node.op_type}) "
                    f"derived from the skeleton's row count {k}; the large-table path cannot tell which real "
                    "value it stands for; convert with large=False or another skeleton_rows"
                )


def patch_gathers(model: onnx.ModelProto, ref: TableRef, entry: ShrunkTable) -> int:
    """:func:`patch_row_count` on every Gather reading ``ref``; returns the inputs re-pointed."""
    graphs = dict(iter_graphs(model))
    patched = 0
    for use in ref.gathers:
        graph = graphs[use.graph]
        gather = next(n for i, n in enumerate(graph.node) if node_label(n, i) == use.node)
        patched += patch_row_count(graph, gather, entry.skeleton_rows, entry.rows)
    return patched


# ----------------------------------------------------------------------------- tables and writing


def _tables(
    loaded: LoadedModel, proto: onnx.ModelProto, located: dict[int, tuple[TableRef, ShrunkTable]],
    warnings: list[str],
) -> tuple[list[EmbeddingTable], dict[str, tuple[TableRef, ShrunkTable]]]:
    """Store tables for every table of the skeleton's model: shrunk ones read from the real Keras weights."""
    refs_and_data = read_tables(proto, None)
    candidates = keras_candidates(loaded.model)
    shrunk_ids = {id(layer) for _, entry in located.values() for layer in entry.layers}
    rest = [c for c in candidates if not (c.primary and id(c.obj) in shrunk_ids)]
    inline = [i for i in range(len(refs_and_data)) if i not in located]
    inline_matches = dict(zip(inline, match_tables([refs_and_data[i][1] for i in inline], rest)))
    vocabs = embedding_vocabularies(loaded.model)
    tables, shrunk, matches, taken = [], {}, [], set()
    for i, (ref, data) in enumerate(refs_and_data):
        if i in located:
            entry = located[i][1]
            sources = [c for c in candidates if c.primary and any(c.obj is layer for layer in entry.layers)]
            data = entry.source if entry.source is not None else table_view(entry.layers[0])
            ref = replace(ref, shape=(entry.rows, entry.dim))
        else:
            sources = inline_matches[i]
        name = _table_name(ref, sources, taken)
        taken.add(name)
        matches.append(sources)
        tables.append(_table(name, ref, data, sources, vocabs, warnings))
        if i in located:
            shrunk[name] = located[i]
    _warn_missing(candidates, matches, warnings)
    return tables, shrunk


def _write(
    out_dir: Any, force: bool, proto: onnx.ModelProto, tables: list[EmbeddingTable],
    shrunk: dict[str, tuple[TableRef, ShrunkTable]], provenance: dict[str, Any],
) -> Store:
    """The store and ``model.onnx`` (shrunk tables as external data in the store's .npy files), atomically."""
    with atomic_directory(out_dir, force=force) as staging:
        manifest = build_store_files(staging, tables, provenance=provenance)
        entries = {e["name"]: e for e in manifest["tables"]}
        for name, (ref, entry) in shrunk.items():
            e = entries[name]
            point_initializer_at_file(proto, ref.initializer, e["file"], e["data_offset"], e["nbytes"],
                                      e["shape"], entry.dtype, graph=ref.graph)
            external = {"location": e["file"], "offset": e["data_offset"], "length": e["nbytes"]}
            e["metadata"] = {**e["metadata"], "onnx": {**e["metadata"]["onnx"], "external": external},
                             "skeleton_rows": entry.skeleton_rows}
        _drop_shape_info(proto, {ref.initializer for ref, _ in shrunk.values()})
        check_external_locations(proto, staging)
        size = save_model(proto, staging / ONNX_FILE)
        manifest["files"] = {ONNX_FILE: {"sha256": file_sha256(staging / ONNX_FILE), "bytes": size}}
        (staging / mf.MANIFEST).write_bytes(mf.write_manifest_bytes(manifest))
    return open_store(out_dir, verify=False)


def _drop_shape_info(proto: onnx.ModelProto, names: set[str]) -> None:
    """Remove value_info / graph inputs naming the rewritten initializers (they carry the skeleton's shape)."""
    for _, graph in iter_graphs(proto):
        for field_name in ("value_info", "input"):
            items = getattr(graph, field_name)
            keep = [v for v in items if v.name not in names]
            if len(keep) != len(items):
                del items[:]
                items.extend(keep)


def convert_large(
    loaded: LoadedModel,
    out_dir: Any,
    *,
    signature: Signature,
    force: bool = False,
    opset: int | None = None,
    skeleton_rows: int = SKELETON_ROWS,
    reason: str = "requested",
    streamed: Any = None,
    streamed_plan: list[ShrunkTable] | None = None,
) -> ConversionResult:
    """Convert ``loaded`` through a skeleton with small tables; write the store and ``OUT/model.onnx``.

    The real tables go to ``OUT/tables/<name>.npy`` and the model reads them from there as ONNX
    external data (location ``tables/<name>.npy``, offset ``data_offset``, length ``nbytes``).
    Nothing appears at ``out_dir`` unless everything was written.
    ``streamed`` (a :class:`converters.keras_stream.StreamedKeras`) with ``streamed_plan``:
    ``loaded.model`` is already the skeleton, built from the file's config; the tables are read
    from the file and the real model is rebuilt (for ``keras_model``) after the store is written.
    """
    if streamed is None:
        plan = plan_tables(loaded.model, skeleton_rows)
        skeleton, plan = build_skeleton(loaded.model, plan)
    else:
        skeleton, plan = loaded.model, list(streamed_plan or [])
    if not plan:
        raise UnsupportedError(
            f"model {loaded.name!r} has no Embedding table the large-table path can keep outside tf2onnx "
            f"(a built float Embedding with more than {skeleton_rows} rows, not quantized, without LoRA, "
            "reachable as a layer of the Functional/Sequential graph); convert with large=False"
        )
    _check_skeleton_size(skeleton, loaded.name)
    onnx_conv = to_onnx(skeleton, signature, opset=opset)
    warnings = (_still_read(skeleton, plan) if streamed is None else []) + list(onnx_conv.warnings)
    located = locate_tables(onnx_conv.model, plan)
    patched = {ref.initializer: patch_gathers(onnx_conv.model, ref, entry) for ref, entry in located.values()}
    tables, shrunk = _tables(loaded, onnx_conv.model, located, warnings)
    provenance = _provenance(loaded, onnx_conv, signature)
    provenance["large_tables"] = {
        "reason": reason,
        "tables": {name: {"layers": entry.paths, "skeleton_rows": entry.skeleton_rows, "rows": entry.rows,
                          "wrap_constants_patched": patched[ref.initializer]}
                   for name, (ref, entry) in shrunk.items()},
    }
    if streamed is not None:
        provenance["large_tables"]["streamed"] = "tables read from the .keras file, never loaded into Keras"
    store = _write(out_dir, force, onnx_conv.model, tables, shrunk, provenance)
    opened = [store[t.name] for t in tables]
    keras_model = loaded.model
    if streamed is not None:
        del tables, shrunk, plan, located
        streamed.release()
        keras_model = streamed.full_model()
    return ConversionResult(
        onnx_path=store.path / ONNX_FILE, store_path=store.path, store=store, tables=opened,
        summary=[summary_row(t) for t in opened], warnings=warnings, provenance=provenance,
        keras_model=keras_model,
    )
