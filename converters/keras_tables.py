"""Store tables from ONNX tables matched to Keras layers: names, metadata, vocabularies, warnings.

Shared by the ordinary path (:mod:`converters.keras`) and the large-table path
(:mod:`converters.keras_large`), so a table is named and described the same way on both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bridge.quantization import Quantization
from bridge.scan import TableRef, default_table_name
from bridge.table import EmbeddingTable, SourceRef
from converters.keras_fidelity import find_truncations, layer_metadata, truncated_table
from converters.keras_map import Candidate
from converters.keras_quant import quantization_problems
from converters.keras_vocab import LookupVocab

__all__ = ["build_table", "folded_tables", "summary_row", "table_name", "table_names", "unmapped_name", "warn_missing"]


def table_name(ref: TableRef | None, sources: list[Candidate], taken: set[str]) -> str:
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


def table_names(refs: list[TableRef], matches: list[list[Candidate]], candidates: list[Candidate]) -> list[str]:
    """Names for the ONNX tables ``refs`` (their sources ``matches``), unique case-insensitively.

    Mapped tables are named first (:func:`table_name`), so each takes its layer's name; then the
    unmapped ones (:func:`unmapped_name`), which never take the name of an Embedding layer.
    """
    names: dict[int, str] = {}
    for i, (ref, sources) in enumerate(zip(refs, matches, strict=True)):
        if sources:
            names[i] = table_name(ref, sources, set(names.values()))
    layers = {c.layer.rsplit("/", 1)[-1] for c in candidates if c.primary}
    layers |= {c.layer.replace("/", ".") for c in candidates if c.primary}
    for i, ref in enumerate(refs):
        if i not in names:
            names[i] = unmapped_name(ref, set(names.values()), layers)
    return [names[i] for i in range(len(refs))]


def unmapped_name(ref: TableRef, taken: set[str], layers: set[str]) -> str:
    """A name for a table matching no Keras weight: from its initializer, ``<name>_unmapped`` when that
    is the name of one of the Embedding ``layers`` (a mapped table, or a layer found later, owns it)."""
    base = default_table_name(ref.initializer, set())
    if base.lower() in {layer.lower() for layer in layers}:
        base = f"{base}_unmapped"
    return default_table_name(base, taken | layers)


def build_table(
    name: str, ref: TableRef, data: np.ndarray, sources: list[Candidate],
    vocabs: dict[int, LookupVocab], warnings: list[str], quant: Quantization | None = None,
) -> EmbeddingTable:
    """The store table ``name`` for ONNX table ``ref`` holding ``data``, mapped to the Keras weights ``sources``.

    Metadata records the ONNX reference and what the source Embedding layers do (mask, class,
    quantization, fidelity); the vocabulary comes from a lookup layer feeding them (``vocabs``:
    by ``id(layer)``). Problems (no source, vocabulary size, quantization) are appended to ``warnings``.
    """
    metadata: dict[str, Any] = {"onnx": ref.to_json()}
    layers = [c.obj for c in sources if c.primary and c.obj is not None and hasattr(c.obj, "mask_zero")]
    if layers:
        metadata.update(_layer_metadata(name, layers, data.dtype, warnings))
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


def _layer_metadata(name: str, layers: list[Any], dtype: np.dtype[Any], warnings: list[str]) -> dict[str, Any]:
    """What the table's Embedding ``layers`` record: ``mask_zero``, their class, quantization, fidelity."""
    metadata: dict[str, Any] = {
        "mask_zero": any(bool(layer.mask_zero) for layer in layers),
        "keras_class": sorted({type(layer).__name__ for layer in layers}),
    }
    modes = sorted({str(m) for m in (getattr(layer, "quantization_mode", None) for layer in layers) if m})
    if modes:
        metadata["keras_quantization"] = modes
    metadata.update(layer_metadata(name, layers, dtype, warnings))
    return metadata


def _vocab_for(
    name: str, data: np.ndarray, layers: list[Any], vocabs: dict[int, LookupVocab], warnings: list[str],
) -> LookupVocab | None:
    """The vocabulary of the first lookup layer feeding ``layers``; warns when several do or sizes differ."""
    found = [vocabs[id(layer)] for layer in layers if id(layer) in vocabs]
    if not found:
        return None
    if len({v.layer for v in found}) > 1:
        warnings.append(f"table {name!r} is fed by several lookup layers ({', '.join(v.layer for v in found)}); "
                        f"the vocabulary of {found[0].layer!r} is stored")
    vocab = found[0]
    if vocab.disagreeing:
        warnings.append(f"table {name!r} is looked up through lookup layers with different vocabularies "
                        f"({', '.join((vocab.layer, *vocab.disagreeing))}); the vocabulary of {vocab.layer!r} is "
                        "stored, so tokens of the others map to other rows: look their ids up with their own "
                        "lookup layer")
    if len(vocab.vocabulary) != data.shape[0]:
        warnings.append(f"table {name!r} has {data.shape[0]} rows but its lookup {vocab.layer!r} has "
                        f"{len(vocab.vocabulary)} tokens: ids past the vocabulary have no token")
    return vocab


def warn_missing(candidates: list[Candidate], matches: list[list[Candidate]], warnings: list[str]) -> None:
    """Warn about embedding layers whose table is not in the ONNX model (no candidate in any of ``matches``)."""
    found = {(c.layer, c.weight) for hits in matches for c in hits}
    for cand in candidates:
        if cand.primary and (cand.layer, cand.weight) not in found:
            dtype = str(getattr(cand.obj, "dtype", getattr(cand.obj, "compute_dtype", "")))
            hint = "; tf2onnx converts bfloat16 tables to float16" if "bfloat16" in dtype else ""
            warnings.append(f"embedding {cand.layer!r} has no table in the ONNX model (unused by the outputs, "
                            f"constant-folded, or changed by tf2onnx){hint}")


def folded_tables(
    model: onnx.ModelProto, candidates: list[Candidate], matches: list[list[Candidate]], tables: list[EmbeddingTable],
    warnings: list[str],
) -> list[EmbeddingTable]:
    """Store tables for the weights TensorFlow folded into constants (:func:`find_truncations`), each whole
    from Keras with a warning; then :func:`warn_missing` for the Embedding layers still without a table.

    ``tables`` are the store tables already built from the model's tables (``matches``: their sources).
    """
    initializers = {t.initializer for t in tables if t.initializer}
    truncations = find_truncations(model, candidates, matches, initializers)
    taken = {t.name for t in tables}
    out = []
    for trunc in truncations:
        name = table_name(None, [trunc.candidate], taken)
        taken.add(name)
        out.append(truncated_table(name, trunc))
        warnings.append(trunc.warning(name))
    warn_missing(candidates, [*matches, [t.candidate for t in truncations]], warnings)
    return out


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
