"""Vocabularies read from an ONNX model: the ``ai.onnx.ml`` ``CategoryMapper`` whose ids feed a table's Gather.

tf2onnx turns a Keras ``StringLookup`` into ``CategoryMapper(cats_strings, cats_int64s,
default_int64)``: token ``cats_strings[i]`` has id ``cats_int64s[i]``, any other token gets
``default_int64`` (the OOV id). The ids may pass through index arithmetic on their way to the
Gather (Keras's negative-id wrap: ``Add``, ``Mul``, ``Cast``, ``Where``, reshapes); a cast to bool
(a mask test) ends the path. So ``embridge extract`` on an ONNX file recovers the vocabulary of a
table fed by a lookup, without the framework that made the model.

Ids no category names (the mask id of a StringLookup with a mask token, for instance) get the
placeholder token ``[unusedN]``; the default id gets ``[UNK]`` unless a category already uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from bridge.onnx_io import iter_graphs, node_label
from bridge.scan import TableRef, scan
from bridge.table import EmbeddingTable
from bridge.vocab import Vocabulary

#: Ops an id passes through between a CategoryMapper and a Gather (Keras's wrap, casts, reshapes).
INDEX_OPS = frozenset({
    "Add", "Sub", "Mul", "Cast", "Identity", "Where", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
    "Max", "Min", "Clip", "Expand",
})
_ML = "ai.onnx.ml"
_MAX_STEPS = 256
OOV_TOKEN = "[UNK]"


@dataclass(frozen=True)
class OnnxVocab:
    """A vocabulary read from a CategoryMapper, and what the table metadata records about it."""

    vocabulary: Vocabulary
    metadata: dict[str, Any] = field(default_factory=dict)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def mapper_vocabulary(node: onnx.NodeProto, label: str = "") -> OnnxVocab | None:
    """The string -> id vocabulary of a CategoryMapper node, or None if it maps nothing."""
    strings_attr, ids_attr = _attr(node, "cats_strings"), _attr(node, "cats_int64s")
    if strings_attr is None or ids_attr is None or len(strings_attr.strings) != len(ids_attr.ints):
        return None
    pairs = zip(strings_attr.strings, ids_attr.ints, strict=True)
    cats = [(s.decode("utf-8", errors="surrogateescape"), int(i)) for s, i in pairs]
    default_attr = _attr(node, "default_int64")
    default = int(default_attr.i) if default_attr is not None else -1
    if not cats or min(i for _, i in cats) < 0:
        return None
    size = max(max(i for _, i in cats), default) + 1
    tokens: list[str | None] = [None] * size
    aliases = 0
    for token, i in cats:
        if tokens[i] is None:
            tokens[i] = token
        else:
            aliases += 1
    named = {t for t in tokens if t is not None}
    oov_id = default if default >= 0 else None
    if oov_id is not None and tokens[oov_id] is None:
        tokens[oov_id] = OOV_TOKEN if OOV_TOKEN not in named else None
    gaps = [i for i, t in enumerate(tokens) if t is None]
    filled = [t if t is not None else f"[unused{i}]" for i, t in enumerate(tokens)]
    meta: dict[str, Any] = {"source": "onnx CategoryMapper", "node": label or node.name, "categories": len(cats),
                            "default_int64": default}
    if gaps:
        meta["unnamed_ids"] = gaps
    if aliases:
        meta["aliases"] = f"{aliases} token(s) share an id with an earlier token; only the first is listed"
    reserved = {"oov": oov_id} if oov_id is not None else {}
    return OnnxVocab(Vocabulary(filled, oov_id=oov_id, reserved=reserved, source="onnx_category_mapper"), meta)


def _is_bool_cast(node: onnx.NodeProto) -> bool:
    to = _attr(node, "to")
    return node.op_type == "Cast" and to is not None and to.i == onnx.TensorProto.BOOL


def feeding_mappers(graph: onnx.GraphProto, gather: onnx.NodeProto) -> list[tuple[int, onnx.NodeProto]]:
    """The string -> id CategoryMappers whose output reaches ``gather``'s indices through :data:`INDEX_OPS`."""
    producers = {out: (i, node) for i, node in enumerate(graph.node) for out in node.output if out}
    stack, seen = [gather.input[1]] if len(gather.input) > 1 else [], set()
    found: dict[int, onnx.NodeProto] = {}
    steps = 0
    while stack and steps < _MAX_STEPS:
        name = stack.pop()
        steps += 1
        if name in seen or name not in producers:
            continue
        seen.add(name)
        position, node = producers[name]
        if node.op_type == "CategoryMapper" and node.domain == _ML:
            found[position] = node
        elif node.op_type in INDEX_OPS and node.domain in ("", "ai.onnx") and not _is_bool_cast(node):
            stack.extend(i for i in node.input if i)
    return sorted(found.items())


def onnx_vocabularies(model: onnx.ModelProto, refs: Sequence[TableRef] | None = None) -> dict[str, OnnxVocab]:
    """``{table initializer: OnnxVocab}`` for tables whose Gathers are fed by one CategoryMapper.

    A table fed by several different mappers gets none (``refs`` default to :func:`bridge.scan.scan`).
    """
    graphs = dict(iter_graphs(model))
    out: dict[str, OnnxVocab] = {}
    for ref in scan(model) if refs is None else refs:
        vocabs: dict[tuple[tuple[str, ...], int | None], OnnxVocab] = {}
        for use in ref.gathers:
            graph = graphs.get(use.graph)
            if graph is None:
                continue
            gather = next((n for i, n in enumerate(graph.node) if node_label(n, i) == use.node), None)
            for position, mapper in feeding_mappers(graph, gather) if gather is not None else []:
                vocab = mapper_vocabulary(mapper, node_label(mapper, position))
                if vocab is not None:
                    vocabs[(tuple(vocab.vocabulary.tokens), vocab.vocabulary.oov_id)] = vocab
        if len(vocabs) == 1:
            out[ref.initializer] = next(iter(vocabs.values()))
    return out


def attach_onnx_vocabularies(model: onnx.ModelProto, tables: Sequence[EmbeddingTable]) -> list[EmbeddingTable]:
    """``tables`` with the CategoryMapper vocabulary set on each table that has none (matched by initializer)."""
    vocabs = onnx_vocabularies(model)
    out = []
    for table in tables:
        found = vocabs.get(table.initializer or "")
        if found is None or table.vocab is not None:
            out.append(table)
            continue
        oov = found.vocabulary.oov_id
        out.append(replace(table, vocab=found.vocabulary, oov_id=oov if oov is not None and oov < table.rows else None,
                           metadata={**table.metadata, "vocabulary": found.metadata}))
    return out
