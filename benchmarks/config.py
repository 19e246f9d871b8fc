"""What a benchmark run measures: table sizes, batch sizes, id distributions, repeats and budgets."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bridge.errors import InputError

#: Batch sizes of a full run: powers of 4 from 1 to 1,048,576.
FULL_BATCHES: tuple[int, ...] = tuple(4**k for k in range(11))
#: Batch sizes of ``--quick``.
QUICK_BATCHES: tuple[int, ...] = (1, 64, 4096, 65536)
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "zipf")
#: From this batch size on, each adapter writing into ``out=`` is also timed in pairs against the fastest
#: raw call of its framework (the large-batch target).
PAIRED_MIN_BATCH = 65_536


@dataclass(frozen=True)
class TableSpec:
    """One synthetic float32 table ``[rows, dim]`` (random normal values, written as a store and mmapped)."""

    name: str
    rows: int
    dim: int
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    def label(self) -> str:
        return f"{self.name} ({self.rows:,} x {self.dim} {self.dtype}, {_mib(self.nbytes)})"


SMALL = TableSpec("small", 10_000, 64)  # 2.4 MiB: fits in L2/L3 cache
MEDIUM = TableSpec("medium", 524_288, 256)  # 512 MiB
LARGE = TableSpec("large", 2_097_152, 256)  # 2 GiB, only with --large


@dataclass(frozen=True)
class BenchConfig:
    """Everything that shapes a run; stored verbatim in the JSON document (``config``).

    Timing: each variant is warmed up for ``warmup_s`` (at least two calls), then timed in samples of
    ``inner`` calls (chosen so a sample lasts about ``sample_s``); ``repeats`` samples per variant and cell,
    fewer (but at least ``min_repeats``) where a variant would spend more than ``variant_budget_s`` on one
    cell. Variants are visited round-robin, one sample each per round.

    Cells of at least ``paired_min_batch`` ids then time each ``out=`` adapter against the fastest raw call
    of its framework in ``pairs`` adjacent pairs of samples lasting about ``pair_sample_s`` each
    (``pair_sample_pool_s`` where either runs a thread pool; fewer pairs, but at least ``min_pairs``,
    once ``variant_budget_s`` is spent); see :func:`benchmarks.harness.paired`.
    """

    mode: str = "full"
    tables: tuple[TableSpec, ...] = (SMALL, MEDIUM)
    batches: tuple[int, ...] = FULL_BATCHES
    distributions: tuple[str, ...] = DISTRIBUTIONS
    zipf_s: float = 1.0
    repeats: int = 9
    min_repeats: int = 3
    sample_s: float = 0.01
    warmup_s: float = 0.05
    variant_budget_s: float = 3.0
    pairs: int = 100
    min_pairs: int = 12
    pair_sample_s: float = 0.001
    pair_sample_pool_s: float = 0.02
    paired_min_batch: int = PAIRED_MIN_BATCH
    seed: int = 0
    tensorflow: bool = True
    gensim: bool = True
    variants: tuple[str, ...] = ()  # fnmatch patterns; empty = every variant
    keras_max_batch: int = 1024
    gensim_max_batch: int = 65536
    tokens: int = 1_000_000  # 0 skips the token benchmark
    token_vocab: int = 100_000
    token_dim: int = 64
    token_repeats: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [d for d in self.distributions if d not in DISTRIBUTIONS]
        if bad:
            raise InputError(f"unknown id distribution(s) {bad}; choose from {', '.join(DISTRIBUTIONS)}")
        if not self.tables or not self.batches or not self.distributions:
            raise InputError("a benchmark needs at least one table, one batch size and one id distribution")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise InputError(f"table names must differ, got {names}; give each --table its own NAME")
        if self.seed < 0:
            raise InputError(f"the seed must be >= 0, got {self.seed}")
        _check_memory(self)
        if any(b < 1 for b in self.batches):
            raise InputError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.repeats < 1 or self.min_repeats < 1:
            raise InputError("repeats and min_repeats must be >= 1")
        if self.pairs < 1 or self.min_pairs < 1:
            raise InputError("pairs and min_pairs must be >= 1")
        if min(self.sample_s, self.pair_sample_s, self.pair_sample_pool_s) <= 0:
            raise InputError("sample_s, pair_sample_s and pair_sample_pool_s must be > 0 seconds")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["tables"] = [{**asdict(t), "bytes": t.nbytes} for t in self.tables]
        doc["batches"] = list(self.batches)
        doc["distributions"] = list(self.distributions)
        doc["variants"] = list(self.variants)
        return doc


def full_config(*, large: bool = False, **changes: Any) -> BenchConfig:
    """The default run: small and medium tables (plus large with ``large``), batches 1 .. 1,048,576."""
    tables = (SMALL, MEDIUM, LARGE) if large else (SMALL, MEDIUM)
    return replace(BenchConfig(mode="full", tables=tables), **changes)


def quick_config(*, large: bool = False, **changes: Any) -> BenchConfig:
    """``--quick``: fewer batch sizes, repeats and shorter samples; finishes in well under 2 minutes."""
    tables = (SMALL, MEDIUM, LARGE) if large else (SMALL, MEDIUM)
    base = BenchConfig(
        mode="quick", tables=tables, batches=QUICK_BATCHES, repeats=4, min_repeats=3, sample_s=0.003,
        warmup_s=0.01, variant_budget_s=0.3, pairs=16, min_pairs=6, pair_sample_pool_s=0.002, keras_max_batch=256,
        gensim_max_batch=4096, token_repeats=2,
    )
    return replace(base, **changes)


_TABLE_RE = re.compile(r"^([A-Za-z][\w-]*)=(\d+)x(\d+)$")


def parse_table(text: str) -> TableSpec:
    """``"name=ROWSxDIM"`` -> :class:`TableSpec` (``small``, ``medium``, ``large`` alone name the presets)."""
    presets = {t.name: t for t in (SMALL, MEDIUM, LARGE)}
    if text in presets:
        return presets[text]
    match = _TABLE_RE.match(text.strip())
    if not match or not 1 <= int(match.group(2)) < 2**40 or not 1 <= int(match.group(3)) < 2**20:
        raise InputError(f"bad table {text!r}; write NAME=ROWSxDIM (e.g. tiny=1000x16) or small, medium, large")
    return TableSpec(match.group(1), int(match.group(2)), int(match.group(3)))


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"1,16,256"`` -> ``(1, 16, 256)``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"bad {what} {text!r}; write comma-separated integers, e.g. 1,16,256") from None
    if not values or any(not 1 <= v < 2**40 for v in values):
        raise InputError(f"bad {what} {text!r}; give at least one integer >= 1")
    return tuple(dict.fromkeys(values))  # each once, in the order given


def _check_memory(cfg: BenchConfig) -> None:
    """InputError when the largest table plus the buffers of the largest batch cannot fit in this machine's memory.

    A cell holds the table, the ids, the shared output, the reference copy and the variants' own outputs:
    about four outputs of the batch. Checked before anything runs, so a size typo fails in a second.
    """
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if not physical:
        return
    dim = max(t.dim for t in cfg.tables)
    need = max(t.nbytes for t in cfg.tables) + 4 * max(cfg.batches) * (dim * 4 + 8)
    if need > physical:
        raise InputError(f"these tables and batches need about {_mib(need)} of memory, and this machine has "
                         f"{_mib(physical)}; choose smaller --table or --batches")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
