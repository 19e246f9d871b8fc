"""Vocabularies read from an ONNX model: the ``ai.onnx.ml`` ``CategoryMapper`` whose ids feed a table's Gather.

tf2onnx turns a Keras ``StringLookup`` into ``CategoryMapper(cats_strings, cats_int64s,
default_int64)``: token ``cats_strings[i]`` has id ``cats_int64s[i]``, any other token gets
``default_int64`` (the OOV id). The ids may pass through index arithmetic on their way to the
Gather (Keras's negative-id wrap: ``Add``, ``Mul``, ``Cast``, ``Where``, reshapes); a cast to bool
(a mask test) ends the path. So ``embridge extract`` on an ONNX file recovers the vocabulary of a
table fed by a lookup, without the framework that made the model.

Ids no category names (the mask id of a StringLookup with a mask token, for instance) get the
placeholder line ``[unusedN]`` and are listed as unnamed, so no token maps to them; the default id
gets ``[UNK]`` unless a category already uses that id or that string. Strings sharing an id are kept
as aliases, and a repeated string counts with its last id, so every token maps where onnxruntime's
CategoryMapper sends it.
Ids are bounded by the table's rows (an id beyond them names no row): a vocabulary never has more
entries than its table, whatever ids a model's mapper holds (see :func:`mapper_vocabulary`).

Tables are matched by :attr:`bridge.scan.TableRef.key` (graph path and initializer), so each branch
of an ``If`` defining its own ``W`` gets its own vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from bridge.onnx_io import iter_graphs, node_label
from bridge.scan import TableKey, TableRef, scan, stored_ref
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


def _categories(node: onnx.NodeProto) -> list[tuple[str, int]] | None:
    """``(token, id)`` of each category of a CategoryMapper; None if it has none, or a negative id."""
    strings_attr, ids_attr = _attr(node, "cats_strings"), _attr(node, "cats_int64s")
    if strings_attr is None or ids_attr is None or len(strings_attr.strings) != len(ids_attr.ints):
        return None
    pairs = zip(strings_attr.strings, ids_attr.ints, strict=True)
    cats = [(s.decode("utf-8", errors="surrogateescape"), int(i)) for s, i in pairs]
    return cats if cats and min(i for _, i in cats) >= 0 else None


def mapper_vocabulary(node: onnx.NodeProto, label: str = "", *, rows: int) -> OnnxVocab | None:
    """The string -> id vocabulary of a CategoryMapper node feeding a table of ``rows`` rows, or None if
    it maps nothing.

    Every token maps to the id onnxruntime gives it: a string listed twice counts with its last id,
    and strings sharing an id are all kept (the first one on the id's line, the others as
    :attr:`~bridge.vocab.Vocabulary.aliases`). Ids no string names get a placeholder line and are
    :attr:`~bridge.vocab.Vocabulary.unnamed`, so a token spelled like a placeholder is still unknown.

    Ids are bounded by the table: a category whose id is ``>= rows`` names no row (the model's Gather
    fails on it), so it is left out, and is then an unknown token (the OOV id, if any, where the
    model fails); a ``default_int64 >= rows`` gives no OOV id. Both are noted in
    ``metadata["out_of_range"]``. The vocabulary never has more than ``rows`` entries, whatever ids
    the node holds; None when no category has a row.
    """
    cats = _categories(node)
    mapping = dict(cats) if cats is not None else {}  # the last id of a repeated string wins, as in onnxruntime
    kept = {token: i for token, i in mapping.items() if i < rows}
    if not kept:
        return None
    assert cats is not None
    default_attr = _attr(node, "default_int64")
    default = int(default_attr.i) if default_attr is not None else -1
    oov_id = default if 0 <= default < rows else None
    tokens = _placed(kept, oov_id)
    unnamed = tuple(i for i, t in enumerate(tokens) if t is None)
    filled = [t if t is not None else f"[unused{i}]" for i, t in enumerate(tokens)]
    aliases = {token: i for token, i in kept.items() if tokens[i] != token}
    meta: dict[str, Any] = {"source": "onnx CategoryMapper", "node": label or node.name, "categories": len(cats),
                            "default_int64": default}
    if unnamed:
        meta["unnamed_ids"] = list(unnamed)
    if aliases:
        meta["aliases"] = f"{len(aliases)} token(s) share an id with another token; the store lists them as aliases"
    if len(mapping) < len(cats):
        meta["repeated"] = (f"{len(cats) - len(mapping)} category string(s) repeat; "
                            "the last id counts, as in onnxruntime")
    beyond = _out_of_range(len(mapping) - len(kept), default, rows)
    if beyond:
        meta["out_of_range"] = beyond
    reserved = {"oov": oov_id} if oov_id is not None else {}
    vocabulary = Vocabulary(filled, oov_id=oov_id, reserved=reserved, source="onnx_category_mapper",
                            aliases=aliases, unnamed=unnamed)
    return OnnxVocab(vocabulary, meta)


def _placed(kept: dict[str, int], oov_id: int | None) -> list[str | None]:
    """The first token of each id at that id (``[UNK]`` at a free ``oov_id`` unless it is a category),
    sized by the largest id; None where no token names the id. Callers bound the ids."""
    tokens: list[str | None] = [None] * (max(max(kept.values()), -1 if oov_id is None else oov_id) + 1)
    for token, i in kept.items():
        if tokens[i] is None:
            tokens[i] = token
    if oov_id is not None and tokens[oov_id] is None and OOV_TOKEN not in kept:
        tokens[oov_id] = OOV_TOKEN  # unknown tokens get oov_id anyway, [UNK] included
    return tokens


def _out_of_range(dropped: int, default: int, rows: int) -> str:
    """The note on ids the table has no row for ('' when there are none)."""
    notes = [f"{dropped} token(s) map to an id >= {rows}, the table's rows; they are not listed"] if dropped else []
    if default >= rows:
        notes.append(f"default_int64 {default} is >= {rows}, the table's rows; unknown tokens get no OOV id")
    return "; ".join(notes)


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


def _row_bound(ref: TableRef) -> int:
    """The most ids a vocabulary of ``ref`` may name: its rows, or 0 for a table holding no values (a
    ``[2**40, 0]`` table is a few bytes of model; its rows must not size a list)."""
    return ref.shape[0] if len(ref.shape) == 2 and ref.shape[1] > 0 else 0


def _vocabulary(ref: TableRef, graphs: dict[str, onnx.GraphProto]) -> OnnxVocab | None:
    """The one vocabulary of the CategoryMappers feeding ``ref``'s Gathers; None if none, or several differ."""
    vocabs: dict[tuple[Any, ...], OnnxVocab] = {}
    for use in ref.gathers:
        graph = graphs.get(use.graph)
        if graph is None:
            continue
        gather = next((n for i, n in enumerate(graph.node) if node_label(n, i) == use.node), None)
        for position, mapper in feeding_mappers(graph, gather) if gather is not None else []:
            vocab = mapper_vocabulary(mapper, node_label(mapper, position), rows=_row_bound(ref))
            if vocab is not None:
                v = vocab.vocabulary
                vocabs[(tuple(v.tokens), v.oov_id, tuple(sorted(v.aliases.items())), v.unnamed)] = vocab
    return next(iter(vocabs.values())) if len(vocabs) == 1 else None


