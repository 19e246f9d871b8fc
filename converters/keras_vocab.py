"""Vocabularies of ``StringLookup`` / ``IntegerLookup`` / ``TextVectorization`` layers whose ids feed an ``Embedding``.

The link is read from the Functional graph: an Embedding's input tensor was produced by a
lookup layer, directly or through the input of a nested Functional model. Subclassed models
have no graph to read; their tables get no vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from bridge.errors import UnsupportedError
from bridge.vocab import Vocabulary
from converters.keras_env import import_keras
from converters.keras_layers import LayerEntry, iter_layers, node_tensors
from converters.keras_text import is_text_vectorization, text_settings

_MAX_DEPTH = 64


@dataclass(frozen=True)
class LookupVocab:
    """A lookup layer's vocabulary and what the table metadata records about it."""

    layer: str
    vocabulary: Vocabulary
    metadata: dict[str, Any] = field(default_factory=dict)
    #: other lookup layers feeding the same Embedding with a different vocabulary (only this one is stored)
    disagreeing: tuple[str, ...] = ()


def _history_op(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    return getattr(history, "operation", None) or (history[0] if isinstance(history, tuple) else None)


def _outer_inputs(model: Any, entries: list[LayerEntry]) -> dict[int, list[Any]]:
    """For each nested Functional model's input tensor, the outer tensors it was called with."""
    outer: dict[int, list[Any]] = defaultdict(list)
    for layer in [model, *(e.layer for e in entries)]:
        inner = getattr(layer, "inputs", None) if hasattr(layer, "_inbound_nodes") else None
        if not inner:
            continue
        for node in getattr(layer, "_inbound_nodes", []):
            given = node_tensors(node)
            if len(given) == len(inner):
                for inner_t, outer_t in zip(inner, given, strict=True):
                    outer[id(inner_t)].append(outer_t)
    return outer


def _find_lookup(tensor: Any, outer: dict[int, list[Any]], lookup_types: tuple[type, ...], depth: int = 0) -> Any:
    op = _history_op(tensor)
    if op is None or depth > _MAX_DEPTH:
        return None
    if isinstance(op, lookup_types):
        mode = getattr(op, "output_mode", None) or getattr(op, "_output_mode", "int")
        return op if mode == "int" and not getattr(op, "invert", False) else None
    if type(op).__name__ == "InputLayer":
        for given in outer.get(id(tensor), []):
            found = _find_lookup(given, outer, lookup_types, depth + 1)
            if found is not None:
                return found
    return None


def _token_text(token: Any) -> str:
    if isinstance(token, bytes):
        return token.decode("utf-8")
    if hasattr(token, "item") and not isinstance(token, str):
        token = token.item()
    return token.decode("utf-8") if isinstance(token, bytes) else str(token)


def lookup_vocabulary(lookup: Any, path: str) -> LookupVocab:
    """A :class:`Vocabulary` of ``lookup`` (mask, OOV ids reserved; integer tokens as decimal strings)."""
    _, keras = import_keras()
    integer = isinstance(lookup, keras.layers.IntegerLookup)
    text = is_text_vectorization(lookup)
    tokens = [_token_text(t) for t in lookup.get_vocabulary(include_special_tokens=True)]
    inner = lookup._lookup_layer if text else lookup  # TextVectorization looks up with a StringLookup
    has_mask = inner.mask_token is not None
    num_oov = int(inner.num_oov_indices)
    first_oov = 1 if has_mask else 0
    reserved = {"mask": 0} if has_mask else {}
    for i in range(num_oov):
        reserved["oov" if i == 0 else f"oov_{i}"] = first_oov + i
    oov_id = first_oov if num_oov >= 1 else None
    source = "integer_lookup" if integer else ("text_vectorization" if text else "string_lookup")
    vocab = Vocabulary(tokens, oov_id=oov_id, reserved=reserved, source=source)
    meta: dict[str, Any] = {
        "layer": path,
        "keras_class": type(lookup).__name__,
        "token_type": "int" if integer else "str",
        "num_oov_indices": num_oov,
        "mask_token": None if not has_mask else _token_text(inner.mask_token),
        "oov_token": _token_text(inner.oov_token),
    }
    if text:
        meta.update(_pipeline_metadata(lookup))
    if integer:
        meta["note"] = "IntegerLookup tokens are integers, stored as decimal strings"
    if num_oov > 1:
        meta["oov_hashing"] = _oov_hashing(inner, integer, first_oov, num_oov)
    return LookupVocab(layer=path, vocabulary=vocab, metadata=meta)


def _oov_hashing(lookup: Any, integer: bool, first: int, count: int) -> str:
    """The note for ``num_oov_indices > 1``: how Keras picks the OOV id, and that the bridge does not."""
    salted = getattr(lookup, "salt", None) is not None
    if integer and getattr(lookup, "oov_method", "floormod") != "farmhash":
        how = f"token % {count}"
    else:
        how = "SipHash64 with a salt" if salted else "FarmHash64 (tf.strings.to_hash_bucket_fast)"
        how += " of the token" + (" as a decimal string" if integer else "") + f", modulo {count}"
    return (f"Keras hashes OOV tokens into ids {first}..{first + count - 1} ({how}); the bridge does not reproduce "
            "this: token lookups raise VocabularyError for unknown tokens (reserved names the ids oov, oov_1, ...; "
            "oov_id is the first)")


def _pipeline_metadata(layer: Any) -> dict[str, Any]:
    """``text_pipeline`` (settings :mod:`bridge.text` reproduces) or ``text_pipeline_unsupported`` (why not)."""
    try:
        return {"text_pipeline": text_settings(layer).to_json()}
    except UnsupportedError as exc:
        return {"text_pipeline": None, "text_pipeline_unsupported": str(exc)}


def embedding_vocabularies(model: Any) -> dict[int, LookupVocab]:
    """``{id(embedding layer): LookupVocab}`` for Embeddings fed by a lookup layer in ``model``'s graph."""
    _, keras = import_keras()
    entries = iter_layers(model)
    paths = {id(e.layer): e.path for e in entries}
    outer = _outer_inputs(model, entries)
    lookup_types = tuple(getattr(keras.layers, n) for n in ("StringLookup", "IntegerLookup", "TextVectorization")
                         if hasattr(keras.layers, n))
    found: dict[int, LookupVocab] = {}
    for entry in entries:
        if not isinstance(entry.layer, keras.layers.Embedding):
            continue
        vocabs: list[LookupVocab] = []
        for node in getattr(entry.layer, "_inbound_nodes", []):
            tensors = node_tensors(node)
            lookup = _find_lookup(tensors[0], outer, lookup_types) if tensors else None
            if lookup is not None and all(v.layer != paths.get(id(lookup), lookup.name) for v in vocabs):
                vocabs.append(lookup_vocabulary(lookup, paths.get(id(lookup), lookup.name)))
        if vocabs:
            first = vocabs[0].vocabulary
            others = tuple(v.layer for v in vocabs[1:] if (v.vocabulary.tokens, v.vocabulary.oov_id)
                           != (first.tokens, first.oov_id))
            found[id(entry.layer)] = replace(vocabs[0], disagreeing=others)
    return found
