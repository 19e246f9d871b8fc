"""Sub-commands that serve from a store: ``lookup`` and ``parity``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from bridge.cli.common import add_json, comma_list, emit_json, note, say, wrote
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
    what.add_argument("--token", action="append", metavar="TOKEN",
                      help="one token, taken whole (it may hold commas); repeat for more")
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
    """``"1,2,-3"`` -> int64 array; a clear error for anything that is not a plain decimal integer."""
    items = comma_list(text, "--ids")
    bad = next((t for t in items if not _INTEGER.fullmatch(t)), None)
    if bad is not None:
        raise InputError(f"--ids must be comma-separated decimal integers (e.g. 1,2,-3); {bad!r} is not one")
    try:
        return np.array([int(t) for t in items], dtype=np.int64)
    except OverflowError as exc:
        raise InputError(f"--ids {text!r}: an id does not fit in int64 ({exc})") from exc


_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "1_0" and other scripts' digits


def run_lookup(args: argparse.Namespace) -> int:
    from bridge.backends import lookup
    from bridge.store import open_store

    table = open_store(args.store, verify=not args.no_verify)[args.table]
    fn = lookup(table, args.backend, args.policy)
    if args.ids is not None:
        keys: list[Any] = [int(i) for i in parse_ids(args.ids)]
        vectors = fn(np.array(keys, dtype=np.int64))
    else:
        keys = list(args.token) if args.token is not None else args.tokens.split(",")
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
    if args.keras is not None and args.keras.strip():
        from converters.keras_parity import keras_layer_references

        note(f"loading {args.keras} ...")
        extra = keras_layer_references(args.keras, safe_mode=not args.unsafe)
    tables = comma_list(args.tables, "--tables") if args.tables is not None else None
    backends = comma_list(args.backends, "--backends")
    for flag, value in (("--report", args.report), ("--onnx", args.onnx), ("--keras", args.keras)):
        if value is not None and not value.strip():
            raise InputError(f"{flag} is empty; give a path, or leave the option out")
    if args.report is not None:
        _refuse_report_path(Path(args.report), args)
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
    if args.report is not None:
        from bridge.atomic import atomic_file

        with atomic_file(args.report, "w") as fh:
            fh.write(report.to_markdown())  # type: ignore[attr-defined]
        wrote(args.report)
    if args.json:
        emit_json(report.to_json())
    else:
        say(report.to_text())
    return 0 if report else PARITY_FAILED_EXIT


def _refuse_report_path(report: Path, args: argparse.Namespace) -> None:
    """InputError for a ``--report`` path that would replace something else: a file in the store, an input
    model (or a file inside a SavedModel directory), or any existing file that is not a parity report."""
    target = report.resolve()
    if target.is_relative_to(Path(args.store).resolve()):
        raise InputError(f"--report {str(report)!r} is inside the store {args.store!r}; write the report elsewhere")
    for flag, value in (("--onnx", args.onnx), ("--keras", args.keras)):
        if value is not None and (target == Path(value).resolve() or target.is_relative_to(Path(value).resolve())):
            raise InputError(f"--report {str(report)!r} is the {flag} model {value!r}; write the report elsewhere")
    if target.is_dir():
        raise InputError(f"--report {str(report)!r} is a directory; give a file name, e.g. parity.md")
    if target.is_file() and not _is_report(target):
        raise InputError(f"--report {str(report)!r} exists and is not an embridge parity report; it is left alone: "
                         "delete it yourself or write the report elsewhere")


def _is_report(path: Path) -> bool:
    """True if ``path`` starts as every parity report does (:data:`bridge.parity.REPORT_MARK`)."""
    from bridge.parity import REPORT_MARK

    try:
        with open(path, "rb") as fh:
            return fh.read(len(REPORT_MARK)) == REPORT_MARK.encode()
    except OSError:
        return False
