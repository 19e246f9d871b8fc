"""Sub-command ``share``: one store for the tables of several models, and the models rewritten to read it."""

from __future__ import annotations

import argparse
from typing import Any

from bridge.cli.common import add_json, add_output, emit_json, note, say, wrote
from bridge.render import format_table, human_bytes


def register(sub: Any) -> None:
    """Add this module's sub-commands to ``sub``."""
    p = sub.add_parser(
        "share",
        help="deduplicate the tables of several ONNX models into one store and rewrite the models to read it",
        description="Write one store with every distinct embedding table of the models (identical tables "
                    "stored once) and each model rewritten as OUT/<name>.onnx reading its tables from the "
                    "store as ONNX external data, so onnxruntime maps one copy for all models and processes. "
                    "Each rewritten model is checked bitwise against its original in onnxruntime, where "
                    "onnxruntime can run the original on sample inputs (else a warning says it was not checked).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files")
    add_output(p)
    p.add_argument("--cut", action="store_true",
                   help="cut the lookups out of the models: the vectors become model inputs fed by the bridge")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running each rewritten model against its original in onnxruntime")
    add_json(p)
    p.set_defaults(func=run_share)


def run_share(args: argparse.Namespace) -> int:
    from bridge.share import share

    note(f"sharing the tables of {len(args.models)} model(s) ...")
    result = share(args.models, args.out, force=args.force, cut=args.cut, verify=not args.no_verify)
    wrote(args.out)
    for m in result.models:
        if m.check.verified is None and not args.no_verify:
            note(f"warning: {m.file} was not checked against {m.source}: {m.check.note}")
    if args.json:
        emit_json(result.to_json())
        return 0
    manifest = result.store.manifest
    say(format_table(
        ["table", "shape", "dtype", "bytes", "used by"],
        [[t["name"], "x".join(map(str, t["shape"])), t["dtype"], human_bytes(t["nbytes"]),
          len((t.get("metadata") or {}).get("shared_by", []))] for t in manifest["tables"]],
    ))
    say("")
    say(format_table(
        ["model", "written as", "tables", "cut lookups", "check"],
        [[m.source, m.file, ", ".join(sorted(set(m.tables.values()))), len(m.cut), _check(m)] for m in result.models],
    ))
    for m in result.models:
        for reason in m.kept:
            say(f"note: {m.file}: lookup kept in the model: {reason}")
        for warning in m.warnings:
            say(f"warning: {m.file}: {warning}")
    say(f"\n{human_bytes(result.source_bytes)} of models -> {human_bytes(result.shared_bytes)} shared, "
        f"in {result.store.path}/")
    return 0


def _check(model: Any) -> str:
    if model.check.verified:
        return "bitwise equal"
    return f"not checked: {model.check.note}"
