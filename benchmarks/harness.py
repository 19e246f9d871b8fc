"""Timing: warm-up, calibrated samples, round-robin over variants, median and interquartile range.

A variant is bound to one cell (table, ids, output buffer) as a :class:`Bound`: a zero-argument
callable, ideally a ``functools.partial`` of the framework call itself, so the harness adds no Python
frame of its own. The garbage collector is off while samples are taken. Each sample times ``inner``
back-to-back calls with ``perf_counter_ns`` and records the mean per call; the loop costs a few tens
of nanoseconds per call (``machine.timer.loop_overhead_s`` in the JSON), included in every figure.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

_MAX_INNER = 1_000_000
_MAX_WARMUP_CALLS = 1 << 16
#: Each sample runs from 0 to STACK_DEPTHS - 1 extra C stack frames deep, at random (see run_at_depth).
STACK_DEPTHS = 16
T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """One variant bound to one cell.

    ``call`` does the lookup; ``enter`` (optional) runs before each sample, outside the timed region
    (e.g. ``torch.set_num_threads``); ``fetch`` (optional) returns the output of the last call for the
    correctness check when ``call`` writes into a buffer and returns nothing useful. ``settle`` marks a
    variant that runs a thread pool (more than one thread, TensorFlow, Keras): the harness waits for the
    process to go idle after each of its samples (:func:`settle`), and makes one untimed call before each,
    so the timed calls find the pool awake, as in steady serving, rather than waking it from that sleep.
    """

    call: Callable[[], object]
    enter: Callable[[], object] | None = None
    fetch: Callable[[], object] | None = None
    settle: bool = False


@dataclass(frozen=True)
class Limits:
    """Per-variant caps on samples (``None``: the run's ``repeats``)."""

    max_samples: int | None = None


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median, quartiles, interquartile range, minimum; ``samples`` of ``inner`` calls.

    ``cpu_median`` is the median of the process's CPU time per call (all its threads, user + system): on a
    busy machine it is the steadier figure for single-thread variants, whose wall time includes the time
    they waited for a core; for multi-thread variants it is the CPU cost, not the latency.
    """

    median: float
    q1: float
    q3: float
    min: float
    samples: int
    inner: int
    cpu_median: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_json(self) -> dict[str, Any]:
        return {
            "median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "iqr_s": self.iqr,
            "min_s": self.min, "samples": self.samples, "inner": self.inner, "cpu_median_s": self.cpu_median,
        }


def summarize(samples: list[tuple[float, float]], inner: int) -> Stats:
    """:class:`Stats` of ``(wall, cpu)`` seconds per call, one pair per sample."""
    values = np.asarray([w for w, _ in samples], dtype=np.float64)
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    cpu = float(np.median([c for _, c in samples]))
    return Stats(float(med), float(q1), float(q3), float(values.min()), len(samples), inner, cpu)


def time_sample(bound: Bound, inner: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call, averaged over ``inner`` back-to-back calls.

    A ``settle`` variant makes one more call first, untimed, to wake its thread pool (see :class:`Bound`).
    """
    if bound.enter is not None:
        bound.enter()
    call = bound.call
    if bound.settle:  # wake the pool the last settle() let sleep (see Bound)
        call()
    loop = range(inner)
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for _ in loop:
        call()
    wall = time.perf_counter_ns() - start
    cpu = time.process_time_ns() - cpu
    return wall * 1e-9 / inner, cpu * 1e-9 / inner


def run_at_depth(fn: Callable[[], T], depth: int) -> T:
    """``fn()``, called ``depth`` C stack frames deeper than this call (each level a ``sorted`` calling its key).

    Every sample runs at a depth drawn at random (:data:`STACK_DEPTHS`; :func:`round_robin`, :func:`paired`).
    The speed of a gather can depend on where its stack frame sits: the same onnxruntime call on the same
    buffers (65,536 ids, cached table), called from ten sites a few C frames apart, took 454-464 us at six
    sites and 754-762 us at four in one process, and in 4 of 8 processes some site was 1.25-1.65x the
    others, a different one in each (:mod:`benchmarks.stack_sites` reproduces it). A variant always called
    from one site thus carries a bias fixed for the whole process, which pairing cannot cancel; at random
    depths each variant meets the good and the bad sites alike, and the median sees the common case.
    Python-to-Python calls use no C stack (CPython 3.11+), hence the builtin in each level.
    """
    if depth <= 0:
        return fn()
    box: list[T] = []

    def level(_: int) -> int:  # sorted's key: called once, one C level down
        box.append(run_at_depth(fn, depth - 1))
        return 0

    sorted((0,), key=level)
    return box[0]


def sample(bound: Bound, inner: int, rng: random.Random) -> tuple[float, float]:
    """:func:`time_sample` at a random C stack depth (:func:`run_at_depth`), drawn from ``rng``."""
    return run_at_depth(partial(time_sample, bound, inner), rng.randrange(STACK_DEPTHS))


def settle(max_s: float = 0.5, step_s: float = 0.005, quiet_steps: int = 2, busy_fraction: float = 0.1) -> float:
    """Sleep until this process used under ``busy_fraction`` of a core for ``quiet_steps`` steps in a row.

    onnxruntime's pool spins a whole core for 30-50 ms after a 2-thread run, torch's OpenMP threads for
    5-15 ms (measured here). Steps of 5 ms: the process CPU clock of threads running on other cores is
    only updated every scheduler tick. Returns the seconds waited (at most ``max_s``).
    """
    start = time.perf_counter()
    quiet = 0
    while quiet < quiet_steps and time.perf_counter() - start < max_s:
        cpu = time.process_time_ns()
        time.sleep(step_s)
        quiet = quiet + 1 if time.process_time_ns() - cpu < busy_fraction * step_s * 1e9 else 0
    return time.perf_counter() - start


def calibrate(bound: Bound, warmup_s: float, sample_s: float) -> tuple[int, float]:
    """Warm ``bound`` up: at least two calls, in doubling batches until ``warmup_s`` is spent.

    Returns ``(inner, estimate)``: calls per sample so a sample lasts about ``sample_s``, and the
    estimated seconds per call from the last warm-up batch.
    """
    spent, calls, n, estimate = 0.0, 0, 1, math.inf
    while True:
        estimate = time_sample(bound, n)[0]
        spent += estimate * n
        calls += n
        if (spent >= warmup_s and calls >= 2) or calls >= _MAX_WARMUP_CALLS:
            break
        n = calls  # batches of 1, 1, 2, 4, 8, ... calls
    if bound.settle:
        settle()
    inner = int(min(_MAX_INNER, max(1, round(sample_s / max(estimate, 1e-9)))))
    return inner, estimate


def plan_samples(estimate: float, inner: int, *, repeats: int, min_repeats: int, budget_s: float,
                 limit: Limits) -> int:
    """How many samples a variant gets in one cell: ``repeats``, cut to fit ``budget_s``, capped by ``limit``."""
    fitting = int(budget_s // max(estimate * inner, 1e-12))
    wanted = min(repeats, max(min_repeats, fitting))
    if limit.max_samples is not None:
        wanted = min(wanted, limit.max_samples)
    return max(1, wanted)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect garbage, then keep the collector off while the block times samples (restored after)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def round_robin(
    bounds: Mapping[str, Bound],
    plans: Mapping[str, tuple[int, int]],
    *,
    seed: int = 0,
) -> dict[str, Stats]:
    """Time every variant, one sample per round, rotating the starting variant each round.

    ``plans[name] = (inner, samples)``. Each sample runs at a random C stack depth (:func:`sample`; ``seed``
    seeds the draws). Returns :class:`Stats` per variant name.
    """
    rng = random.Random(seed)
    names = list(bounds)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    rounds = max((plans[n][1] for n in names), default=0)
    with gc_paused():
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                inner, samples = plans[name]
                if r < samples:
                    times[name].append(sample(bounds[name], inner, rng))
                    if bounds[name].settle:
                        settle()
    return {name: summarize(times[name], plans[name][0]) for name in names}


@dataclass(frozen=True)
class PairStats:
    """``a`` against ``b`` timed in adjacent pairs: the median and quartiles of the per-pair ratios ``a / b``.

    ``cpu_ratio`` is the median of the per-pair ratios of process CPU time; ``a_median`` and ``b_median``
    are the medians of the two variants' own samples.
    """

    ratio: float
    q1: float
    q3: float
    cpu_ratio: float
    a_median: float
    b_median: float
    pairs: int
    inner: int


def paired(a: Bound, b: Bound, inner: int, pairs: int, *, budget_s: float | None = None,
           min_pairs: int = 2, seed: int = 0) -> PairStats:
    """Time ``a`` and ``b`` back to back in up to ``pairs`` pairs, ``a`` first in even pairs and ``b`` first in odd.

    A ratio of two medians taken across a long round-robin mixes in whatever the machine did between the
    two samples (another variant's cache footprint, a neighbour's burst); a ratio taken within one pair of
    adjacent samples of equal length does not, and alternating the order cancels a first-or-second bias.
    Many short pairs beat a few long ones: a burst spoils one pair, which the median ignores, instead of
    shifting a long sample. With ``budget_s``, pairs stop once that many seconds (settling included) are
    spent and at least ``min_pairs`` are taken; the count taken is always even, so each order has half.
    Each sample runs at its own random C stack depth (:func:`sample`; ``seed`` seeds the draws).
    """
    rng = random.Random(seed)
    samples: list[tuple[tuple[float, float], tuple[float, float]]] = []
    start = time.perf_counter()
    with gc_paused():
        for i in range(pairs):
            if budget_s is not None and i >= min_pairs and i % 2 == 0 and time.perf_counter() - start > budget_s:
                break
            got = {}
            for name, bound in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
                got[name] = sample(bound, inner, rng)
                if bound.settle:
                    settle()
            samples.append((got["a"], got["b"]))
    ratios = [sa[0] / sb[0] for sa, sb in samples]
    cpu_ratios = [sa[1] / max(sb[1], 1e-12) for sa, sb in samples]
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return PairStats(float(med), float(q1), float(q3), float(np.median(cpu_ratios)),
                     float(np.median([sa[0] for sa, _ in samples])), float(np.median([sb[0] for _, sb in samples])),
                     len(samples), inner)


def loop_overhead(calls: int = 200_000) -> float:
    """Seconds the timing loop itself adds per call (timing a call of a C no-op)."""
    noop = Bound(call=int)
    return min(time_sample(noop, calls)[0] for _ in range(3))
