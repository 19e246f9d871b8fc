"""Map ONNX tables back to a torch module's ``state_dict`` keys, by value.

Exporters rename and merge weights (the dynamo exporter names a tied table after the head,
``head.weight``, while the legacy exporter keeps ``emb.weight``), so names are not a key; the
bytes are (hash, then exact comparison, :func:`converters.keras_map.match_tables`). A tied
weight matches several keys; keys owned by an ``nn.Embedding``/``nn.EmbeddingBag`` come first,
so a table is named after its embedding, not after the head that reuses it.
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


def _is_embedding(obj: Any) -> bool:
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
        (first if _is_embedding(owner) and _leaf(key) == "weight" else rest).append(cand)
    return first + rest


def map_tables(tables: Sequence[np.ndarray], module: Any) -> list[list[Candidate]]:
    """For each table, the state_dict entries whose value equals it bit for bit (several for a tied weight)."""
    return match_tables(tables, state_dict_candidates(module))


def module_metadata(candidates: Sequence[Candidate]) -> dict[str, Any]:
    """What the owning modules say about a table: keys, classes, padding_idx, bag mode, max_norm."""
    info: dict[str, Any] = {"keys": [c.weight for c in candidates],
                            "modules": {c.layer: type(c.obj).__name__ for c in candidates}}
    emb = next((c.obj for c in candidates if _is_embedding(c.obj)), None)
    if emb is not None:
        info["padding_idx"] = emb.padding_idx
        info["max_norm"] = emb.max_norm
        if hasattr(emb, "mode"):
            info["mode"] = emb.mode
    return info


def embedding_keys(module: Any) -> list[str]:
    """The ``weight`` keys of every ``nn.Embedding``/``nn.EmbeddingBag`` in ``module``'s state_dict."""
    return [c.weight for c in state_dict_candidates(module) if _is_embedding(c.obj) and _leaf(c.weight) == "weight"]


__all__ = ["ROOT", "embedding_keys", "map_tables", "module_metadata", "module_path", "state_dict_candidates"]
