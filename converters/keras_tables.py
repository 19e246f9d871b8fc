"""Store tables from ONNX tables matched to Keras layers: names, metadata, vocabularies, warnings.

Shared by the ordinary path (:mod:`converters.keras`) and the large-table path
(:mod:`converters.keras_large`), so a table is named and described the same way on both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bridge.quantization import Quantization
from bridge.scan import TableRef, default_table_name
from bridge.table import EmbeddingTable, SourceRef
from converters.keras_fidelity import layer_metadata
from converters.keras_map import Candidate
from converters.keras_quant import quantization_problems
from converters.keras_vocab import LookupVocab

__all__ = ["build_table", "summary_row", "table_name", "warn_missing"]


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
