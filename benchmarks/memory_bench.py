"""Memory of huge and shared tables: extraction peak RSS, disk bytes, and PSS of 4 serving processes.

Builds two ONNX models (``Gather -> ReduceMax`` and ``Gather -> ReduceMin``) over the same
``rows x dim`` float32 table, each in its own directory with its own copy of the table (external
data; also inline when the table is under 2 GiB), then measures, each in a fresh child process:

- ``embridge extract`` of one model: peak RSS (VmHWM) and time; target <= 1.1 x table + 200 MB;
- ``embridge share`` of both models: peak RSS, time, and disk bytes before and after;
- serving: ``--procs`` processes each serving both models and touching every row, the sum of their
  PSS (``/proc/PID/smaps_rollup``), for the shared store (tables given through
  ``SessionOptions.add_initializer``, or mapped by onnxruntime as external data) against the
  unshared originals; target <= 1.2 x table. An idle process (Python + onnxruntime + a tiny
  session) is measured too, so the per-process overhead can be told apart from the table.

Usage: ``python benchmarks/memory_bench.py`` (600,000 x 1024 = 2.4 GiB; needs ~10 GB of disk and
~6 GB of free memory) or ``--rows 50000 --dim 1024`` for a quick run. Prints a Markdown table and
writes JSON (``--json-out``). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
_BATCH = 5 * 128  # ids per serving call: small, so onnxruntime's buffers stay small next to the table


# ------------------------------------------------------------------------------ building the models


def write_table(path: Path, rows: int, dim: int, seed: int = 0) -> int:
    """Write a ``rows x dim`` float32 table of random normals to ``path`` in chunks; return its bytes."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        for start in range(0, rows, _CHUNK_ROWS):
            rng.standard_normal((min(_CHUNK_ROWS, rows - start), dim), dtype=np.float32).tofile(fh)
    return rows * dim * 4


