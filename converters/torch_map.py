"""Map ONNX tables back to a torch module's ``state_dict`` keys, by value.

Exporters rename and merge weights (the dynamo exporter names a tied table after the head,
``head.weight``, while the legacy exporter keeps ``emb.weight``), so names are not a key; the
bytes are (hash, then exact comparison, :func:`converters.keras_map.match_tables`). A tied
weight matches several keys; keys owned by an ``nn.Embedding``/``nn.EmbeddingBag`` come first,
so a table is named after its embedding, not after the head that reuses it. Several embeddings on one
table (a shared weight) give it a ``padding_idx`` only where they all agree (:func:`module_metadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from converters.keras_map import Candidate, match_tables
from converters.torch_embedding import array_from_tensor, import_torch

ROOT = "(root)"  # the module path of a parameter registered on the top module itself


def module_path(key: str) -> str:
    """``"enc.tok.weight"`` -> ``"enc.tok"``; a top-level key -> :data:`ROOT`."""
    return key.rsplit(".", 1)[0] if "." in key else ROOT


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _owner(module: Any, key: str) -> Any:
    path = module_path(key)
    return module if path == ROOT else module.get_submodule(path)


def is_embedding(obj: Any) -> bool:
    """Whether ``obj`` is an ``nn.Embedding`` or ``nn.EmbeddingBag``."""
    torch = import_torch()
    return isinstance(obj, (torch.nn.Embedding, torch.nn.EmbeddingBag))


def state_dict_candidates(module: Any) -> list[Candidate]:
    """Every 2-D tensor of ``module.state_dict()``; embedding weights first, then the rest, each in key order."""
    first: list[Candidate] = []
    rest: list[Candidate] = []
    for key, tensor in module.state_dict().items():
        if tensor.dim() != 2:
            continue
        owner = _owner(module, key)
        cand = Candidate(module_path(key), key, tuple(int(d) for d in tensor.shape),
                         partial(array_from_tensor, tensor), primary=True, obj=owner)
        (first if is_embedding(owner) and _leaf(key) == "weight" else rest).append(cand)
    return first + rest


def map_tables(tables: Sequence[np.ndarray], module: Any) -> list[list[Candidate]]:
    """For each table, the state_dict entries whose value equals it bit for bit (several for a tied weight)."""
    return match_tables(tables, state_dict_candidates(module))


def embedding_settings(candidates: Sequence[Candidate]) -> dict[str, dict[str, Any]]:
    """``{module path: {"padding_idx", "max_norm"[, "mode"]}}`` of every embedding among ``candidates``."""
    out: dict[str, dict[str, Any]] = {}
    for cand in candidates:
        if is_embedding(cand.obj):
            out[cand.layer] = {"padding_idx": cand.obj.padding_idx, "max_norm": cand.obj.max_norm}
            if hasattr(cand.obj, "mode"):
                out[cand.layer]["mode"] = cand.obj.mode
    return out


def _agreed(settings: dict[str, dict[str, Any]], key: str) -> Any:
    """The one value of ``key`` all embeddings give (None when they disagree)."""
    return None if conflicts(settings, key) else next(iter(settings.values())).get(key)


def module_metadata(candidates: Sequence[Candidate]) -> dict[str, Any]:
    """What the owning modules say about a table: keys, classes, padding_idx, bag mode, max_norm.

    A table shared by several embeddings (one weight, or equal weights) gets a setting only where they
    all agree; with more than one embedding, ``"embeddings"`` holds each one's own settings, in key order.
    """
    info: dict[str, Any] = {"keys": [c.weight for c in candidates],
                            "modules": {c.layer: type(c.obj).__name__ for c in candidates}}
    settings = embedding_settings(candidates)
    if settings:
        info["padding_idx"] = _agreed(settings, "padding_idx")
        info["max_norm"] = _agreed(settings, "max_norm")
        if any("mode" in s for s in settings.values()):
            info["mode"] = _agreed(settings, "mode")
    if len(settings) > 1:
        info["embeddings"] = settings
    return info


def conflicts(settings: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """``{module path: value}`` of ``key`` when the embeddings in ``settings`` disagree on it, else ``{}``."""
    values = {layer: s.get(key) for layer, s in settings.items()}
    first = next(iter(values.values()), None)
    return values if any(v != first for v in values.values()) else {}


def embedding_keys(module: Any) -> list[str]:
    """The ``weight`` keys of every ``nn.Embedding``/``nn.EmbeddingBag`` in ``module``'s state_dict."""
    return [c.weight for c in state_dict_candidates(module) if is_embedding(c.obj) and _leaf(c.weight) == "weight"]


__all__ = ["ROOT", "conflicts", "embedding_keys", "embedding_settings", "is_embedding", "map_tables", "module_metadata",
           "module_path", "state_dict_candidates"]
