"""The JSON document (schema ``embridge-bench/4``), its validation, and the Markdown report.

The schema is documented field by field in ``benchmarks/README.md``; :func:`validate` checks a document
against the same description (:data:`FIELDS`) and returns a list of problems (empty when it conforms).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from benchmarks import SCHEMA
from bridge.render import markdown_table

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_INT = (int, type(None))
OPT_STR = (str, type(None))
STATS = {"median_s": NUM, "q1_s": NUM, "q3_s": NUM, "iqr_s": NUM, "min_s": NUM, "samples": int, "inner": int,
         "cpu_median_s": NUM}

#: Required fields and their types, per object kind (``list:<kind>`` = a list of such objects).
FIELDS: dict[str, dict[str, Any]] = {
    "document": {"schema": str, "created": str, "duration_s": NUM, "mode": str, "command": OPT_STR,
                 "config": "config", "machine": "machine", "cpu": "cpu", "variants": "list:variant",
                 "tables": "list:table", "results": "list:result", "pairs": "list:pair", "errors": "list:error",
                 "skipped": "list:skip", "tokens": "tokens?", "targets": "list:target"},
    "config": {"mode": str, "tables": "list:config_table", "batches": list, "distributions": list, "zipf_s": NUM,
               "repeats": int, "min_repeats": int, "sample_s": NUM, "warmup_s": NUM, "variant_budget_s": NUM,
               "pairs": int, "min_pairs": int, "pair_sample_s": NUM, "pair_sample_pool_s": NUM,
               "paired_min_batch": int, "seed": int,
               "tensorflow": bool, "gensim": bool, "variants": list, "keras_max_batch": OPT_INT,
               "gensim_max_batch": OPT_INT, "tokens": int, "token_vocab": int, "token_dim": int,
               "token_repeats": int, "extra": dict},
    "config_table": {"name": str, "rows": int, "dim": int, "dtype": str, "bytes": int},
    "machine": {"platform": str, "machine": str, "python": str, "cpu_model": OPT_STR, "cpu_count": OPT_INT,
                "cpu_affinity": OPT_INT, "memory_bytes": OPT_INT, "versions": dict, "env": dict, "timer": "timer"},
    "timer": {"clock": str, "resolution_s": NUM, "loop_overhead_s": NUM, "stack_depths": int},
    "error": {"variant": str, "error": str},
    "skip": {"variant": str, "reason": str},
    "cpu": {"wall_s": NUM, "load_average_start": (list, type(None)), "load_average_end": (list, type(None)),
            "busy_cores": OPT_NUM, "self_cores": NUM, "other_cores": OPT_NUM},
    "variant": {"name": str, "framework": str, "kind": str, "threads": OPT_INT, "form": str, "description": str,
                "max_batch": OPT_INT, "max_samples": OPT_INT},
    "table": {"name": str, "rows": int, "dim": int, "dtype": str, "bytes": int, "setup_s": NUM, "cpu": "cpu"},
    "result": {"variant": str, "table": str, "distribution": str, "batch": int, **STATS, "bytes_out": int,
               "gb_per_s": NUM, "vs_np_take": OPT_NUM, "of_copy": OPT_NUM},
    "pair": {"adapter": str, "raw": str, "table": str, "distribution": str, "batch": int, "ratio": NUM,
             "ratio_q1": NUM, "ratio_q3": NUM, "cpu_ratio": NUM, "adapter_median_s": NUM, "raw_median_s": NUM,
             "pairs": int, "inner": int, "noise_ratio": NUM, "noise_q1": NUM, "noise_q3": NUM},
    "tokens": {"tokens": int, "vocab": int, "dim": int, "distribution": str, "results": "list:token_result",
               "skipped": "list:skip", "errors": "list:error"},
    "token_result": {"variant": str, **STATS, "per_token_s": NUM, "speedup_vs_gensim": OPT_NUM},
    "target": {"name": str, "description": str, "comparison": str, "threshold": NUM, "value": OPT_NUM,
               "value_cpu": OPT_NUM, "unit": str, "passed": (bool, type(None)), "detail": str},
}
KINDS = ("adapter", "raw", "limit")
#: The values an enumerated field may take: (path of the list or object, field) -> allowed values.
MODES = ("quick", "full", "quick+custom", "full+custom")
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("variants", "kind"): KINDS, ("variants", "form"): ("alloc", "out"),
    ("variants", "framework"): ("numpy", "torch", "onnxruntime", "tensorflow", "keras", "gensim", "memory"),
    ("results", "distribution"): ("uniform", "zipf"), ("pairs", "distribution"): ("uniform", "zipf"),
    ("targets", "comparison"): ("<=", ">="), ("targets", "unit"): ("s", "x", "fraction"),
}
NOISY_OTHER_CORES = 0.2


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Add ``gb_per_s``, ``vs_np_take`` (median / np.take's) and ``of_copy`` (memcpy's / median) in place."""
    cells: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for r in results:
        cells[(r["table"], r["distribution"], r["batch"])][r["variant"]] = r["median_s"]
    for r in results:
        cell = cells[(r["table"], r["distribution"], r["batch"])]
        median = r["median_s"]
        r["gb_per_s"] = r["bytes_out"] / median / 1e9 if median > 0 else 0.0
        r["vs_np_take"] = median / cell["np.take"] if cell.get("np.take") else None
        r["of_copy"] = cell["memcpy"] / median if cell.get("memcpy") and median > 0 else None


