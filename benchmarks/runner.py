"""One benchmark run end to end: lookups, token lookups, targets; then JSON, Markdown and PNG files."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import SCHEMA
from benchmarks.config import BenchConfig
from benchmarks.harness import STACK_DEPTHS, loop_overhead
from benchmarks.lookup_bench import cells_in, run_lookups
from benchmarks.machine import CpuMonitor, machine_info
from benchmarks.report import add_ratios, to_markdown, validate
from benchmarks.targets import evaluate
from benchmarks.tokens_bench import run_tokens
from benchmarks.variants import catalogue
from bridge.atomic import remove_tree
from bridge.render import json_safe

JSON_NAME, MARKDOWN_NAME = "results.json", "results.md"


def run_benchmark(cfg: BenchConfig, *, command: str | None = None, progress: bool = True,
                  tmp_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run ``cfg`` and return the JSON document (schema :data:`benchmarks.SCHEMA`, see the README).

    Tables are written as stores in a temporary directory (under ``tmp_dir`` if given), memory-mapped,
    and removed at the end. Progress goes to stderr (tqdm) unless ``progress`` is false or
    ``EMBRIDGE_NO_PROGRESS`` is set.
    """
    from tqdm.auto import tqdm

    started, monitor = time.perf_counter(), CpuMonitor()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    machine["timer"] = {"clock": "perf_counter_ns", "resolution_s": time.get_clock_info("perf_counter").resolution,
                        "loop_overhead_s": loop_overhead(), "stack_depths": STACK_DEPTHS}
    variants = catalogue(cfg)
    skipped = [{"variant": v.name, "reason": f"not installed: {', '.join(v.missing())}"} for v in variants
               if v.missing()]
    runnable = [v for v in variants if not v.missing()]
    enabled = progress and not os.environ.get("EMBRIDGE_NO_PROGRESS")
    total = cells_in(cfg) + (1 if cfg.tokens > 0 else 0)
    with tempfile.TemporaryDirectory(prefix="embridge-bench-", dir=tmp_dir) as tmp, \
            tqdm(total=total, file=sys.stderr, disable=not enabled, unit="cell", leave=False) as bar:
        found = run_lookups(cfg, runnable, Path(tmp), bar)
        tokens = run_tokens(cfg, Path(tmp), bar)
    add_ratios(found["results"])
    doc: dict[str, Any] = {
        "schema": SCHEMA, "created": created, "duration_s": round(time.perf_counter() - started, 2),
        "mode": cfg.mode, "command": command, "config": cfg.to_json(), "machine": machine, "cpu": monitor.report(),
        "variants": [v.to_json() for v in variants], "tables": found["tables"], "results": found["results"],
        "pairs": found["pairs"], "errors": found["errors"], "skipped": skipped + found["skipped"], "tokens": tokens,
        "targets": [],
    }
    doc["targets"] = evaluate(doc)
    return doc


def write_outputs(doc: dict[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with ``plots``) ``latency.png``, ``bandwidth.png``, ``pairs.png``.

    ``out_dir`` is created if needed. The files are made in a staging directory inside it and then moved
    into place with Ctrl-C held back, so an error or an interrupt leaves the previous set or the new one,
    never a mix;
    without ``plots``, the previous run's plots are removed (they would describe other results). Other
    files in ``out_dir`` are left alone.
    """
    problems = validate(doc)
    if problems:
        raise ValueError("benchmark document does not match its schema: " + "; ".join(problems[:5]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".results-", dir=out))
    try:
        made = _render(doc, staging, plots)
        with _no_interrupts():  # the moves take microseconds: Ctrl-C waits for the whole set
            for path in made.values():
                os.replace(path, out / path.name)
    finally:
        remove_tree(staging)  # finished even if Ctrl-C lands while it runs
    if not plots:
        from benchmarks.plots import PLOT_NAMES

        for name in PLOT_NAMES:
            (out / name).unlink(missing_ok=True)
    return {key: out / path.name for key, path in made.items()}


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs, then deliver it (main thread only; elsewhere nothing is held)."""
    held: list[Any] = []
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # Ctrl-C is ignored anyway
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, held[0])
            else:
                raise KeyboardInterrupt


def _render(doc: dict[str, Any], into: Path, plots: bool) -> dict[str, Path]:
    """Every output file of ``doc``, written into ``into``."""
    import json

    made = {"json": into / JSON_NAME, "markdown": into / MARKDOWN_NAME}
    made["json"].write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    made["markdown"].write_text(to_markdown(doc), encoding="utf-8")
    if plots:
        from benchmarks.plots import write_plots

        made.update({path.stem: path for path in write_plots(doc, into)})
    return made
