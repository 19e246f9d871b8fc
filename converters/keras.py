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
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.atomic import check_output_dir
from bridge.errors import ConversionError, InputError
from bridge.extract import read_tables
from bridge.onnx_vocab import onnx_vocabularies
from bridge.quantization import Quantization
from bridge.quantization_onnx import quantization_from_ref
from bridge.scan import TableRef, default_table_name
from bridge.store import Store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.ties import find_ties, ties_json
from converters.keras_env import import_keras, import_tf2onnx
from converters.keras_fidelity import find_truncations, layer_metadata, truncated_table, with_onnx_vocabulary
from converters.keras_layers import embedding_layers, embedding_outputs, keras_candidates, variable_candidates
from converters.keras_load import LoadedModel, load
from converters.keras_map import Candidate, match_tables
from converters.keras_onnx import OnnxConversion, to_onnx
from converters.keras_quant import quantization_problems
from converters.keras_signature import Signature, derive_signature, normalize_signature
from converters.keras_text import split_text_inputs
from converters.keras_vocab import LookupVocab, embedding_vocabularies

ONNX_FILE = "model.onnx"

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


@dataclass
class ConversionResult:
    """What :func:`convert` wrote: ``onnx_path`` (``OUT/model.onnx``) and the store at ``store_path``.

    ``tables`` are the store's tables (memory-mapped, with sources, vocabularies, metadata);
    ``summary`` has one row per table; ``warnings`` lists what the user should know
    (unmapped tables, layers without a table, ops tf2onnx could not convert).
    """

    onnx_path: Path
    store_path: Path
    store: Store
    tables: list[EmbeddingTable]
    summary: list[dict[str, Any]]
    warnings: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
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
    check_output_dir(out_dir, force)
    from converters import keras_large, keras_stream  # noqa: PLC0415 - they import this module

    opened = keras_stream.stream_large(model_or_path, safe_mode=safe_mode, large=large, threshold=large_threshold,
                                       skeleton_rows=keras_large.SKELETON_ROWS)
    if opened is not None:
        return _convert_streamed(*opened, out_dir, force=force, opset=opset, input_signature=input_signature)
    loaded = load(model_or_path, safe_mode=safe_mode)

    reason = keras_large.large_path_reason(loaded, large, large_threshold)
    if reason is not None:
        return keras_large.convert_large(loaded, out_dir, signature=_signature(loaded, input_signature),
                                         force=force, opset=opset, reason=reason)
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
    from converters import keras_large  # noqa: PLC0415 - it imports this module
    from converters.keras_stream import build_streamed_skeleton  # noqa: PLC0415 - imports Keras

    try:
        skeleton, plan = build_streamed_skeleton(streamed, keras_large.SKELETON_ROWS)
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
    provenance = _provenance(loaded, onnx_conv, signature)
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
                     arrays={ref.initializer: data for ref, data in refs_and_data})
    taken: set[str] = set()
    tables = []
    for (ref, data), sources in zip(refs_and_data, matches):
        name = _table_name(ref, sources, taken)
        taken.add(name)
        quant = quantization_from_ref(model, ref, None)
        table = _table(name, ref, data, sources, vocabs, warnings, quant)
        table.metadata["ties"] = ties_json(ties[ref.initializer])
        tables.append(with_onnx_vocabulary(table, onnx_vocabs.get(ref.initializer), warnings))
    truncations = find_truncations(model, candidates, matches, {ref.initializer for ref, _ in refs_and_data})
    for trunc in truncations:
        name = _table_name(None, [trunc.candidate], taken)
        taken.add(name)
        tables.append(truncated_table(name, trunc))
        warnings.append(trunc.warning(name))
    _warn_missing(candidates, [*matches, [t.candidate for t in truncations]], warnings)
    return tables


def _table_name(ref: TableRef | None, sources: list[Candidate], taken: set[str]) -> str:
    """The first source layer's name; its full path (``a.b``) if taken; else from the initializer."""
    if not sources and ref is not None:
        return default_table_name(ref.initializer, taken)
    lowered = {t.lower() for t in taken}
    layer = sources[0].layer
    short = layer.rsplit("/", 1)[-1]
    for candidate in (short, layer.replace("/", ".")):
        if candidate.lower() not in lowered and default_table_name(candidate, taken) == candidate:
            return candidate
    return default_table_name(layer.replace("/", "."), taken)


