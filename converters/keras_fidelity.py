"""What a table's Keras layer does beyond a plain lookup, and tables tf2onnx truncated.

* **LoRA** (``layer.enable_lora(rank)``): tf2onnx 1.17 constant-folds
  ``embeddings + (alpha / rank) * lora_a @ lora_b`` into one initializer, equal bit for bit to
  ``layer.embeddings`` (what the layer looks rows up in); the table maps to the layer and its
  metadata records the LoRA rank and alpha. No arithmetic is left for an adapter to do.
* **Mixed precision**: see :mod:`converters.keras_precision`.
* **Truncated tables**: a lookup of constant ids (``Embedding(arange(L))`` with a constant ``L``)
  is constant-folded by TensorFlow: the ONNX model holds only the ``k`` rows used, as a constant
  read by ``Add``, and no Gather. :func:`find_truncations` finds a layer weight whose first ``k`` rows
  equal such a constant (all of them, ``k = V``, for an Embedding's table: a static length equal to its
  rows) and the whole weight is stored from Keras, with a warning and ``metadata["truncated_in_onnx"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from bridge.onnx_io import initializer_array
from bridge.onnx_vocab import OnnxVocab
from bridge.table import EmbeddingTable, SourceRef
from bridge.vocab import Vocabulary
from converters.keras_map import Candidate, same_bytes
from converters.keras_precision import cast_warning, compute_dtype_metadata, folded_cast_metadata, folded_cast_warning

#: Ops a folded lookup result is read by, for :func:`find_truncations` (a position table added to tokens).
TRUNCATION_READERS = frozenset({"Add"})


def layer_metadata(name: str, layers: Sequence[Any], table_dtype: np.dtype[Any], warnings: list[str]) -> dict[str, Any]:
    """Metadata about what ``layers`` (the table's Keras Embedding layers) do after the lookup."""
    meta: dict[str, Any] = {}
    lora = [layer for layer in layers if getattr(layer, "lora_enabled", False)]
    if lora:
        layer = lora[0]
        meta["lora"] = {
            "rank": int(layer.lora_rank), "alpha": float(getattr(layer, "lora_alpha", layer.lora_rank)),
            "folded": True,
            "note": ("tf2onnx folded embeddings + (alpha / rank) * lora_a @ lora_b into this table; it equals "
                     "layer.embeddings, the table the layer looks rows up in" if not _quantized(layer) else
                     "the layer is quantized: this table holds its integer rows without the LoRA term, which "
                     "Keras adds after dequantizing (see the conversion's warning)"),
        }
    cast = compute_dtype_metadata(layers, table_dtype)
    if cast:
        meta.update(cast)
        warnings.append(cast_warning(name, table_dtype, cast))
    folded = folded_cast_metadata(layers, table_dtype)
    if folded:
        meta.update(folded)
        warnings.append(folded_cast_warning(name, table_dtype, folded))
    return meta


def _quantized(layer: Any) -> bool:
    """Whether a Keras layer holds quantized weights (``layer.quantize(...)``)."""
    return bool(getattr(layer, "quantization_mode", None))


@dataclass(frozen=True)
class Truncation:
    """A layer weight of ``rows`` rows whose first ``kept`` rows are the ONNX constant ``initializer``."""

    candidate: Candidate
    initializer: str
    kept: int
    rows: int
    readers: tuple[str, ...]

    def metadata(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "rows": self.kept, "of": self.rows, "read_by": list(self.readers)}

    def warning(self, name: str) -> str:
        if self.kept == self.rows:
            return (f"table {name!r} ({self.candidate.layer!r}) has no lookup in the ONNX model: TensorFlow "
                    f"constant-folded a lookup of constant ids covering all {self.rows} rows (e.g. arange(seq_len) "
                    f"with a static length equal to the table's rows) into initializer {self.initializer!r}, read "
                    f"by {', '.join(self.readers)}; the store keeps the table from the Keras weight, found equal to "
                    "that constant; compute the ids from the input's dynamic shape (or give the model an integer "
                    "Input) to keep the lookup")
        return (f"table {name!r} ({self.candidate.layer!r}) is truncated to {self.kept} of {self.rows} rows in the "
                f"ONNX model: TensorFlow constant-folded a lookup of constant ids (e.g. arange(seq_len) with a "
                f"static length) into initializer {self.initializer!r}, read by {', '.join(self.readers)}; the store "
                f"keeps all {self.rows} rows from the Keras weight, but the ONNX model only serves "
                f"{self.kept}; compute the ids from the input's dynamic shape to keep the lookup")


def _constants(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, tuple[str, ...]]]:
    """Main-graph initializers and the op types that read them."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return {t.name: (t, tuple(sorted(readers.get(t.name, ())))) for t in model.graph.initializer}


def _as_rows(tensor: onnx.TensorProto) -> tuple[int, int] | None:
    dims = [int(d) for d in tensor.dims]
    if len(dims) == 3 and dims[0] == 1:
        dims = dims[1:]
    return (dims[0], dims[1]) if len(dims) == 2 and dims[0] > 0 else None


def find_truncations(
    model: onnx.ModelProto, candidates: Sequence[Candidate], matches: Sequence[Sequence[Candidate]],
    tables: set[str],
) -> list[Truncation]:
    """Unmatched weights ``[V, D]`` whose first ``k < V`` rows (or all ``V``, for an Embedding's table) equal
    a constant ``[k, D]`` (or ``[1, k, D]``) read by one of :data:`TRUNCATION_READERS`; ``tables`` are the
    initializers already taken as tables."""
    found = {(c.layer, c.weight) for hits in matches for c in hits}
    loose = [c for c in candidates if (c.layer, c.weight) not in found and len(c.shape) == 2]
    if not loose:
        return []
    out: list[Truncation] = []
    used: set[tuple[str, str]] = set()
    loaded: dict[tuple[str, str], np.ndarray] = {}
    for name, (tensor, readers) in _constants(model).items():
        rows = _as_rows(tensor)
        if name in tables or rows is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        fits = [c for c in loose if c.shape[1] == rows[1] and _may_hold(c, rows[0]) and (c.layer, c.weight) not in used]
        if not fits or not TRUNCATION_READERS & set(readers):
            continue
        data = initializer_array(tensor, None).reshape(rows)
        for cand in sorted(fits, key=lambda c: not c.primary):
            key = (cand.layer, cand.weight)
            weight = loaded[key] if key in loaded else loaded.setdefault(key, np.asarray(cand.load()))
            if same_bytes(np.ascontiguousarray(weight[: rows[0]]), np.ascontiguousarray(data)):
                out.append(Truncation(cand, name, rows[0], int(cand.shape[0]), readers))
                used.add((cand.layer, cand.weight))
                break
    return out


def _may_hold(cand: Candidate, kept: int) -> bool:
    """Whether ``kept`` folded rows may be the first rows of ``cand``: fewer than its rows, or all of them
    for an Embedding's table (a ``[V, D]`` constant equal to any other weight may be that weight itself)."""
    rows = int(cand.shape[0])
    return rows > kept or (cand.primary and rows == kept)


def truncated_table(name: str, trunc: Truncation) -> EmbeddingTable:
    """The whole weight from Keras, mapped to its layer, with ``metadata["truncated_in_onnx"]``."""
    cand = trunc.candidate
    data = np.array(cand.load(), copy=True)
    return EmbeddingTable(name=name, data=data, sources=(SourceRef("keras", cand.layer, cand.weight),),
                          initializer=None, metadata={"truncated_in_onnx": trunc.metadata()})


def with_onnx_vocabulary(table: EmbeddingTable, found: OnnxVocab | None, warnings: list[str]) -> EmbeddingTable:
    """``table`` with the vocabulary of the CategoryMapper feeding it: used when Keras gave none (a
    SavedModel), else checked against Keras's (``metadata["vocabulary"]["onnx_check"]``)."""
    if found is None:
        return table
    if table.vocab is None:
        oov = found.vocabulary.oov_id
        return replace(table, vocab=found.vocabulary, oov_id=oov if oov is not None and oov < table.rows else None,
                       metadata={**table.metadata, "vocabulary": found.metadata})
    problem = _vocab_mismatch(table.vocab, found)
    meta = dict(table.metadata.get("vocabulary") or {})
    meta["onnx_check"] = f"the ONNX CategoryMapper {found.metadata.get('node')!r} {'differs' if problem else 'agrees'}"
    if problem:
        warnings.append(f"table {table.name!r}: the vocabulary of the ONNX CategoryMapper differs from Keras's "
                        f"({problem}); the Keras vocabulary is stored")
    return replace(table, metadata={**table.metadata, "vocabulary": meta})


def _vocab_mismatch(keras_vocab: Vocabulary, found: OnnxVocab) -> str | None:
    """The first id whose token (or the OOV id) differs between Keras and the CategoryMapper; None if they agree.

    Ids the mapper does not name (the mask id, the OOV id) are not compared by token.
    """
    skip = set(found.metadata.get("unnamed_ids", ())) | {found.vocabulary.oov_id}
    ours, theirs = keras_vocab.tokens, found.vocabulary.tokens
    for i, token in enumerate(theirs):
        if i not in skip and (i >= len(ours) or ours[i] != token):
            return f"id {i}: Keras {ours[i] if i < len(ours) else None!r}, ONNX {token!r}"
    if keras_vocab.oov_id != found.vocabulary.oov_id:
        return f"OOV id: Keras {keras_vocab.oov_id}, ONNX {found.vocabulary.oov_id}"
    return None
