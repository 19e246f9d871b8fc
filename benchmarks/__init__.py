"""embedding-bridge benchmark suite: every adapter against its framework's raw calls and the copy limit.

Run it with ``embridge bench`` (see ``benchmarks/README.md``) or from Python::

    from benchmarks.config import quick_config
    from benchmarks.runner import run_benchmark, write_outputs
    doc = run_benchmark(quick_config())
    write_outputs(doc, "bench-out")

Importing this package is free: numpy, torch, onnxruntime, tensorflow, gensim and matplotlib load only
when the variants or plots that need them run.
"""

from __future__ import annotations

SCHEMA = "embridge-bench/4"

__all__ = ["SCHEMA"]
