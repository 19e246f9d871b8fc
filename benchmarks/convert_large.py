"""Convert a Keras model with a table past tf2onnx's 2 GiB limit; measure time and peak RSS; prove parity.

Builds ``ids -> Embedding(rows, dim) -> [vectors, GlobalAveragePooling1D -> Dense(8)]`` with a
float32 table of random normals (default 600,000 x 1024 = 2.4 GiB), filled in chunks so building
costs about one table. Each measured step runs in a fresh child process:

- ``memory``: the model is built in the child, then ``converters.keras.convert`` runs on it (the
  large-table path is chosen automatically). Peak RSS of the conversion = the child's VmHWM, reset
  (``/proc/self/clear_refs``) just before ``convert``, so it counts the model already in memory.
- ``file`` (with ``--file``): a child saves the model as ``.keras``; another child runs
  ``convert(path)`` as ``embridge convert`` does, so Keras's own loading counts too.

After converting, each child loads ``OUT/model.onnx`` in onnxruntime (the table is memory-mapped
from the store's ``.npy``) and compares it with Keras on a few batches, negative ids included:
the vectors bitwise, the Dense head within atol=1e-5, rtol=1e-4 (pooling and a matmul follow the
lookup). Target (issue 5): conversion peak RSS <= 2 x the table.

Usage: ``python benchmarks/convert_large.py`` (needs ~8 GB free memory and ~5 GB of disk; ``--file``
another ~3 GB of memory and disk), ``--rows 75000`` for a quick run. Prints a Markdown table, then
the JSON document (also written to ``--json-out``); exits 1 if a conversion's vectors or head differ
(``correct`` false; ``meets_target`` needs both correctness and the memory bound). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 2**20
_CHUNK_ROWS = 16_384
TARGET_RATIO = 2.0
ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------------------ measuring


def proc_status(key: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ the model


def build_model(rows: int, dim: int, seed: int = 0, fill: str = "assign") -> Any:
    """The benchmark model, its table filled with random normals generated chunk by chunk.

    ``fill="assign"``: one ``assign`` of the whole array, as a model loaded from a file gets its
    weights (building peaks at ~2 tables). ``"slices"``: row-slice assigns (peak ~1 table), which put
    the TensorFlow variable in copy-on-read mode, like sparse optimizer updates do: every read of
    it then copies the whole table.
    """
    from converters.keras_env import import_keras

    _, keras = import_keras()
    keras.utils.set_random_seed(seed)
    ids = keras.Input((None,), dtype="int64", name="ids")
    layer = keras.layers.Embedding(rows, dim, embeddings_initializer="zeros", name="tok_emb")
    vectors = layer(ids)
    head = keras.layers.Dense(8, name="head")(keras.layers.GlobalAveragePooling1D(name="mean")(vectors))
    model = keras.Model(ids, [vectors, head], name="big")
    fill_table(layer, seed, fill)
    return model


def fill_table(layer: Any, seed: int, fill: str) -> None:
    """Random normals into ``layer.embeddings``, generated in row chunks (see :func:`build_model`)."""
    rng = np.random.default_rng(seed)
    var = layer.embeddings.value
    rows, dim = (int(d) for d in var.shape)
    whole = np.empty((rows, dim), np.float32) if fill == "assign" else None
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, rows)
        chunk = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if whole is not None:
            whole[start:stop] = chunk
        else:
            var[start:stop].assign(chunk)
    if whole is not None:
        var.assign(whole)


def sample_ids(rows: int, seed: int) -> list[np.ndarray]:
    """A few [batch, length] int64 batches: uniform ids, the edges, and negative ids (Keras wraps them)."""
    rng = np.random.default_rng(seed)
    edges = np.array([[0, 1, rows - 1, -1, -rows, -2, rows // 2, 7]], dtype=np.int64)
    return [rng.integers(0, rows, size=(4, 16), dtype=np.int64), edges,
            rng.integers(-rows, rows, size=(8, 32), dtype=np.int64)]


def onnx_vs_keras(model: Any, onnx_path: Path, rows: int, seed: int = 1) -> dict[str, Any]:
    """Run onnxruntime on ``onnx_path`` and Keras on the same ids; vectors bitwise, head with a tolerance."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    rss_session = proc_status("VmRSS")
    names = [o.name for o in session.get_outputs()]
    vec_name, head_name = model.output_names  # the ONNX outputs carry the Keras output names
    exact, head_diff, ok = True, 0.0, True
    for ids in sample_ids(rows, seed):
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: ids}), strict=True))
        vectors, head = (np.asarray(t) for t in model(ids))
        exact &= bool(np.array_equal(got[vec_name], vectors))
        head_diff = max(head_diff, float(np.max(np.abs(got[head_name] - head))))
        ok &= bool(np.allclose(got[head_name], head, atol=ATOL, rtol=RTOL))
    return {"session_load_s": round(load_s, 3), "rss_with_session_bytes": rss_session,
            "vectors_bitwise_equal": exact, "head_max_abs_diff": head_diff, "head_within_tolerance": ok,
            "batches": 3, "tolerance": {"atol": ATOL, "rtol": RTOL}}