def validate(doc: Any) -> list[str]:
    """Problems with ``doc`` against :data:`FIELDS` and the cross-references; empty when it conforms."""
    problems = _check(doc, "document", "$")
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"$.schema is {doc['schema']!r}, expected {SCHEMA!r}")
    names = {v["name"] for v in doc["variants"]}
    tables = {t["name"] for t in doc["tables"]}
    for mode, where in ((doc["mode"], "$.mode"), (doc["config"]["mode"], "$.config.mode")):
        if mode not in MODES:
            problems.append(f"{where} {mode!r} is not one of {MODES}")
    for (section, key), allowed in ENUMS.items():
        for i, item in enumerate(doc[section]):
            if item[key] not in allowed:
                problems.append(f"$.{section}[{i}].{key} {item[key]!r} is not one of {allowed}")
    for where, loads in (("start", doc["cpu"]["load_average_start"]), ("end", doc["cpu"]["load_average_end"])):
        if loads is not None and not all(isinstance(x, NUM) and not isinstance(x, bool) for x in loads):
            problems.append(f"$.cpu.load_average_{where} should hold numbers")
    for i, r in enumerate(doc["results"]):
        if r["variant"] not in names or r["table"] not in tables:
            problems.append(f"$.results[{i}] names an unknown variant or table ({r['variant']}, {r['table']})")
    for i, p in enumerate(doc["pairs"]):
        if p["adapter"] not in names or p["raw"] not in names or p["table"] not in tables:
            names_used = f"{p['adapter']}, {p['raw']}, {p['table']}"
            problems.append(f"$.pairs[{i}] names an unknown variant or table ({names_used})")
    return problems


def _check(obj: Any, kind: str, path: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{path} should be an object ({kind})"]
    problems = []
    for key, want in FIELDS[kind].items():
        if key not in obj:
            problems.append(f"{path}.{key} is missing")
            continue
        value, where = obj[key], f"{path}.{key}"
        if isinstance(want, str) and want.startswith("list:"):
            if not isinstance(value, list):
                problems.append(f"{where} should be a list")
                continue
            for i, item in enumerate(value):
                problems += _check(item, want[5:], f"{where}[{i}]")
        elif isinstance(want, str):
            if not (want.endswith("?") and value is None):
                problems += _check(value, want.rstrip("?"), where)
        elif not isinstance(value, want) or (isinstance(value, bool) and bool not in _as_tuple(want)):
            problems.append(f"{where} has type {type(value).__name__}, expected {_names(want)}")
    return problems


def _as_tuple(want: Any) -> tuple[type, ...]:
    return want if isinstance(want, tuple) else (want,)


def _names(want: Any) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _as_tuple(want))


# --- Markdown -----------------------------------------------------------------------------------------

def fmt_time(seconds: float | None) -> str:
    """``1.62e-6`` -> ``"1.62 us"`` (three significant digits)."""
    if seconds is None:
        return "-"
    for scale, unit in ((1e-6, "ns"), (1e-3, "us"), (1.0, "ms")):
        if seconds < scale:
            return f"{_sig(seconds / scale * 1e3)} {unit}"
    return f"{_sig(seconds)} s"


