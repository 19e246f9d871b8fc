"""``embridge bench``: time every lookup backend against the frameworks' own calls and the copy limit.

The suite lives in the top-level ``benchmarks`` package (see ``benchmarks/README.md``), imported only
when the command runs, so ``embridge`` starts fast and ``import bridge`` never loads it.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import shlex
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bridge.cli.common import add_json, comma_list, emit_json, note, say, wrote
from bridge.errors import InputError, UnsupportedError

DEFAULT_OUT = "bench-out"


def register(sub: Any) -> None:
    """Add ``bench`` to ``sub``."""
    p = sub.add_parser("bench", help="time lookups on every backend against raw framework calls; JSON, Markdown, PNG",
                       description="Time lookups through every bridge adapter against the frameworks' own calls, "
                       "round-robin in one process. Writes results.json, results.md, latency.png, "
                       "bandwidth.png and pairs.png into --out; prints the Markdown tables (or, with --json, "
                       "the JSON document).")
    p.add_argument("--quick", action="store_true",
                   help="4 batch sizes (1, 64, 4096, 65536), fewer repeats: under 2 minutes")
    p.add_argument("--large", action="store_true", help="add the 2 GiB table (needs about 10 GiB of free memory)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory, created if missing; its result files are replaced (default: {DEFAULT_OUT})")
    p.add_argument("--no-tf", action="store_true", help="skip TensorFlow and Keras (saves their import time)")
    p.add_argument("--no-gensim", action="store_true", help="skip gensim")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files (no matplotlib needed)")
    p.add_argument("--variants", metavar="GLOBS", help="comma-separated name patterns to time, e.g. 'bridge.*,ort.*' "
                   "(np.take and memcpy are always timed)")
    p.add_argument("--table", action="append", metavar="NAME=ROWSxDIM",
                   help="table size to use instead of the defaults (repeatable): small, medium, large or NAME=ROWSxDIM")
    p.add_argument("--batches", metavar="LIST", help="comma-separated batch sizes, e.g. 1,256,65536")
    p.add_argument("--dist", metavar="LIST", help="id distributions: uniform, zipf or both (default)")
    p.add_argument("--repeats", type=int, help="timed samples per variant and cell")
    p.add_argument("--tokens", type=int, help="tokens in the token benchmark, 0 to skip it (default: 1,000,000)")
    p.add_argument("--seed", type=int, default=0, help="random seed for tables and ids (default: 0)")
    add_json(p)
    p.set_defaults(func=run_bench)


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`benchmarks.config.BenchConfig` the options describe."""
    config = _suite("benchmarks.config")
    make = config.quick_config if args.quick else config.full_config
    changes: dict[str, Any] = {"tensorflow": not args.no_tf, "gensim": not args.no_gensim, "seed": args.seed}
    patterns = tuple(dict.fromkeys(comma_list(args.variants, "--variants"))) if args.variants is not None else ()
    if patterns:
        changes["variants"] = patterns
    if args.table:
        changes["tables"] = tuple(config.parse_table(t) for t in args.table)
    if args.batches is not None:
        changes["batches"] = config.parse_ints(args.batches, "batch sizes")
    if args.dist is not None:
        changes["distributions"] = tuple(dict.fromkeys(d.strip() for d in args.dist.split(",") if d.strip()))
    if args.repeats is not None:
        if args.repeats < 1:
            raise InputError(f"--repeats must be >= 1, got {args.repeats}")
        changes["repeats"] = args.repeats
        changes["min_repeats"] = min(args.repeats, 3)
    if args.tokens is not None:
        if args.tokens < 0:
            raise InputError(f"--tokens must be >= 0, got {args.tokens}")
        changes["tokens"] = args.tokens
    if args.large and args.table:
        raise InputError("--large adds the large preset to the default tables; with --table, name it: --table large")
    cfg = make(large=args.large, **changes)
    if patterns:
        _check_patterns(cfg, patterns)
    if args.table or args.batches is not None or args.dist is not None or patterns:
        cfg = replace(cfg, mode=f"{cfg.mode}+custom")
    return cfg


def _check_patterns(cfg: Any, patterns: tuple[str, ...]) -> None:
    """InputError for a --variants pattern that names no variant (np.take and memcpy are always timed)."""
    names = [v.name for v in _suite("benchmarks.variants").catalogue(replace(cfg, variants=()))]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise InputError(f"--variants {', '.join(map(repr, unmatched))} match no variant; the variants are "
                         f"{', '.join(names)}")


def check_out_dir(out: str) -> Path:
    """``--out`` as a directory this run can write into (created if missing), checked before the run starts."""
    if not out.strip():
        raise InputError("--out is empty; give a directory, e.g. --out bench-out")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out!r} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(f"--out {out!r} cannot be written ({exc.strerror or exc}); choose another directory") \
            from exc
    return path


def command_line(args: argparse.Namespace) -> str:
    """The ``embridge bench`` command that reproduces this run."""
    words = ["embridge", "bench"]
    words += [flag for flag, on in (("--quick", args.quick), ("--large", args.large), ("--no-tf", args.no_tf),
                                    ("--no-gensim", args.no_gensim), ("--no-plots", args.no_plots)) if on]
    for flag, value in (("--variants", args.variants), ("--batches", args.batches), ("--dist", args.dist),
                        ("--repeats", args.repeats), ("--tokens", args.tokens)):
        if value is not None:
            words += [flag, str(value)]
    for table in args.table or []:
        words += ["--table", table]
    if args.seed:
        words += ["--seed", str(args.seed)]
    words += ["--out", args.out]
    return shlex.join(words)


def run_bench(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        raise UnsupportedError("the plots need matplotlib: pip install 'embedding-bridge[bench]', or pass --no-plots")
    out = check_out_dir(args.out)
    runner = _suite("benchmarks.runner")
    note(f"embridge bench: {cfg.mode} run, tables {', '.join(t.name for t in cfg.tables)}; "
         f"results go to {out}/")
    doc = runner.run_benchmark(cfg, command=command_line(args))
    written = runner.write_outputs(doc, out, plots=not args.no_plots)
    for path in written.values():
        wrote(path)
    if args.json:
        emit_json(doc)
    else:
        say(_markdown(doc))
    note("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _markdown(doc: dict[str, Any]) -> str:
    from benchmarks.report import to_markdown

    return str(to_markdown(doc)).rstrip("\n")


def _suite(module: str) -> Any:
    """Import a module of the ``benchmarks`` package, or explain how to get it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("benchmarks"):
            raise
        raise UnsupportedError(
            "the benchmark suite (package 'benchmarks') is not importable; run embridge from a checkout of "
            "embedding-bridge, or install the checkout (pip install -e .) so that 'benchmarks' is included"
        ) from exc