def gather_model(reduce: str, rows: int, dim: int) -> Any:
    """``out = reduce(Gather(W, ids), axis=1)``; ``W`` a one-row placeholder (pointed at a file afterwards)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="gather"),
             helper.make_node(reduce, ["emb"], ["out"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", dim])],
                              [numpy_helper.from_array(np.zeros((1, dim), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def build_originals(work: Path, rows: int, dim: int, inline: bool) -> dict[str, list[Path]]:
    """Two models, each with its own external copy of the table; plus inline copies if ``inline``."""
    from bridge.external import point_initializer_at_file, save_model

    nbytes = 0
    variants: dict[str, list[Path]] = {"external": []}
    for i, reduce in enumerate(("ReduceMax", "ReduceMin")):
        folder = work / "originals" / f"model_{i}"
        folder.mkdir(parents=True)
        if i == 0:
            nbytes = write_table(folder / "table.bin", rows, dim)
        else:
            shutil.copyfile(work / "originals" / "model_0" / "table.bin", folder / "table.bin")
        model = gather_model(reduce, rows, dim)
        point_initializer_at_file(model, "W", "table.bin", 0, nbytes, (rows, dim), np.float32)
        save_model(model, folder / "model.onnx")
        variants["external"].append(folder / "model.onnx")
    if inline:
        variants["inline"] = [_inline_copy(p, work / "inline" / f"model_{i}.onnx")
                              for i, p in enumerate(variants["external"])]
    return variants


def _inline_copy(model_path: Path, out: Path) -> Path:
    from bridge.onnx_io import load_model

    model = load_model(model_path, load_external_data=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out


# ------------------------------------------------------------------------------ child processes


def worker(argv: list[str]) -> None:
    """``--worker extract|share|serve|idle ...``: one measured job, reported as JSON on stdout."""
    job, args = argv[0], argv[1:]
    start = time.perf_counter()
    if job == "extract":
        from bridge.extract import extract

        extract(args[0], args[1])
    elif job == "share":
        from bridge.share import share

        share(args[1:], args[0])
    elif job in ("serve-shared", "serve-ort-mmap", "serve-plain", "idle"):
        _serve(job, args)
        return
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": _status("VmHWM")}), flush=True)


def _serve(job: str, args: list[str]) -> None:
    rows = int(args[0])
    if job == "idle":
        import onnxruntime as ort

        sessions = [ort.InferenceSession(gather_model("ReduceMax", 1, 4).SerializeToString(),
                                         providers=["CPUExecutionProvider"])]
    elif job == "serve-plain":
        from bridge.share_check import ort_session

        sessions = [ort_session(p) for p in args[1:]]
    else:
        from bridge.serving import SharedSessions

        shared = SharedSessions(args[1], in_process_sharing=job == "serve-shared")
        sessions = [shared.session(p) for p in args[2:]]
    if job != "idle":
        for session in sessions:
            for start in range(0, rows - rows % 5, _BATCH):
                ids = np.arange(start, min(start + _BATCH, rows - rows % 5), dtype=np.int64).reshape(-1, 5)
                session.run(None, {"ids": ids})
    print("ready", flush=True)
    sys.stdin.readline()


def _status(key: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def _python() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker"]


def _env() -> dict[str, str]:
    return {**os.environ, "EMBRIDGE_NO_PROGRESS": "1"}


def run_job(*args: str) -> dict[str, Any]:
    """Run one measured job in a fresh process; its JSON result."""
    proc = subprocess.run([*_python(), *args], capture_output=True, text=True, check=False, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"job {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_pss(procs: int, *args: str) -> dict[str, Any]:
    """Start ``procs`` serving processes, wait until each touched every row, sum their PSS and RSS."""
    children = [subprocess.Popen([*_python(), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=_env()) for _ in range(procs)]
    try:
        for child in children:
            line = child.stdout.readline() if child.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"serving process {args[0]} did not start (exit {child.wait()})")
        rollups = [_rollup(c.pid) for c in children]
    finally:
        for child in children:
            child.communicate("\n", timeout=120)
    return {"pss_sum": sum(r["Pss"] for r in rollups), "rss_sum": sum(r["Rss"] for r in rollups),
            "pss_each": [r["Pss"] for r in rollups]}


# ------------------------------------------------------------------------------ the benchmark


def dir_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run(rows: int, dim: int, procs: int, work: Path) -> dict[str, Any]:
    """Build the models, run every measurement; the results as a JSON-ready dict."""
    nbytes = rows * dim * 4
    inline = nbytes < 2**31 - 2**24
    t0 = time.perf_counter()
    originals = build_originals(work, rows, dim, inline)
    result: dict[str, Any] = {"rows": rows, "dim": dim, "table_bytes": nbytes, "procs": procs,
                              "build_seconds": time.perf_counter() - t0, "machine": _machine()}
    result["extract"] = run_job("extract", str(originals["external"][0]), str(work / "extracted"))
    result["share"] = run_job("share", str(work / "shared"), *map(str, originals["external"]))
    shared_models = sorted(p.name for p in (work / "shared").glob("*.onnx"))
    result["disk"] = {"originals_external": dir_bytes(work / "originals"), "shared": dir_bytes(work / "shared"),
                      "originals_inline": dir_bytes(work / "inline") if inline else None}
    serving = {
        "idle": serve_pss(procs, "idle", "0"),
        "shared (add_initializer)": serve_pss(procs, "serve-shared", str(rows), str(work / "shared"), *shared_models),
        "shared (onnxruntime maps the store)": serve_pss(procs, "serve-ort-mmap", str(rows), str(work / "shared"),
                                                         *shared_models),
        "unshared (own external data)": serve_pss(procs, "serve-plain", str(rows), *map(str, originals["external"])),
    }
    if inline:
        serving["unshared (inline)"] = serve_pss(procs, "serve-plain", str(rows), *map(str, originals["inline"]))
    result["serving"] = serving
    return result


def _machine() -> dict[str, Any]:
    mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
           if line.startswith(("MemTotal", "MemAvailable"))}
    from importlib import metadata

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), **mem,
            "onnxruntime": metadata.version("onnxruntime"), "numpy": np.__version__}


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table, with targets where the issue sets one."""
    t = result["table_bytes"]
    mib = lambda n: f"{n / MiB:,.0f} MiB" if n is not None else "n/a"  # noqa: E731
    ratio = lambda n: f"{n / t:.2f}x" if n is not None else ""  # noqa: E731
    idle = result["serving"]["idle"]["pss_sum"]
    rows = [
        ("extract: peak RSS", mib(result["extract"]["peak_rss"]), ratio(result["extract"]["peak_rss"]),
         "<= 1.1x + 200 MB", _ok(result["extract"]["peak_rss"] <= 1.1 * t + 200 * MiB)),
        ("extract: time", f"{result['extract']['seconds']:.1f} s", "", "", ""),
        ("share 2 models: peak RSS", mib(result["share"]["peak_rss"]), ratio(result["share"]["peak_rss"]), "", ""),
        ("share 2 models: time", f"{result['share']['seconds']:.1f} s", "", "", ""),
        ("disk: originals (own external data)", mib(result["disk"]["originals_external"]),
         ratio(result["disk"]["originals_external"]), "", ""),
        ("disk: originals (inline)", mib(result["disk"]["originals_inline"]), ratio(result["disk"]["originals_inline"]),
         "", ""),
        ("disk: shared store + 2 models", mib(result["disk"]["shared"]), ratio(result["disk"]["shared"]), "", ""),
    ]
    for name, s in result["serving"].items():
        label = f"{result['procs']} procs idle (Python + onnxruntime)" if name == "idle" else \
            f"{result['procs']} procs x 2 models, {name}"
        target = "<= 1.2x" if name.startswith("shared") else ""
        verdict = _ok(s["pss_sum"] <= 1.2 * t) if target else ""
        rows.append((f"{label}: sum of PSS", mib(s["pss_sum"]), ratio(s["pss_sum"]), target, verdict))
        if name != "idle":
            rows.append((f"{label}: sum of PSS minus idle", mib(s["pss_sum"] - idle), ratio(s["pss_sum"] - idle),
                         "", ""))
    head = f"Table {result['rows']:,} x {result['dim']} float32 = {mib(t)}\n\n"
    lines = ["| measure | value | x table | target | met |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return head + "\n".join(lines)


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600_000, help="table rows (default 600,000)")
    parser.add_argument("--dim", type=int, default=1024, help="table dimension (default 1024)")
    parser.add_argument("--procs", type=int, default=4, help="serving processes (default 4)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json-out", type=Path, default=Path("bench-out/memory_bench.json"),
                        help="where to write the JSON (default bench-out/memory_bench.json)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="memory_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        parser.error(f"--work {work} is not empty")
    try:
        result = run(args.rows, args.dim, args.procs, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nJSON written to {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
