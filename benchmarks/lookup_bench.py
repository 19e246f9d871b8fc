"""The main run: every table size x id distribution x batch size, all variants round-robin per cell."""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.config import BenchConfig, TableSpec
from benchmarks.data import make_ids, make_store_table
from benchmarks.harness import Bound, Stats, calibrate, paired, plan_samples, round_robin
from benchmarks.machine import CpuMonitor
from benchmarks.variants import Binder, Cell, TableContext, Variant


class MismatchError(Exception):
    """A variant returned different bytes than ``np.take``: it is not timed."""


def run_lookups(cfg: BenchConfig, variants: list[Variant], tmp: Path, progress: Any) -> dict[str, Any]:
    """Run every cell; returns ``{"results", "pairs", "errors", "skipped", "tables"}`` for the JSON document."""
    found: dict[str, list[Any]] = {"results": [], "pairs": [], "errors": [], "skipped": [], "tables": []}
    rng = np.random.default_rng(cfg.seed)
    for number, spec in enumerate(cfg.tables):
        monitor = CpuMonitor()
        started = time.perf_counter()
        progress.set_description(f"{spec.name}: writing {spec.rows:,}x{spec.dim} table")
        table = make_store_table(spec, tmp, cfg.seed + number)
        ctx = TableContext(spec, table, np.asarray(table.data))
        binders = _make_binders(ctx, variants, found["skipped"], progress)
        setup_s = time.perf_counter() - started
        for dist in cfg.distributions:
            for batch in cfg.batches:
                progress.set_description(f"{spec.name} {dist} batch {batch:,}")
                ids = make_ids(spec.rows, batch, dist, rng, cfg.zipf_s)
                results, pairs = run_cell(cfg, ctx, binders, variants, dist, ids, found["errors"])
                found["results"] += results
                found["pairs"] += pairs
                progress.update(1)
        found["tables"].append({"name": spec.name, "rows": spec.rows, "dim": spec.dim, "dtype": spec.dtype,
                                "bytes": spec.nbytes, "setup_s": round(setup_s, 3), "cpu": monitor.report()})
        del ctx, binders, table
        gc.collect()
    return found


def _make_binders(ctx: TableContext, variants: list[Variant], skipped: list[dict[str, Any]],
                  progress: Any) -> dict[str, Binder]:
    binders = {}
    for variant in variants:
        progress.set_description(f"{ctx.spec.name}: preparing {variant.name}")
        try:
            binders[variant.name] = variant.make(ctx)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot start is recorded, not fatal
            skipped.append({"variant": variant.name, "table": ctx.spec.name, "reason": _describe(exc)})
    return binders


