"""Keras -> ONNX -> embedding store: the public entry point of the Keras converter.

    from converters.keras import convert
    result = convert("model.keras", "out/")      # out/model.onnx + out/manifest.json + tables
    for table in result.tables:
        print(table.name, table.shape, [s.layer for s in table.sources])

Steps: load safely (:mod:`converters.keras_load`), derive an input signature with dynamic
batch and sequence dims (:mod:`converters.keras_signature`), convert with tf2onnx
(:mod:`converters.keras_onnx`), find the tables in the ONNX graph (:mod:`bridge.scan`), map
each back to its Keras layer(s) by value (:mod:`converters.keras_map`), attach lookup
vocabularies (:mod:`converters.keras_vocab`), and write the ONNX model and the store in one
atomic step. TensorFlow is imported only when a function here runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bridge.atomic import check_output_dir
from bridge.errors import ConversionError, InputError
from bridge.extract import read_tables
from bridge.onnx_vocab import onnx_vocabularies
from bridge.quantization_onnx import quantization_from_ref
from bridge.store import write_store
from bridge.table import EmbeddingTable
from bridge.ties import find_ties, ties_json
from converters import keras_large, keras_stream
from converters.keras_fidelity import with_onnx_vocabulary
from converters.keras_layers import embedding_layers, embedding_outputs, keras_candidates, variable_candidates
from converters.keras_load import LoadedModel, load
from converters.keras_map import match_tables
from converters.keras_onnx import to_onnx
from converters.keras_result import ONNX_FILE, ConversionResult, conversion_provenance
from converters.keras_signature import Signature, derive_signature, normalize_signature
from converters.keras_tables import build_table, folded_tables, summary_row, table_names
from converters.keras_text import split_text_inputs
from converters.keras_vocab import embedding_vocabularies

__all__ = [
    "ONNX_FILE",
    "Conversion",
    "ConversionResult",
    "convert",
    "embedding_layers",
    "keras_embedding_outputs",
    "prepare",
]


@dataclass
class Conversion:
    """A conversion held in memory: the ONNX model and the tables mapped back to Keras.

    ``keras_model`` is what was converted (a keras.Model; for a SavedModel, the TFSMLayer).
    """

    onnx_model: onnx.ModelProto
    tables: list[EmbeddingTable]
    summary: list[dict[str, Any]]
    warnings: list[str]
    provenance: dict[str, Any]
    signature: Signature
    keras_model: Any = field(default=None, repr=False)


def convert(
    model_or_path: Any,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    safe_mode: bool = True,
    input_signature: Any = None,
    opset: int | None = None,
    large: bool | None = None,
    large_threshold: int | None = None,
) -> ConversionResult:
    """Convert a Keras model to ONNX and extract its embedding tables into a store at ``out_dir``.

    ``model_or_path``: a keras.Model, a ``.keras`` / ``.h5`` file, or a SavedModel directory.
    ``safe_mode=False`` lets Keras load Python code (Lambda layers) from a trusted file.
    ``input_signature`` is needed only for models without symbolic inputs (subclassed); see
    :func:`converters.keras_signature.normalize_signature`. ``OUT/model.onnx``,
    ``OUT/manifest.json``, the table and vocabulary files appear together or not at all; an
    existing non-empty ``out_dir`` is refused unless ``force``.
    ``large``: True/False forces the large-table path (:mod:`converters.keras_large`: tf2onnx
    converts a skeleton with small tables, the model reads the real ones from the store's files
    as ONNX external data) or the ordinary one; None (default) picks the large path when the
    Embedding tables total ``large_threshold`` bytes (default 256 MiB) or the weights exceed 2 GiB.
    """
    check_output_dir(out_dir, force, keep=[model_or_path] if isinstance(model_or_path, (str, os.PathLike)) else [])
    not_streamed: list[str] = []  # why a .keras file could not be streamed: reported if it takes the large path
    opened = keras_stream.stream_large(model_or_path, safe_mode=safe_mode, large=large, threshold=large_threshold,
                                       skeleton_rows=keras_large.SKELETON_ROWS, fallback=not_streamed)
    if opened is not None:
        return _convert_streamed(*opened, out_dir, force=force, opset=opset, input_signature=input_signature)
    loaded = load(model_or_path, safe_mode=safe_mode)

    reason = keras_large.large_path_reason(loaded, large, large_threshold)
    if reason is not None:
        result = keras_large.convert_large(loaded, out_dir, signature=_signature(loaded, input_signature),
                                           force=force, opset=opset, reason=reason)
        result.warnings[:0] = not_streamed
        return result
    conv = prepare(loaded, safe_mode=safe_mode, input_signature=input_signature, opset=opset)
    try:
        model_bytes = conv.onnx_model.SerializeToString()
    except ValueError as exc:
        raise ConversionError(f"the ONNX model cannot be serialized (over 2 GiB?): {exc}") from exc
    store = write_store(out_dir, conv.tables, provenance=conv.provenance, force=force,
                        files={ONNX_FILE: model_bytes})
    tables = [store[t.name] for t in conv.tables]
    return ConversionResult(
        onnx_path=store.path / ONNX_FILE, store_path=store.path, store=store, tables=tables,
        summary=conv.summary, warnings=conv.warnings, provenance=conv.provenance, keras_model=conv.keras_model,
    )


def _convert_streamed(streamed: Any, reason: str, out_dir: Any, *, force: bool, opset: int | None,
                      input_signature: Any) -> ConversionResult:
    """A big ``.keras`` file on the large path without loading its tables (:mod:`converters.keras_stream`)."""
    try:
        skeleton, plan = keras_stream.build_streamed_skeleton(streamed, keras_large.SKELETON_ROWS)
        loaded = LoadedModel(model=skeleton, kind="keras", path=streamed.path)
        return keras_large.convert_large(loaded, out_dir, signature=_signature(loaded, input_signature),
                                         force=force, opset=opset, reason=reason, streamed=streamed,
                                         streamed_plan=plan)
    finally:
        streamed.close()


def prepare(
    model_or_path: Any,
    *,
    safe_mode: bool = True,
    input_signature: Any = None,
    opset: int | None = None,
) -> Conversion:
    """Load, convert and map, writing nothing: the in-memory half of :func:`convert`.

    ``model_or_path`` may also be a :class:`converters.keras_load.LoadedModel` (already loaded).
    """
    loaded = model_or_path if isinstance(model_or_path, LoadedModel) else load(model_or_path, safe_mode=safe_mode)
    loaded, text_signature, text_inputs, text_warnings = (
        split_text_inputs(loaded) if input_signature is None else (loaded, None, [], []))
    signature = text_signature or _signature(loaded, input_signature)
    onnx_conv = to_onnx(loaded.model, signature, opset=opset)
    warnings = text_warnings + list(onnx_conv.warnings)
    tables = _tables(loaded, onnx_conv.model, warnings)
    provenance = conversion_provenance(loaded, onnx_conv, signature)
    if text_inputs:
        provenance["text_inputs"] = [t.to_json() for t in text_inputs]
    return Conversion(
        onnx_model=onnx_conv.model, tables=tables, summary=[summary_row(t) for t in tables], warnings=warnings,
        provenance=provenance, signature=signature, keras_model=loaded.model,
    )


def keras_embedding_outputs(
    model: Any, ids_by_layer: dict[str, Any], *, safe_mode: bool = True,
) -> dict[str, np.ndarray]:
    """``{key: layer(ids)}``: what each Embedding layer itself returns, keys being layer paths or unique names.

    ``model`` is a keras.Model, or a ``.keras`` / ``.h5`` path (loaded with ``safe_mode``); a
    SavedModel has no Keras layers to call.
    """
    loaded = load(model, safe_mode=safe_mode) if isinstance(model, (str, os.PathLike)) else None
    target = loaded.model if loaded is not None else model
    if loaded is not None and loaded.kind == "saved_model":
        raise InputError("a SavedModel has no Keras layers to call; pass a keras.Model, .keras or .h5 file")
    return embedding_outputs(target, ids_by_layer)


# ----------------------------------------------------------------------------- steps


def _signature(loaded: LoadedModel, input_signature: Any) -> Signature:
    if loaded.signature is not None:
        if input_signature is not None:
            raise InputError("a SavedModel's serving signature defines its inputs; do not pass input_signature")
        return loaded.signature
    if input_signature is not None:
        return normalize_signature(input_signature)
    return derive_signature(loaded.model)


def _tables(loaded: LoadedModel, model: onnx.ModelProto, warnings: list[str]) -> list[EmbeddingTable]:
    refs_and_data = read_tables(model, None)
    is_keras = loaded.kind != "saved_model"
    candidates = keras_candidates(loaded.model) if is_keras else variable_candidates(loaded.variables)
    matches = match_tables([data for _, data in refs_and_data], candidates)
    vocabs = embedding_vocabularies(loaded.model) if is_keras else {}
    onnx_vocabs = onnx_vocabularies(model, [ref for ref, _ in refs_and_data])
    ties = find_ties(model, [ref for ref, _ in refs_and_data], None,
                     arrays={ref.key: data for ref, data in refs_and_data})
    names = table_names([ref for ref, _ in refs_and_data], matches, candidates)
    tables = []
    for (ref, data), sources, name in zip(refs_and_data, matches, names, strict=True):
        quant = quantization_from_ref(model, ref, None)
        table = build_table(name, ref, data, sources, vocabs, warnings, quant)
        table.metadata["ties"] = ties_json(ties[ref.key])
        tables.append(with_onnx_vocabulary(table, onnx_vocabs.get(ref.key), warnings))
    return tables + folded_tables(model, candidates, matches, tables, warnings)
