"""The same gather timed from call sites at different C stack depths, in one process.

``python -m benchmarks.stack_sites [--processes N]`` builds the small table as a store, binds one
onnxruntime ``run_with_ortvaluevector`` call to fixed ids and a fixed output (65,536 ids), and times that
call, interleaved, from sites 0 to ``SITES - 1`` C frames deep (:func:`benchmarks.harness.run_at_depth`).
It prints one line per process: the median microseconds per call at each site. The work is identical at
every site; on this VM some processes show one or a few sites 1.1-1.7x slower than the rest, a different
site in each process, which is why the harness draws a random depth for every sample.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.config import SMALL
from benchmarks.data import make_ids, make_store_table
from benchmarks.harness import gc_paused, run_at_depth
from benchmarks.variants import Cell, TableContext, _ort_ortvaluevector

SITES = 8
BATCH = 65_536
ROUNDS = 150


def site_medians(rounds: int = ROUNDS) -> list[float]:
    """Median seconds per call of one onnxruntime gather called from each of ``SITES`` stack depths."""
    with tempfile.TemporaryDirectory() as tmp:
        table = make_store_table(SMALL, Path(tmp), 0)
        ctx = TableContext(SMALL, table, np.asarray(table.data))
        ids = make_ids(SMALL.rows, BATCH, "uniform", np.random.default_rng(0), 1.0)
        out = np.zeros((BATCH, SMALL.dim), np.float32)
        call = _ort_ortvaluevector(1)(ctx)(Cell(ids, out)).call
        times: list[list[int]] = [[] for _ in range(SITES)]

        def timed() -> int:
            start = time.perf_counter_ns()
            call()
            return time.perf_counter_ns() - start

        with gc_paused():
            for _ in range(rounds):
                for depth in range(SITES):
                    times[depth].append(run_at_depth(timed, depth))
        del ctx, table
    return [float(np.median(t)) * 1e-9 for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stack_sites", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="fresh processes to run, one line each")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="calls per site")
    args = parser.parse_args(argv)
    if args.processes > 1:
        for _ in range(args.processes):
            subprocess.run([sys.executable, "-m", "benchmarks.stack_sites", "--rounds", str(args.rounds)], check=True)
        return 0
    medians = site_medians(args.rounds)
    best = min(medians)
    cells = " ".join(f"{m * 1e6:5.0f}" for m in medians)
    print(f"us per call at depth 0..{SITES - 1}: {cells}   slowest/fastest {max(medians) / best:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
