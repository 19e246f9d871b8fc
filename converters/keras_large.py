"""Keras models whose embedding tables are too large for tf2onnx: convert a skeleton, keep the tables outside.

tf2onnx needs about 10x a model's weights in RAM and cannot write a model past protobuf's 2 GiB
limit. The large path never shows it the big tables:

1. **plan**: every float ``Embedding`` layer with more rows than the skeleton size is "shrunk";
   layers whose tables are equal (twins) share one entry;
2. **skeleton**: ``keras.models.clone_model`` rebuilds the Functional/Sequential graph, reusing
   every other layer as is (no weight is copied) and replacing each shrunk Embedding by one with
   ``input_dim = k`` (k = 17, 18, ...: one distinct value per table, so tf2onnx cannot merge the
   index arithmetic of two tables) whose table is a seeded random *pattern*;
3. tf2onnx converts the skeleton (small and fast). A shrunk table that the ONNX model does not read
   through a Gather (TensorFlow constant-folded a lookup of constant ids, e.g. ``arange(L)`` with a
   static ``L``: the model would hold rows of the pattern) is kept whole and the skeleton converted again;
4. each pattern is found in the ONNX graph **by value**; tf2onnx bakes the row count into the
   negative-id wrap in front of the Gather (``id < 0 ? id + k : id``): on the Gather's index path,
   the input holding ``k`` is re-pointed at a new constant holding the real row count;
5. the store is written, each table streamed straight from its Keras variable (a zero-copy view),
   and each pattern initializer becomes ONNX external data reading the store's
   ``tables/<name>.npy`` at ``data_offset`` for ``nbytes``: the table is on disk once, and
   onnxruntime memory-maps it.

Steps 1-2 live in :mod:`converters.keras_skeleton`, step 4 in :mod:`converters.keras_large_patch`;
this module chooses the path, builds the store tables and writes everything.

Peak memory is the Keras model plus tf2onnx on the skeleton plus 64 MiB write chunks. Only what a
row lookup does with a table survives the swap, so a shrunk table also used another way (a tied
output projection, rows copied into another constant) is refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from bridge import manifest as mf
from bridge.atomic import atomic_directory
from bridge.errors import UnsupportedError
from bridge.external import check_external_locations, point_initializer_at_file, save_model
from bridge.extract import read_tables
from bridge.npyio import file_sha256
from bridge.onnx_io import iter_graphs
from bridge.render import human_bytes
from bridge.scan import TableRef
from bridge.store import Store, build_store_files, open_store
from bridge.table import EmbeddingTable
from converters.keras_env import import_keras
from converters.keras_large_patch import locate_tables, patch_gathers, patch_row_count
from converters.keras_layers import keras_candidates
from converters.keras_load import LoadedModel
from converters.keras_map import Candidate, match_tables
from converters.keras_onnx import OnnxConversion, to_onnx
from converters.keras_result import ONNX_FILE, ConversionResult, conversion_provenance
from converters.keras_signature import Signature
from converters.keras_skeleton import (
    LARGE_THRESHOLD,
    SKELETON_ROWS,
    TF2ONNX_LIMIT,
    ShrunkTable,
    build_skeleton,
    check_skeleton_size,
    plan_tables,
    shrinkable,
    still_read_warnings,
    table_view,
    unique_embeddings,
    weight_bytes,
)
from converters.keras_stream import build_streamed_skeleton
from converters.keras_tables import build_table, folded_tables, summary_row, table_names
from converters.keras_vocab import embedding_vocabularies

# LARGE_THRESHOLD, TF2ONNX_LIMIT, ShrunkTable, table_view, locate_tables, patch_gathers and
# patch_row_count are re-exported: they were defined here before the split.
__all__ = ["LARGE_THRESHOLD", "SKELETON_ROWS", "TF2ONNX_LIMIT", "ShrunkTable", "build_skeleton", "convert_large",
           "large_path_reason", "locate_tables", "patch_gathers", "patch_row_count", "plan_tables", "table_view"]


# ----------------------------------------------------------------------------- choosing the path


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
    weights = weight_bytes(getattr(model, "weights", [])) if loaded.kind != "saved_model" else 0
    if loaded.kind == "saved_model" or not _is_graph_model(model):
        if large or weights > TF2ONNX_LIMIT:
            raise _not_rebuildable(loaded, weights)
        return None
    tables = weight_bytes(layer.embeddings for layer in unique_embeddings(model) if layer.built)
    limit = LARGE_THRESHOLD if threshold is None else int(threshold)
    if large:
        return "requested (large=True)"
    if not any(shrinkable(layer, SKELETON_ROWS) for layer in unique_embeddings(model)):
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


# ----------------------------------------------------------------------------- tables and writing


def _tables(
    loaded: LoadedModel, proto: onnx.ModelProto, located: dict[int, tuple[TableRef, ShrunkTable]],
    warnings: list[str],
) -> tuple[list[EmbeddingTable], dict[str, tuple[TableRef, ShrunkTable]]]:
    """Store tables for every table of the skeleton's model: shrunk ones read from the real Keras weights."""
    refs_and_data = read_tables(proto, None)
    candidates = keras_candidates(loaded.model)
    inline_matches = _inline_matches(refs_and_data, located, candidates)
    vocabs = embedding_vocabularies(loaded.model)
    found = [_real_table(ref, located[i][1], candidates) if i in located else (ref, data, inline_matches[i])
             for i, (ref, data) in enumerate(refs_and_data)]
    matches = [sources for _, _, sources in found]
    names = table_names([ref for ref, _, _ in found], matches, candidates)
    tables = [build_table(name, ref, data, sources, vocabs, warnings)
              for name, (ref, data, sources) in zip(names, found, strict=True)]
    shrunk = {names[i]: located[i] for i in located}
    return tables + folded_tables(proto, candidates, matches, tables, warnings), shrunk


