"""Synthetic benchmark inputs: tables written as real stores (then memory-mapped) and id batches."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from benchmarks.config import TableSpec
from bridge.store import write_store
from bridge.table import EmbeddingTable
from bridge.vocab import Vocabulary

_CHUNK_ROWS = 1 << 16


def random_matrix(rows: int, dim: int, seed: int) -> np.ndarray:
    """A float32 ``[rows, dim]`` matrix of standard-normal values, generated in chunks."""
    rng = np.random.default_rng(seed)
    data = np.empty((rows, dim), np.float32)
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(rows, start + _CHUNK_ROWS)
        data[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return data


def make_store_table(spec: TableSpec, root: Path, seed: int, vocab: Vocabulary | None = None) -> EmbeddingTable:
    """Write ``spec`` as a one-table store under ``root`` and return it memory-mapped, pages touched.

    The benchmark serves tables the way users do: from a store, through a read-only memory map. The
    pages are touched once here so that no variant pays the first-touch page faults.
    """
    data = random_matrix(spec.rows, spec.dim, seed)
    table = EmbeddingTable(name=spec.name, data=data, vocab=vocab)
    store = write_store(root / spec.name, [table])
    del table, data
    opened = store[spec.name]
    prefault(opened.data)
    return opened


def prefault(data: np.ndarray) -> float:
    """Read one value per 4 KiB page of ``data`` so every page is mapped; returns their sum."""
    flat = np.asarray(data).reshape(-1)
    step = max(1, 4096 // flat.itemsize)
    return float(flat[::step].sum(dtype=np.float64))


def make_ids(rows: int, batch: int, distribution: str, rng: np.random.Generator, zipf_s: float = 1.0) -> np.ndarray:
    """``batch`` int64 ids in ``[0, rows)``: ``uniform``, or ``zipf`` (id k drawn with weight 1/(k+1)^s).

    Zipf ids model a vocabulary sorted by frequency: low ids are hot, and they sit together at the start
    of the table, as in real word-frequency-ordered vocabularies.
    """
    if distribution == "uniform":
        return rng.integers(0, rows, size=batch, dtype=np.int64)
    if distribution == "zipf":
        cdf = _zipf_cdf(rows, float(zipf_s))
        ids = np.searchsorted(cdf, rng.random(batch), side="right")
        return np.minimum(ids, rows - 1).astype(np.int64)
    raise ValueError(f"unknown distribution {distribution!r}")


@lru_cache(maxsize=4)
def _zipf_cdf(rows: int, s: float) -> np.ndarray:
    weights = 1.0 / np.power(np.arange(1, rows + 1, dtype=np.float64), s)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf.flags.writeable = False
    return cdf


def token_vocabulary(size: int) -> Vocabulary:
    """``size`` distinct word-like tokens (``w0``, ``w1``, ...)."""
    return Vocabulary([f"w{i}" for i in range(size)])
