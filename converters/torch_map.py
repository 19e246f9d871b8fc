"""Map ONNX tables back to a torch module's ``state_dict`` keys, by value.

Exporters rename and merge weights (the dynamo exporter names a tied table after the head,
``head.weight``, while the legacy exporter keeps ``emb.weight``), so names are not a key; the
bytes are (hash, then exact comparison, :func:`converters.keras_map.match_tables`). A tied
weight matches several keys; keys owned by an ``nn.Embedding``/``nn.EmbeddingBag`` come first,
so a table is named after its embedding, not after the head that reuses it. Several embeddings on one
table (a shared weight) give it a ``padding_idx`` only where they all agree (:func:`module_metadata`).

TorchScript modules are mapped too: a scripted ``nn.Embedding`` keeps its ``padding_idx``, ``max_norm`` and
``mode``; a traced one (``torch.jit.trace``) keeps none of them (:func:`opaque_embeddings`). Each table is
named after its key where that key is a usable table name (:func:`table_names`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from bridge.names import unique_name_nocase
from bridge.scan import default_table_name
from converters.keras_map import Candidate, match_tables
from converters.torch_embedding import array_from_tensor, import_torch

ROOT = "(root)"  # the module path of a parameter registered on the top module itself
_SCRIPTED = re.compile(r"__torch__\.torch\.nn\.modules\.sparse\.(Embedding|EmbeddingBag)")
_MANGLE = re.compile(r"___torch_mangle_\d+\.")


def module_path(key: str) -> str:
    """``"enc.tok.weight"`` -> ``"enc.tok"``; a top-level key -> :data:`ROOT`."""
    return key.rsplit(".", 1)[0] if "." in key else ROOT


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _owners(module: Any) -> dict[str, Any]:
    """``{module path: module}`` of every submodule under each of its paths (works on TorchScript modules too,
    which have no ``get_submodule``)."""
    owners = {path: sub for path, sub in module.named_modules(remove_duplicate=False) if path}
    owners[ROOT] = module
    return owners


def is_embedding(obj: Any) -> bool:
    """Whether ``obj`` is an ``nn.Embedding`` or ``nn.EmbeddingBag`` (a live module: hooks, ``max_norm``)."""
    torch = import_torch()
    return isinstance(obj, (torch.nn.Embedding, torch.nn.EmbeddingBag))


def embedding_kind(obj: Any) -> str | None:
    """``"Embedding"`` or ``"EmbeddingBag"`` for those modules, scripted or traced ones included, else None.

    A TorchScript module is recognized by its TorchScript type (``torch.nn.modules.sparse.Embedding``),
    not by its class name, so a user's own class named ``Embedding`` is not taken for one.
    """
    torch = import_torch()
    if isinstance(obj, torch.nn.EmbeddingBag):
        return "EmbeddingBag"
    if isinstance(obj, torch.nn.Embedding):
        return "Embedding"
    if not isinstance(obj, torch.jit.ScriptModule):
        return None
    qualified = str(getattr(getattr(obj, "_c", None), "qualified_name", ""))
    match = _SCRIPTED.fullmatch(_MANGLE.sub("", qualified))
    return match.group(1) if match else None


def is_traced(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.jit.trace`` module (which keeps no ``padding_idx`` or ``max_norm``)."""
    torch = import_torch()
    return isinstance(obj, torch.jit.TracedModule)


def state_dict_candidates(module: Any) -> list[Candidate]:
    """Every 2-D tensor of ``module.state_dict()``; embedding weights first, then the rest, each in key order.

    Entries that are not tensors (a module's ``get_extra_state``) are skipped.
    """
    torch = import_torch()
    owners = _owners(module)
    first: list[Candidate] = []
    rest: list[Candidate] = []
    for key, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            continue
        owner = owners.get(module_path(key))
        cand = Candidate(module_path(key), key, tuple(int(d) for d in tensor.shape),
                         partial(array_from_tensor, tensor), primary=True, obj=owner)
        (first if embedding_kind(owner) and _leaf(key) == "weight" else rest).append(cand)
    return first + rest


def map_tables(tables: Sequence[np.ndarray], module: Any) -> list[list[Candidate]]:
    """For each table, the state_dict entries whose value equals it bit for bit (several for a tied weight)."""
    return match_tables(tables, state_dict_candidates(module))


def embedding_settings(candidates: Sequence[Candidate]) -> dict[str, dict[str, Any]]:
    """``{module path: {"padding_idx", "max_norm"[, "mode"]}}`` of every embedding among ``candidates``.

    A traced embedding keeps none of them: its settings read None (:func:`opaque_embeddings` names it).
    """
    out: dict[str, dict[str, Any]] = {}
    for cand in candidates:
        kind = embedding_kind(cand.obj)
        if kind is None:
            continue
        out[cand.layer] = {"padding_idx": getattr(cand.obj, "padding_idx", None),
                           "max_norm": getattr(cand.obj, "max_norm", None)}
        if kind == "EmbeddingBag":
            out[cand.layer]["mode"] = getattr(cand.obj, "mode", None)
    return out