def onnx_vocabularies(model: onnx.ModelProto, refs: Sequence[TableRef] | None = None
                      ) -> dict[TableKey, OnnxVocab]:
    """``{ref.key: OnnxVocab}`` for tables whose Gathers are fed by one CategoryMapper.

    A table fed by several different mappers gets none (``refs`` default to :func:`bridge.scan.scan`).
    """
    graphs = dict(iter_graphs(model))
    found = {ref.key: _vocabulary(ref, graphs) for ref in (scan(model) if refs is None else refs)}
    return {key: vocab for key, vocab in found.items() if vocab is not None}


def attach_onnx_vocabularies(model: onnx.ModelProto, tables: Sequence[EmbeddingTable]) -> list[EmbeddingTable]:
    """``tables`` with the CategoryMapper vocabulary set on each table that has none (matched by
    graph and initializer, see :func:`bridge.scan.stored_ref`)."""
    refs = scan(model)
    vocabs = onnx_vocabularies(model, refs)
    out = []
    for table in tables:
        ref = stored_ref(table.initializer, table.metadata, refs)
        found = vocabs.get(ref.key) if ref is not None else None
        if found is None or table.vocab is not None:
            out.append(table)
            continue
        oov = found.vocabulary.oov_id
        out.append(replace(table, vocab=found.vocabulary, oov_id=oov if oov is not None and oov < table.rows else None,
                           metadata={**table.metadata, "vocabulary": found.metadata}))
    return out