def _sig(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def to_markdown(doc: dict[str, Any]) -> str:
    """The whole report: run summary, targets, token lookups, then one latency table per table x distribution."""
    parts = [f"# Lookup benchmark ({doc['mode']} mode)", "", summary_lines(doc), "", "## Targets", ""]
    if doc["mode"].startswith("quick"):
        cfg = doc["config"]
        parts += [f"Quick mode takes short samples (`sample_s` = {cfg['sample_s'] * 1e3:g} ms, at most {cfg['pairs']} "
                  "pairs): its ratios move by 10-15% from run to run. It is a smoke test; judge the targets on a "
                  "full run.", ""]
    parts.append(targets_table(doc["targets"]))
    if doc["pairs"]:
        parts += ["", "## Adapters against the fastest raw call of their framework, paired", "",
                  "Each `out=` adapter and its framework's fastest raw call (same threads, same cell) timed in "
                  "adjacent pairs of samples, which goes first alternating; the ratio is the median of the "
                  "per-pair ratios (quartiles in brackets). \"Raw call against itself\" is the same method "
                  "applied to identical work in the same cell: the noise the ratio carries.", "",
                  pairs_table(doc["pairs"])]
    if doc.get("tokens"):
        parts += ["", f"## Token lookups ({doc['tokens']['tokens']:,} Zipf tokens, vocabulary "
                  f"{doc['tokens']['vocab']:,}, dim {doc['tokens']['dim']})", "", tokens_table(doc["tokens"])]
    for table in doc["tables"]:
        for dist in doc["config"]["distributions"]:
            parts += ["", f"## {table['name']}: {table['rows']:,} x {table['dim']} {table['dtype']} "
                      f"({table['bytes'] / 2**20:,.1f} MiB), {dist} ids", "",
                      "Median time per call; in brackets, the ratio to `np.take` in the same cell (lower is faster).",
                      "", latency_table(doc, table["name"], dist)]
    tokens = doc.get("tokens") or {}
    problems = [*doc["errors"], *doc["skipped"], *tokens.get("errors", []), *tokens.get("skipped", [])]
    if problems:
        parts += ["", "## Skipped or failed variants", ""]
        parts += [f"- {p['variant']} ({_where(p)}): {p.get('reason') or p.get('error')}" for p in problems]
    return "\n".join(parts) + "\n"


def summary_lines(doc: dict[str, Any]) -> str:
    m, cpu = doc["machine"], doc["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return "\n".join([
        f"- run: {doc['created']}, {doc['duration_s']:.0f} s; command: `{doc.get('command') or 'python API'}`",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPU(s), {m['platform']}, Python {m['python']}",
        f"- load average (1/5/15 min) at start {cpu['load_average_start']}, at end {cpu['load_average_end']}; "
        f"other processes kept {cpu['other_cores']} core(s) busy on average during the run" + _busy_warning(doc),
        f"- versions: {versions}",
        f"- timing loop overhead: {fmt_time(m['timer'].get('loop_overhead_s'))} per call (included in every figure); "
        f"each sample {m['timer'].get('stack_depths', 1) - 1} or fewer extra C stack frames deep, at random",
    ])


def _busy_warning(doc: dict[str, Any]) -> str:
    other, cores = doc["cpu"]["other_cores"], doc["machine"]["cpu_count"] or 1
    if other is None or other < NOISY_OTHER_CORES:
        return ""
    return (f" (**busy machine**: {other:.2f} of {cores} cores taken by other processes; figures are noisy, "
            "multi-thread figures especially; `cpu_median_s` in the JSON is steadier for single-thread variants)")


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        result = {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"]]
        rows.append([t["description"], f"{t['comparison']} {_value(t['threshold'], t['unit'])}",
                     _value(t["value"], t["unit"]), result, _value(t["value_cpu"], t["unit"]), t["detail"]])
    return markdown_table(["target", "threshold", "value", "result", "CPU-time value", "where"], rows)


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return fmt_time(v)
    if unit == "fraction":
        return f"{v * 100:.0f}%"
    return f"{v:.2f}x"


def pairs_table(pairs: list[dict[str, Any]]) -> str:
    rows = [[p["adapter"], p["raw"], f"{p['table']}/{p['distribution']}/{p['batch']:,}",
             f"{p['ratio']:.3f}x ({p['ratio_q1']:.3f}-{p['ratio_q3']:.3f})",
             f"{p['noise_ratio']:.3f}x ({p['noise_q1']:.3f}-{p['noise_q3']:.3f})", f"{p['cpu_ratio']:.3f}x",
             fmt_time(p["adapter_median_s"]), fmt_time(p["raw_median_s"]), f"{p['pairs']} x {p['inner']}"]
            for p in pairs]
    return markdown_table(["adapter", "fastest raw call", "cell", "ratio", "raw call against itself",
                           "CPU-time ratio", "adapter", "raw", "pairs x calls"], rows)


def tokens_table(tokens: dict[str, Any]) -> str:
    rows = [[r["variant"], fmt_time(r["median_s"]), fmt_time(r["per_token_s"]),
             "-" if r["speedup_vs_gensim"] is None else f"{r['speedup_vs_gensim']:.2f}x"] for r in tokens["results"]]
    return markdown_table(["variant", "per call", "per token", "speed-up vs gensim"], rows)


def latency_table(doc: dict[str, Any], table: str, dist: str) -> str:
    cells = {(r["variant"], r["batch"]): r for r in doc["results"] if r["table"] == table and r["distribution"] == dist}
    batches = list(doc["config"]["batches"])
    rows = []
    for v in doc["variants"]:
        if not any((v["name"], b) in cells for b in batches):
            continue
        row = [v["name"], v["kind"]]
        for b in batches:
            r = cells.get((v["name"], b))
            row.append("" if r is None else f"{fmt_time(r['median_s'])}" + (
                f" ({r['vs_np_take']:.2f}x)" if r["vs_np_take"] is not None else ""))
        rows.append(row)
    return markdown_table(["variant", "kind", *[f"{b:,}" for b in batches]], rows)


def _where(p: dict[str, Any]) -> str:
    keys = [str(p[k]) for k in ("table", "distribution", "batch") if k in p]
    return "/".join(keys) or "tokens"