def run_cell(cfg: BenchConfig, ctx: TableContext, binders: dict[str, Binder], variants: list[Variant],
             distribution: str, ids: np.ndarray,
             errors: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Bind, check and calibrate every eligible variant on one cell, then time them round-robin.

    Returns the cell's result rows and, at ``cfg.paired_min_batch`` ids or more, its paired rows
    (:func:`run_pairs`).
    """
    batch = int(ids.shape[0])
    out = np.zeros((batch, ctx.spec.dim), np.float32)
    cell = Cell(ids=ids, out=out)
    reference = np.take(ctx.array, ids, axis=0)
    where = {"table": ctx.spec.name, "distribution": distribution, "batch": batch}
    bounds: dict[str, Bound] = {}
    plans: dict[str, tuple[int, int]] = {}
    for variant in variants:
        if variant.name not in binders or (variant.max_batch is not None and batch > variant.max_batch):
            continue
        try:
            bound = binders[variant.name](cell)
            if variant.threads is None or variant.threads > 1:
                bound = replace(bound, settle=True)
            if variant.kind != "limit":
                check(bound, cell, reference, writes_out=variant.form == "out")
            inner, estimate = calibrate(bound, cfg.warmup_s, cfg.sample_s)
        except Exception as exc:  # noqa: BLE001 - a failing variant is recorded; the others still run
            errors.append({"variant": variant.name, **where, "error": _describe(exc)})
            continue
        bounds[variant.name] = bound
        plans[variant.name] = (inner, plan_samples(estimate, inner, repeats=cfg.repeats, min_repeats=cfg.min_repeats,
                                                   budget_s=cfg.variant_budget_s, limit=variant.limits))
    del reference
    stats = round_robin(bounds, plans, seed=cfg.seed)
    nbytes = batch * ctx.spec.dim * 4
    results = [{"variant": name, **where, **s.to_json(), "bytes_out": nbytes} for name, s in stats.items()]
    pairs = run_pairs(cfg, variants, bounds, stats) if batch >= cfg.paired_min_batch else []
    return results, [{**p, **where} for p in pairs]


def run_pairs(cfg: BenchConfig, variants: list[Variant], bounds: dict[str, Bound],
              stats: dict[str, Stats]) -> list[dict[str, Any]]:
    """Each ``out=`` adapter against the fastest (round-robin median) raw call of its framework and thread count
    that also writes into a preallocated output.

    Allocating raw calls are not candidates: their fresh output faults in new pages on every call, which
    spread one such pair's ratios over 0.76-1.40x (``np.take``, picked by a round-robin median that noise
    put 1% below ``np.take(out=, mode="clip")``'s). No pair is made unless such a raw call ran (a
    ``--variants`` run may leave only the slower, allocating forms).

    Both run in adjacent pairs of short samples (``cfg.pair_sample_s``; :func:`benchmarks.harness.paired`),
    longer ones (``cfg.pair_sample_pool_s``) for a thread pool's: its samples are each woken by an untimed
    call and followed by a settle of 10-60 ms, so a longer sample costs little time and evens out the
    pool's ramp-up, which spread the raw call paired with itself over 0.72-1.11x with 1 ms samples; at
    65,536 ids from the small table its quartiles spanned 0.88-1.09x with 5 ms samples and 0.95-1.06x with
    20 ms ones, in two runs of each.
    Each raw call is also paired with itself, once per cell: the ``noise_*`` fields, the spread the method
    shows where the work is identical (an A/A control), to read the adapter's ratio against.
    """
    rows, controls = [], {}
    for adapter in variants:
        if adapter.kind != "adapter" or adapter.form != "out" or adapter.name not in bounds:
            continue
        peers = [v.name for v in variants if v.kind == "raw" and v.form == "out" and v.name in stats
                 and v.framework == adapter.framework and (v.threads or 1) == adapter.threads]
        if not peers:  # the fastest form was not run (--variants): no fair pair
            continue
        raw = min(peers, key=lambda name: stats[name].median)
        pool = bounds[adapter.name].settle or bounds[raw].settle  # settle() runs between samples anyway
        inner = max(1, round((cfg.pair_sample_pool_s if pool else cfg.pair_sample_s) / max(stats[raw].median, 1e-9)))
        pair = partial(paired, inner=inner, pairs=cfg.pairs, budget_s=cfg.variant_budget_s, min_pairs=cfg.min_pairs,
                       seed=cfg.seed)
        p = pair(bounds[adapter.name], bounds[raw])
        if raw not in controls:
            controls[raw] = pair(bounds[raw], bounds[raw])
        noise = controls[raw]
        rows.append({"adapter": adapter.name, "raw": raw, "ratio": p.ratio, "ratio_q1": p.q1, "ratio_q3": p.q3,
                     "cpu_ratio": p.cpu_ratio, "adapter_median_s": p.a_median, "raw_median_s": p.b_median,
                     "pairs": p.pairs, "inner": p.inner, "noise_ratio": noise.ratio, "noise_q1": noise.q1,
                     "noise_q3": noise.q3})
    return rows


def check(bound: Bound, cell: Cell, reference: np.ndarray, *, writes_out: bool = False) -> None:
    """Call ``bound`` once (the first warm-up call) and compare its output with ``np.take`` bit for bit.

    A variant that ``writes_out`` (form ``out``) must also leave those rows in the cell's ``out`` buffer,
    whatever it returns.
    """
    cell.out.fill(np.nan)
    if bound.enter is not None:
        bound.enter()
    result = bound.call()
    got = bound.fetch() if bound.fetch is not None else result
    if isinstance(got, (list, tuple)):
        got = got[0]
    _same(np.asarray(got), reference, "output")
    if writes_out:
        _same(cell.out, reference, "out= buffer")


def _same(arr: np.ndarray, reference: np.ndarray, what: str) -> None:
    if arr.shape != reference.shape or arr.dtype != reference.dtype or not np.array_equal(arr, reference):
        raise MismatchError(f"{what} differs from np.take (shape {arr.shape}, dtype {arr.dtype})")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def cells_in(cfg: BenchConfig, tables: tuple[TableSpec, ...] | None = None) -> int:
    """How many cells a run has (for the progress bar)."""
    return len(tables or cfg.tables) * len(cfg.distributions) * len(cfg.batches)