def opaque_embeddings(candidates: Sequence[Candidate]) -> list[str]:
    """The module paths of the traced embeddings among ``candidates``: their ``padding_idx`` is unknown."""
    return [c.layer for c in candidates if embedding_kind(c.obj) and is_traced(c.obj)]


def _agreed(settings: dict[str, dict[str, Any]], key: str) -> Any:
    """The one value of ``key`` all embeddings give (None when they disagree)."""
    return None if conflicts(settings, key) else next(iter(settings.values())).get(key)


def module_metadata(candidates: Sequence[Candidate]) -> dict[str, Any]:
    """What the owning modules say about a table: keys, classes, padding_idx, bag mode, max_norm.

    A table shared by several embeddings (one weight, or equal weights) gets a setting only where they
    all agree; with more than one embedding, ``"embeddings"`` holds each one's own settings, in key order.
    """
    info: dict[str, Any] = {"keys": [c.weight for c in candidates],
                            "modules": {c.layer: _class_name(c.obj) for c in candidates}}
    settings = embedding_settings(candidates)
    if settings:
        info["padding_idx"] = _agreed(settings, "padding_idx")
        info["max_norm"] = _agreed(settings, "max_norm")
        if any("mode" in s for s in settings.values()):
            info["mode"] = _agreed(settings, "mode")
    if len(settings) > 1:
        info["embeddings"] = settings
    return info


def _class_name(obj: Any) -> str:
    """The class name of ``obj``; a TorchScript module's original class (``"Embedding"``, not
    ``"RecursiveScriptModule"``)."""
    torch = import_torch()
    scripted = isinstance(obj, torch.jit.ScriptModule)
    return str(getattr(obj, "original_name", None) if scripted else type(obj).__name__)


def conflicts(settings: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """``{module path: value}`` of ``key`` when the embeddings in ``settings`` disagree on it, else ``{}``."""
    values = {layer: s.get(key) for layer, s in settings.items()}
    first = next(iter(values.values()), None)
    return values if any(v != first for v in values.values()) else {}


def embedding_keys(module: Any) -> list[str]:
    """The ``weight`` keys of every ``nn.Embedding``/``nn.EmbeddingBag`` in ``module``'s state_dict."""
    return [c.weight for c in state_dict_candidates(module) if embedding_kind(c.obj) and _leaf(c.weight) == "weight"]


# ----------------------------------------------------------------------------- table names


def usable_name(key: str) -> bool:
    """Whether ``key`` can be a table name as it is: non-empty, printable, no surrounding spaces and no comma
    (``embridge parity --tables a,b`` splits on commas and strips spaces, so such a name could not be chosen)."""
    return bool(key) and key.isprintable() and key == key.strip() and "," not in key


def _altered(key: str) -> str:
    """``key`` made usable: each comma or unprintable character replaced by ``_``, surrounding spaces dropped."""
    return "".join(c if c.isprintable() and c != "," else "_" for c in key).strip() or "table"


def _exact_names(keys: Sequence[str | None]) -> dict[int, str]:
    """``{table index: key}`` for each table whose key is usable as it is (the first table of a repeated key)."""
    exact: dict[int, str] = {}
    for i, key in enumerate(keys):
        if key is not None and usable_name(key) and key not in exact.values():
            exact[i] = key
    return exact


def table_names(keys: Sequence[str | None], initializers: Sequence[str]) -> tuple[list[str], list[str]]:
    """A unique table name for each table, and a warning for each key that could not be its name as it is.

    ``keys[i]`` is the state_dict key table ``i`` is named after (None when it matched none; it is then named
    from ``initializers[i]`` by :func:`bridge.scan.default_table_name`). A usable key (:func:`usable_name`)
    is the name exactly, and exact keys win: a name made for another table (an altered key, an initializer,
    a key already taken) gets a ``_2``, ``_3``, ... suffix rather than a name some table's exact key owns.
    """
    exact = _exact_names(keys)
    taken = set(exact.values())
    names: list[str] = []
    warns: list[str] = []
    for i, key in enumerate(keys):
        if i in exact:
            name = exact[i]
        elif key is None:
            name = default_table_name(initializers[i], taken)
        else:
            name = unique_name_nocase(_altered(key), taken)
            why = ("another table has that name" if usable_name(key) else "a table name holds no comma, no "
                   "unprintable character and no surrounding space (embridge parity --tables splits on commas)")
            warns.append(f"table {name!r} holds state_dict key {key!r}: renamed, as {why}")
        taken.add(name)
        names.append(name)
    return names, warns


__all__ = ["ROOT", "conflicts", "embedding_keys", "embedding_kind", "embedding_settings", "is_embedding", "is_traced",
           "map_tables", "module_metadata", "module_path", "opaque_embeddings", "state_dict_candidates", "table_names",
           "usable_name"]