def _inline_matches(
    refs_and_data: list[tuple[TableRef, np.ndarray]], located: dict[int, tuple[TableRef, ShrunkTable]],
    candidates: list[Candidate],
) -> dict[int, list[Candidate]]:
    """``{position: sources}`` for the tables tf2onnx holds in full, matched to the weights not shrunk."""
    shrunk_ids = {id(layer) for _, entry in located.values() for layer in entry.layers}
    rest = [c for c in candidates if not (c.primary and id(c.obj) in shrunk_ids)]
    inline = [i for i in range(len(refs_and_data)) if i not in located]
    return dict(zip(inline, match_tables([refs_and_data[i][1] for i in inline], rest), strict=True))


def _real_table(
    ref: TableRef, entry: ShrunkTable, candidates: list[Candidate],
) -> tuple[TableRef, np.ndarray, list[Candidate]]:
    """The reference, data and sources of a shrunk table: its real shape and values, its Embedding layers.

    The values are cast to ``entry.dtype`` when tf2onnx folded a mixed-precision layer's cast into the
    pattern (see :func:`locate_tables`): the ONNX model reads the table in that dtype. This costs one
    copy of the table in the compute dtype; otherwise the data is the Keras variable's buffer (no copy).
    """
    sources = [c for c in candidates if c.primary and any(c.obj is layer for layer in entry.layers)]
    data = entry.source if entry.source is not None else table_view(entry.layers[0])
    if data.dtype != entry.dtype:
        data = data.astype(entry.dtype)
    return replace(ref, shape=(entry.rows, entry.dim)), data, sources


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
    skeleton, plan = _skeleton(loaded, skeleton_rows, streamed, streamed_plan)
    onnx_conv, skeleton, plan, located, kept = _convert_skeleton(loaded, skeleton, plan, signature, opset,
                                                                 skeleton_rows, streamed)
    if streamed is not None:  # the skeleton is the model the tables are mapped to
        loaded = replace(loaded, model=skeleton)
    warnings = (still_read_warnings(skeleton, plan) if streamed is None else []) + [_kept_warning(e) for e in kept]
    warnings += onnx_conv.warnings
    patched = {ref.initializer: patch_gathers(onnx_conv.model, ref, entry) for ref, entry in located.values()}
    tables, shrunk = _tables(loaded, onnx_conv.model, located, warnings)
    provenance = conversion_provenance(loaded, onnx_conv, signature)
    provenance["large_tables"] = _large_tables_record(reason, shrunk, patched, streamed=streamed is not None)
    if kept:
        provenance["large_tables"]["kept_whole"] = {e.paths[0]: {"layers": e.paths, "rows": e.rows} for e in kept}
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


def _convert_skeleton(
    loaded: LoadedModel, skeleton: Any, plan: list[ShrunkTable], signature: Signature, opset: int | None,
    skeleton_rows: int, streamed: Any,
) -> tuple[OnnxConversion, Any, list[ShrunkTable], dict[int, tuple[TableRef, ShrunkTable]], list[ShrunkTable]]:
    """tf2onnx on the skeleton; returns the conversion, the skeleton, its plan, the located tables and those kept whole.

    A shrunk table that the ONNX model does not read through a Gather was used another way, typically a
    lookup of constant ids (``arange(L)`` with a static ``L``) that TensorFlow constant-folded: the model
    would hold rows of the small stand-in. Such tables are kept whole in a rebuilt skeleton, converted again.
    """
    kept: list[ShrunkTable] = []
    while True:
        check_skeleton_size(skeleton, loaded.name)
        onnx_conv = to_onnx(skeleton, signature, opset=opset)
        located = locate_tables(onnx_conv.model, plan)
        found = {entry.paths[0] for _, entry in located.values()}
        missing = [entry for entry in plan if entry.paths[0] not in found]
        if not missing:
            return onnx_conv, skeleton, plan, located, kept
        kept += missing
        keep = frozenset(entry.paths[0] for entry in kept)
        if streamed is None:
            skeleton, plan = build_skeleton(loaded.model, [entry for entry in plan if entry.paths[0] not in keep])
        else:
            skeleton, plan = build_streamed_skeleton(streamed, skeleton_rows, keep)


def _kept_warning(entry: ShrunkTable) -> str:
    return (f"the table of Embedding {entry.paths[0]!r} ({entry.rows} x {entry.dim}, {human_bytes(entry.nbytes)}) "
            "is not looked up by a Gather in the converted skeleton (TensorFlow constant-folded a lookup of constant "
            "ids, or the outputs do not use it): the large-table path kept it whole in the skeleton, so tf2onnx "
            "converted it as the ordinary path does")


def _skeleton(
    loaded: LoadedModel, skeleton_rows: int, streamed: Any, streamed_plan: list[ShrunkTable] | None,
) -> tuple[Any, list[ShrunkTable]]:
    """The skeleton and its honoured plan (``loaded.model`` itself when streamed); refuses an empty plan."""
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
    return skeleton, plan


def _large_tables_record(
    reason: str, shrunk: dict[str, tuple[TableRef, ShrunkTable]], patched: dict[str, int], *, streamed: bool,
) -> dict[str, Any]:
    """The provenance's ``large_tables`` entry: why the path was taken, and each shrunk table's layers and rows."""
    record: dict[str, Any] = {
        "reason": reason,
        "tables": {name: {"layers": entry.paths, "skeleton_rows": entry.skeleton_rows, "rows": entry.rows,
                          "wrap_constants_patched": patched[ref.initializer]}
                   for name, (ref, entry) in shrunk.items()},
    }
    if streamed:
        record["streamed"] = "tables read from the .keras file, never loaded into Keras"
    return record