def _convert(source: Any, out: Path) -> dict[str, Any]:
    from converters.keras import convert

    reset = reset_peak()
    before = proc_status("VmRSS")
    t0 = time.perf_counter()
    result = convert(source, out, force=True)
    seconds = time.perf_counter() - t0
    large = result.provenance.get("large_tables", {})
    return {"result": result, "convert_s": round(seconds, 2), "rss_before_bytes": before,
            "peak_rss_bytes": proc_status("VmHWM"), "peak_reset": reset, "large_path": large.get("reason"),
            "store_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "onnx_file_bytes": (out / "model.onnx").stat().st_size}


# ------------------------------------------------------------------------------ child steps


def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Build in this process, convert the in-memory model, compare with onnxruntime."""
    t0 = time.perf_counter()
    model = build_model(args.rows, args.dim, args.seed, args.fill)
    built = {"fill": args.fill, "build_s": round(time.perf_counter() - t0, 2),
             "build_peak_rss_bytes": proc_status("VmHWM"), "model_rss_bytes": proc_status("VmRSS")}
    conv = _convert(model, Path(args.workdir) / "store-memory")
    conv.pop("result")
    return {**built, **conv, **onnx_vs_keras(model, Path(args.workdir) / "store-memory" / "model.onnx", args.rows)}


def child_save(args: argparse.Namespace) -> dict[str, Any]:
    """Build and save ``big.keras`` (slice fill: the lowest build peak; the values do not depend on it)."""
    model = build_model(args.rows, args.dim, args.seed, "slices")
    path = Path(args.workdir) / "big.keras"
    t0 = time.perf_counter()
    model.save(path)
    return {"save_s": round(time.perf_counter() - t0, 2), "save_peak_rss_bytes": proc_status("VmHWM"),
            "keras_file_bytes": path.stat().st_size}


def child_file(args: argparse.Namespace) -> dict[str, Any]:
    """Convert ``big.keras`` from disk (Keras's loading included), compare with onnxruntime."""
    from converters.keras_env import import_keras

    import_keras()  # TensorFlow's own memory is not the conversion's
    import tf2onnx  # noqa: F401
    baseline = proc_status("VmRSS")
    conv = _convert(Path(args.workdir) / "big.keras", Path(args.workdir) / "store-file")
    result = conv.pop("result")
    onnx_path = Path(args.workdir) / "store-file" / "model.onnx"
    return {"baseline_rss_bytes": baseline, **conv, **onnx_vs_keras(result.keras_model, onnx_path, args.rows)}


CHILDREN = {"memory": child_memory, "save": child_save, "file": child_file}


def run_child(step: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its JSON result is the last line of stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--rows", str(args.rows),
           "--dim", str(args.dim), "--seed", str(args.seed), "--fill", args.fill, "--workdir", str(workdir)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "EMBRIDGE_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    table = doc["table_bytes"]
    lines = [f"Table {doc['rows']:,} x {doc['dim']} float32 = {_gib(table)}; target: conversion peak RSS <= "
             f"{TARGET_RATIO:g} x table = {_gib(int(TARGET_RATIO * table))}", "",
             "| step | time (s) | peak RSS | peak / table | RSS before | ONNX file | onnxruntime = Keras |",
             "|---|---|---|---|---|---|---|"]
    for step, r in doc["steps"].items():
        if "peak_rss_bytes" not in r:
            lines.append(f"| {step} | {r['save_s']} | {_gib(r['save_peak_rss_bytes'])} | "
                         f"{r['save_peak_rss_bytes'] / table:.2f} | - | - | - |")
            continue
        parity = (f"vectors {'bitwise' if r['vectors_bitwise_equal'] else 'DIFFER'}, head max diff "
                  f"{r['head_max_abs_diff']:.1e} ({'ok' if r['head_within_tolerance'] else 'FAIL'})")
        lines.append(f"| convert ({step}) | {r['convert_s']} | {_gib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / table:.2f} | {_gib(r['rss_before_bytes'])} | "
                     f"{r['onnx_file_bytes']:,} B | {parity} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=600_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fill", choices=("assign", "slices"), default="assign",
                   help="how the table gets its values (slices: TensorFlow copy-on-read mode; see build_model)")
    p.add_argument("--file", action="store_true", help="also save a .keras file and convert it from disk")
    p.add_argument("--workdir", default=None, help="where stores go (default: a temporary directory, removed)")
    p.add_argument("--json-out", default=None, help="also write the JSON document here")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert-large-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        steps = {"memory": run_child("memory", args, workdir)}
        if args.file:
            steps["save"] = run_child("save", args, workdir)
            steps["file"] = run_child("file", args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    table = args.rows * args.dim * 4
    converted = [s for s in steps.values() if "peak_rss_bytes" in s]
    correct = all(s["vectors_bitwise_equal"] and s["head_within_tolerance"] for s in converted)
    doc = {"rows": args.rows, "dim": args.dim, "table_bytes": table, "target_peak_ratio": TARGET_RATIO,
           "steps": steps, "correct": correct,
           "meets_target": correct and all(s["peak_rss_bytes"] <= TARGET_RATIO * table for s in converted)}
    print(markdown(doc))
    print(json.dumps(doc, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if correct else 1  # a wrong conversion is a failure, whatever its memory


if __name__ == "__main__":
    raise SystemExit(main())
