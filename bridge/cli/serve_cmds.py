"""Sub-commands that serve from a store: ``lookup`` and ``parity``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bridge.cli.common import add_json, emit_json, note, say
from bridge.errors import InputError

PARITY_FAILED_EXIT = 3


def register(sub: Any) -> None:
    """Add this module's sub-commands to ``sub``."""
    from bridge.backends import BACKENDS
    from bridge.policy import POLICIES

    p = sub.add_parser("lookup", help="look ids or tokens up in a store table")
    p.add_argument("store", help="a store directory")
    p.add_argument("--table", required=True, help="table name (as in manifest.json)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ids", help="comma-separated integer ids, e.g. 1,2,-1")
    what.add_argument("--tokens", help="comma-separated tokens, mapped through the table's vocabulary")
    p.add_argument("--backend", default="numpy", choices=BACKENDS, help="serving backend (default: numpy)")
    p.add_argument("--policy", default="error", choices=POLICIES,
                   help="what to do with ids outside [0, rows) (default: error)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the store")
    add_json(p)
    p.set_defaults(func=run_lookup)

    p = sub.add_parser("parity", help="compare every backend (and Keras / the ONNX model) on the same ids")
    p.add_argument("store", help="a store directory")
    p.add_argument("--keras", metavar="MODEL", help="also compare with this Keras model's own Embedding layers")
    p.add_argument("--onnx", metavar="MODEL", help="the converted ONNX model (default: the store's model.onnx)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends (default: all)")
    p.add_argument("--policy", default="error", choices=POLICIES,
                   help="index policy for the bad ids parity also tries (default: error)")
    p.add_argument("--tables", help="comma-separated table names (default: all)")
    p.add_argument("--report", metavar="FILE.md", help="also write the report as Markdown")
    p.add_argument("--unsafe", action="store_true", help="load the Keras model with safe_mode=False")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the store")
    add_json(p)
    p.set_defaults(func=run_parity)


def parse_ids(text: str) -> np.ndarray:
    """``"1,2,-3"`` -> int64 array; a clear error for anything that is not an integer."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return np.array([int(t) for t in items], dtype=np.int64)
    except (ValueError, OverflowError) as exc:
        raise InputError(f"--ids must be comma-separated integers (e.g. 1,2,3): {exc}") from exc


def run_lookup(args: argparse.Namespace) -> int:
    from bridge.backends import lookup
    from bridge.store import open_store

    table = open_store(args.store, verify=not args.no_verify)[args.table]
    fn = lookup(table, args.backend, args.policy)
    if args.ids is not None:
        keys: list[Any] = [int(i) for i in parse_ids(args.ids)]
        vectors = fn(np.array(keys, dtype=np.int64))
    else:
        keys = [t for t in args.tokens.split(",")]
        vectors = fn.tokens(keys)
    values = np.asarray(vectors, dtype=np.float64 if vectors.dtype.kind == "f" or vectors.dtype.kind == "V" else None)
    if args.json:
        emit_json({"table": table.name, "backend": args.backend, "policy": args.policy,
                   "dtype": str(table.served_dtype), "keys": keys, "vectors": values.tolist()})
        return 0
    with np.printoptions(precision=6, suppress=True, linewidth=120, threshold=64):
        for key, vec in zip(keys, vectors, strict=True):
            say(f"{key!r}: {np.asarray(vec, dtype=values.dtype)}")
    return 0


def run_parity(args: argparse.Namespace) -> int:
    from bridge.store_parity import store_parity

    extra = None
    if args.policy not in ("error", "wrap"):
        note(f"note: Keras and ONNX have no '{args.policy}' policy: they are given the ids the policy maps to")
    if args.keras:
        from converters.keras_parity import keras_layer_references

        note(f"loading {args.keras} ...")
        extra = keras_layer_references(args.keras, safe_mode=not args.unsafe)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.report:
        _refuse_report_in_store(Path(args.report), Path(args.store))
    report = store_parity(
        args.store, backends=backends, policy=args.policy,
        tables=tables, onnx_model=Path(args.onnx) if args.onnx else None,
        extra_references=extra, verify=not args.no_verify,
    )
    if extra is not None:  # mixed precision: Keras serves cast(table[id]); compare through the same cast
        report.extend(extra.cast_comparisons(args.store, backends, args.policy))
        if not any(c.backend == "keras" and not c.skipped for c in report.comparisons):
            raise InputError(f"{args.keras!r} has no Embedding layer the compared tables came from; pass the Keras "
                             "model the store was converted from to --keras")
    if args.report:
        from bridge.atomic import atomic_file

        with atomic_file(args.report, "w") as fh:
            fh.write(report.to_markdown())  # type: ignore[attr-defined]
    if args.json:
        emit_json(report.to_json())
    else:
        say(report.to_text())
    return 0 if report else PARITY_FAILED_EXIT


def _refuse_report_in_store(report: Path, store: Path) -> None:
    """InputError for a ``--report`` path inside the store directory (it could replace the store's own files)."""
    if report.resolve().is_relative_to(store.resolve()):
        raise InputError(f"--report {str(report)!r} is inside the store {str(store)!r}; write the report elsewhere")