def _table(
    name: str, ref: TableRef, data: np.ndarray, sources: list[Candidate],
    vocabs: dict[int, LookupVocab], warnings: list[str], quant: Quantization | None = None,
) -> EmbeddingTable:
    metadata: dict[str, Any] = {"onnx": ref.to_json()}
    layers = [c.obj for c in sources if c.primary and c.obj is not None and hasattr(c.obj, "mask_zero")]
    if layers:
        metadata["mask_zero"] = any(bool(layer.mask_zero) for layer in layers)
        metadata["keras_class"] = sorted({type(layer).__name__ for layer in layers})
        modes = sorted({str(m) for m in (getattr(layer, "quantization_mode", None) for layer in layers) if m})
        if modes:
            metadata["keras_quantization"] = modes
        metadata.update(layer_metadata(name, layers, data.dtype, warnings))
    if not sources:
        warnings.append(f"table {name!r} (initializer {ref.initializer!r}, shape {list(ref.shape)}) matches no "
                        "Keras weight: it is stored unmapped, with no source layer")
    warnings.extend(quantization_problems(name, quant, layers))
    vocab = _vocab_for(name, data, layers, vocabs, warnings)
    if vocab is not None:
        metadata["vocabulary"] = vocab.metadata
    oov = vocab.vocabulary.oov_id if vocab is not None else None
    return EmbeddingTable(
        name=name, data=data, vocab=vocab.vocabulary if vocab is not None else None,
        sources=tuple(SourceRef("keras", c.layer, c.weight) for c in sources), initializer=ref.initializer,
        oov_id=oov if oov is not None and oov < data.shape[0] else None, metadata=metadata, quantization=quant,
    )


def _vocab_for(
    name: str, data: np.ndarray, layers: list[Any], vocabs: dict[int, LookupVocab], warnings: list[str],
) -> LookupVocab | None:
    found = [vocabs[id(layer)] for layer in layers if id(layer) in vocabs]
    if not found:
        return None
    if len({v.layer for v in found}) > 1:
        warnings.append(f"table {name!r} is fed by several lookup layers ({', '.join(v.layer for v in found)}); "
                        f"the vocabulary of {found[0].layer!r} is stored")
    vocab = found[0]
    if len(vocab.vocabulary) != data.shape[0]:
        warnings.append(f"table {name!r} has {data.shape[0]} rows but its lookup {vocab.layer!r} has "
                        f"{len(vocab.vocabulary)} tokens: ids past the vocabulary have no token")
    return vocab


def _warn_missing(candidates: list[Candidate], matches: list[list[Candidate]], warnings: list[str]) -> None:
    """Warn about embedding layers whose table is not in the ONNX model."""
    found = {(c.layer, c.weight) for hits in matches for c in hits}
    for cand in candidates:
        if cand.primary and (cand.layer, cand.weight) not in found:
            dtype = str(getattr(cand.obj, "dtype", getattr(cand.obj, "compute_dtype", "")))
            hint = "; tf2onnx converts bfloat16 tables to float16" if "bfloat16" in dtype else ""
            warnings.append(f"embedding {cand.layer!r} has no table in the ONNX model (unused by the outputs, "
                            f"constant-folded, or changed by tf2onnx){hint}")


def summary_row(table: EmbeddingTable) -> dict[str, Any]:
    """One JSON-safe row describing ``table`` (``source`` is ``"unmapped"`` when no layer matched)."""
    return {
        "table": table.name,
        "source": ", ".join(s.layer for s in table.sources) or "unmapped",
        "shape": list(table.shape),
        "dtype": str(table.dtype),
        "initializer": table.initializer,
        "vocab": len(table.vocab) if table.vocab is not None else None,
        "mask_zero": table.metadata.get("mask_zero"),
        "quantization": table.quantization.scheme if table.quantization is not None else None,
    }


def _provenance(loaded: LoadedModel, conv: OnnxConversion, signature: Signature) -> dict[str, Any]:
    tf, keras = import_keras()
    tf2onnx = import_tf2onnx()
    opsets = {o.domain or "ai.onnx": int(o.version) for o in conv.model.opset_import}
    return {
        "converter": "converters.keras",
        "source": loaded.provenance(),
        "signature": signature.to_json(),
        "onnx": {"file": ONNX_FILE, "ir_version": int(conv.model.ir_version), "opsets": opsets,
                 "outputs": conv.outputs},
        "tools": {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                  "onnx": onnx.__version__},
    }
