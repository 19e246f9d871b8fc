"""Token lookups: ``lookup.tokens(words)`` on every adapter against gensim ``kv[words]``, round-robin.

The table has ``token_vocab`` word-like tokens (``w0`` ...); the ``tokens`` words are drawn Zipf-distributed
(word k with weight 1/(k+1)), as in running text. Every variant is checked against ``np.take`` first.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.config import BenchConfig, TableSpec
from benchmarks.data import make_ids, make_store_table, token_vocabulary
from benchmarks.harness import Bound, round_robin
from benchmarks.lookup_bench import check
from benchmarks.variants import Cell
from bridge.table import EmbeddingTable
from bridge.vocab import Vocabulary

GENSIM = "gensim.kv[words]"


def run_tokens(cfg: BenchConfig, tmp: Path, progress: Any) -> dict[str, Any] | None:
    """Time token lookups; ``None`` when ``cfg.tokens`` is 0."""
    if cfg.tokens <= 0:
        return None
    progress.set_description(f"tokens: building a {cfg.token_vocab:,}-token table")
    spec = TableSpec("tokens", cfg.token_vocab, cfg.token_dim)
    vocab = token_vocabulary(cfg.token_vocab)
    table = make_store_table(spec, tmp, cfg.seed + 1000, vocab=vocab)
    rows = make_ids(spec.rows, cfg.tokens, "zipf", np.random.default_rng(cfg.seed + 1), cfg.zipf_s)
    words = [vocab.tokens[i] for i in rows.tolist()]
    reference = np.take(np.asarray(table.data), rows, axis=0)
    cell = Cell(ids=rows, out=np.empty((0, spec.dim), np.float32))  # no token variant writes into out=
    bounds, skipped, errors = _bind_all(table, vocab, words, cfg)
    plans: dict[str, tuple[int, int]] = {}
    for name in list(bounds):
        progress.set_description(f"tokens: warming up {name}")
        try:
            check(bounds[name], cell, reference)  # also the warm-up call: one call lasts 0.1-3 s
            plans[name] = (1, cfg.token_repeats)
        except Exception as exc:  # noqa: BLE001 - recorded, the others still run
            errors.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
            del bounds[name]
    progress.set_description(f"tokens: timing {len(bounds)} variants on {cfg.tokens:,} tokens")
    stats = round_robin(bounds, plans, seed=cfg.seed)
    progress.update(1)
    return _summary(cfg, stats, skipped, errors)


def _bind_all(table: EmbeddingTable, vocab: Vocabulary, words: list[str], cfg: BenchConfig
              ) -> tuple[dict[str, Bound], list[dict[str, str]], list[dict[str, str]]]:
    from bridge.backends import available_backends, lookup

    bounds: dict[str, Bound] = {}
    skipped: list[dict[str, str]] = []
    errors: list[dict[str, str]] = []
    for backend in available_backends():
        try:
            lk = lookup(table, backend, threads=1)
        except Exception as exc:  # noqa: BLE001
            errors.append({"variant": f"bridge.{backend}.tokens", "error": f"{type(exc).__name__}: {exc}"})
            continue
        bounds[f"bridge.{backend}.tokens"] = Bound(partial(lk.tokens, words))
    data = np.asarray(table.data)
    bounds["vocab.ids+np.take"] = Bound(lambda: np.take(data, vocab.ids(words), axis=0))
    if not cfg.gensim:
        skipped.append({"variant": GENSIM, "reason": "disabled (--no-gensim)"})
    elif importlib.util.find_spec("gensim") is None:
        skipped.append({"variant": GENSIM, "reason": "gensim is not installed (pip install gensim)"})
    else:
        from gensim.models import KeyedVectors

        kv = KeyedVectors(vector_size=table.dim, count=0, dtype=np.float32)
        kv.add_vectors(vocab.tokens, data)
        bounds[GENSIM] = Bound(partial(kv.__getitem__, words))
    return bounds, skipped, errors


def _summary(cfg: BenchConfig, stats: dict[str, Any], skipped: list[dict[str, str]],
             errors: list[dict[str, str]]) -> dict[str, Any]:
    gensim = stats.get(GENSIM)
    results = []
    for name, s in stats.items():
        row = {"variant": name, **s.to_json(), "per_token_s": s.median / cfg.tokens}
        row["speedup_vs_gensim"] = gensim.median / s.median if gensim is not None else None
        results.append(row)
    return {"tokens": cfg.tokens, "vocab": cfg.token_vocab, "dim": cfg.token_dim, "distribution": "zipf",
            "results": results, "skipped": skipped, "errors": errors}
