"""Sub-commands that read models: ``inspect``, ``extract``, ``convert``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bridge.cli.common import add_json, add_output, emit_json, note, say, wrote
from bridge.errors import InputError
from bridge.render import format_table, human_bytes


def register(sub: Any) -> None:
    """Add this module's sub-commands to ``sub``."""
    p = sub.add_parser("inspect", help="list the embedding tables of an ONNX model (writes nothing)")
    p.add_argument("model", help="an .onnx file")
    add_json(p)
    p.set_defaults(func=run_inspect)

    p = sub.add_parser("extract", help="write a store with every embedding table of an ONNX model")
    p.add_argument("model", help="an .onnx file")
    add_output(p)
    add_json(p)
    p.set_defaults(func=run_extract)

    p = sub.add_parser("convert", help="Keras model -> OUT/model.onnx + store, with parity check")
    p.add_argument("model", help="a .keras or .h5 file, or a SavedModel directory")
    add_output(p)
    p.add_argument("--unsafe", action="store_true",
                   help="load .keras files with safe_mode=False (runs code stored in the file; only for trusted files)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check after converting")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--large", dest="large", action="store_const", const=True, default=None,
                      help="force the large-table path (tf2onnx converts a skeleton; tables become ONNX external "
                           "data read from the store). Default: automatic at 256 MiB of tables or 2 GiB of weights")
    size.add_argument("--no-large", dest="large", action="store_const", const=False,
                      help="never use the large-table path")
    add_json(p)
    p.set_defaults(func=run_convert)


def inspect_rows(model_path: Path) -> list[dict[str, Any]]:
    """The ``inspect --json`` table entries of an ONNX file.

    No table is loaded: scan reads no tensor data, and tie detection reads a few sampled rows
    of same-shaped candidates before comparing any further.
    """
    from bridge.onnx_io import load_model
    from bridge.scan import default_table_name, scan
    from bridge.ties import find_ties, ties_json

    model = load_model(model_path)
    refs = scan(model)
    ties = find_ties(model, refs, model_path.parent)
    taken: set[str] = set()
    rows = []
    for ref in refs:
        name = default_table_name(ref.initializer, taken)
        taken.add(name)
        info = ref.to_json()
        extra = {k: v for k, v in info.items() if k not in ("initializer", "shape", "dtype", "consumers")}
        rows.append({"name": name, "initializer": ref.initializer, "shape": list(ref.shape), "dtype": ref.dtype,
                     "consumers": info["consumers"], "ties": ties_json(ties[ref.key]),
                     **extra})
    return rows


_PACKED_BITS = {"int4": 4, "uint4": 4, "float4_e2m1": 4}  # ONNX packs two of these in a byte


def _size(shape: list[int], dtype: str) -> str:
    """The tensor's size in bytes, human-readable; ``?`` for a dtype without a fixed size (strings)."""
    from bridge.dtypes import from_name
    from bridge.errors import BridgeError

    elements = 1
    for d in shape:
        elements *= d
    if dtype in _PACKED_BITS:
        return human_bytes((elements * _PACKED_BITS[dtype] + 7) // 8)
    try:
        itemsize = from_name(dtype).itemsize
    except (BridgeError, TypeError):
        return "?"
    return "?" if dtype == "object" else human_bytes(elements * itemsize)


def run_inspect(args: argparse.Namespace) -> int:
    rows = inspect_rows(Path(args.model))
    if args.json:
        emit_json({"model": args.model, "tables": rows})
        return 0
    if not rows:
        say(f"{args.model}: no embedding tables found")
        return 0
    say(format_table(
        ["table", "initializer", "shape", "dtype", "bytes", "uses"],
        [[r["name"], r["initializer"], "x".join(map(str, r["shape"])), r["dtype"],
          _size(r["shape"], r["dtype"]), _uses(r)] for r in rows],
    ))
    return 0


def _uses(row: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for c in row["consumers"]:
        label = c.get("role", c.get("op_type", "?"))
        counts[label] = counts.get(label, 0) + 1
    uses = [f"{n} {k}" for k, n in counts.items()]
    uses += [f"tied: {t['initializer']} ({t['layout']})" for t in row.get("ties", []) if t["layout"] != "shared"]
    return ", ".join(uses)


def store_rows(store: Any) -> list[list[str]]:
    """Summary rows (table, source layer, shape, dtype, bytes) of an opened store."""
    rows = []
    for name in store:
        entry = store.entry(name)
        source = ", ".join(s["layer"] for s in entry.get("source", [])) or "(unmapped)"
        quant = entry.get("quantization")
        dtype = entry["dtype"]
        if quant:
            dtype = f'{dtype} -> {quant.get("out_dtype", "float32")} ({quant["scheme"]})'
        rows.append([name, source, "x".join(map(str, entry["shape"])), dtype, human_bytes(entry["nbytes"])])
    return rows


def store_summary(store: Any) -> dict[str, Any]:
    """JSON summary of a written store."""
    return {"store": str(store.path), "manifest": str(store.path / "manifest.json"), "tables": store.manifest["tables"]}


def run_extract(args: argparse.Namespace) -> int:
    from bridge.extract import extract

    store = extract(args.model, args.out, force=args.force)
    wrote(args.out)
    for name in store:
        if (store.entry(name).get("metadata") or {}).get("onnx", {}).get("overridable"):
            note(f"warning: table {name!r}: its initializer is also a graph input, which callers may override; "
                 "the store holds the model's default values")
    if args.json:
        emit_json(store_summary(store))
        return 0
    say(format_table(["table", "source layer", "shape", "dtype", "bytes"], store_rows(store)))
    say(f"\nstore written to {store.path}/ (manifest.json, {len(store)} table file(s))")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from converters.keras import convert

    note(f"converting {args.model} with tf2onnx ...")
    if args.opset is not None:
        _check_opset(args.opset)
    result = convert(args.model, args.out, force=args.force, safe_mode=not args.unsafe, opset=args.opset,
                     large=args.large)
    wrote(args.out)
    parity = None if args.no_parity else result_parity(result)
    if args.json:
        emit_json({**store_summary(result.store), "onnx_model": str(result.onnx_path),
                   "parity": parity.to_json() if parity is not None else None, "warnings": list(result.warnings)})
    else:
        say(format_table(["table", "source layer", "shape", "dtype", "bytes"], store_rows(result.store)))
        for warning in result.warnings:
            say(f"warning: {warning}")
        say(f"\nONNX model: {result.onnx_path}\nstore:      {result.store.path}/manifest.json")
        if parity is not None:
            say("\n" + parity.to_text())
    return 0 if parity is None or parity else 3


def _check_opset(opset: int) -> None:
    """InputError for an opset tf2onnx cannot convert to (it names the range it supports)."""
    from tf2onnx.constants import OPSET_TO_IR_VERSION  # tf2onnx imports TensorFlow, which convert needs anyway

    highest = max(OPSET_TO_IR_VERSION)
    if not 9 <= opset <= highest:
        raise InputError(f"--opset {opset} is not one tf2onnx {_tf2onnx_version()} converts to; choose 9..{highest} "
                         "(default 17)")


def _tf2onnx_version() -> str:
    from importlib.metadata import version

    return version("tf2onnx")


def result_parity(result: Any) -> Any:
    """Parity of a conversion result (all adapters against Keras and the ONNX model)."""
    from converters.keras_parity import conversion_parity

    note("checking parity: Keras layers, the ONNX model and every backend ...")
    return conversion_parity(result)
