"""PNG plots (matplotlib, Agg backend; imported only when plotting).

- ``latency.png``: median time per call against batch size, log-log; one row per table, one column per
  framework; uniform ids. Each panel shows that framework's raw calls (dashed) and the bridge adapters
  (solid), with ``np.take`` (grey) and single-thread ``memcpy`` (black, dotted) for reference.
- ``bandwidth.png``: output bytes per second as a percentage of single-thread copy bandwidth
  (``memcpy`` time / variant time), against batch size; one panel per table and id distribution; the
  adapters writing into ``out=``, the fastest raw call of each framework, and ``np.take``.
- ``pairs.png``: the paired comparisons (``doc["pairs"]``): each ``out=`` adapter's time over its
  framework's fastest raw call, median and quartiles of the per-pair ratios, per cell, against the
  1.10x target, next to that raw call timed against itself (grey); a note instead when the run had no
  cell of ``paired_min_batch`` ids.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from bridge.atomic import atomic_file

FAMILIES = (("numpy", ("numpy",)), ("torch", ("torch",)), ("onnxruntime", ("onnxruntime",)),
            ("tensorflow / keras", ("tensorflow", "keras")), ("gensim", ("gensim",)))
REFERENCES: dict[str, dict[str, Any]] = {"np.take": {"color": "0.55", "linewidth": 1.0},
                                         "memcpy": {"color": "black", "linestyle": ":"}}


PLOT_NAMES = ("latency.png", "bandwidth.png", "pairs.png")


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``latency.png``, ``bandwidth.png`` and ``pairs.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = [out_dir / name for name in PLOT_NAMES]
    for path, draw in zip(paths, (_latency, _bandwidth, _pairs), strict=True):
        fig = draw(plt, doc)
        try:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
        finally:
            plt.close(fig)
        with atomic_file(path) as fh:
            fh.write(buffer.getvalue())  # type: ignore[attr-defined]
    return paths


def _series(doc: dict[str, Any], table: str, dist: str) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    found: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for r in doc["results"]:
        if r["table"] == table and r["distribution"] == dist:
            found[r["variant"]].append((r["batch"], r))
    for points in found.values():
        points.sort(key=lambda p: p[0])
    return found


def _latency(plt: Any, doc: dict[str, Any]) -> Any:
    variants = {v["name"]: v for v in doc["variants"]}
    used = {variants[r["variant"]]["framework"] for r in doc["results"] if r["variant"] in variants}
    families = [(label, fws) for label, fws in FAMILIES if used & set(fws)] or [FAMILIES[0]]
    tables = [t["name"] for t in doc["tables"]] or ["(none)"]
    dist = "uniform" if "uniform" in doc["config"]["distributions"] else doc["config"]["distributions"][0]
    fig, axes = plt.subplots(len(tables), len(families), figsize=(4.2 * len(families), 3.4 * len(tables)),
                             squeeze=False)
    for i, table in enumerate(tables):
        series = _series(doc, table, dist)
        for j, (label, fws) in enumerate(families):
            ax = axes[i][j]
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
            for name, points in series.items():
                v = variants.get(name)
                if name in REFERENCES:
                    style = REFERENCES[name]
                elif v is not None and v["framework"] in fws:
                    style = {"linestyle": "-" if v["kind"] == "adapter" else "--", "marker": "o", "markersize": 3}
                else:
                    continue
                ax.plot([b for b, _ in points], [r["median_s"] for _, r in points], label=name, **style)
            _batch_axis(ax)
            ax.set_yscale("log")
            ax.set_title(f"{label}: {table} table", fontsize=9)
            ax.set_xlabel("batch size (ids)", fontsize=8)
            ax.set_ylabel("median s / call", fontsize=8)
            ax.grid(True, which="both", alpha=0.25)
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Lookup latency vs batch size ({dist} ids; solid: bridge adapters, dashed: raw calls)", fontsize=10)
    fig.tight_layout()
    return fig


def _bandwidth(plt: Any, doc: dict[str, Any]) -> Any:
    variants = {v["name"]: v for v in doc["variants"]}
    tables = [t["name"] for t in doc["tables"]] or ["(none)"]
    dists = list(doc["config"]["distributions"])
    fig, axes = plt.subplots(len(dists), len(tables), figsize=(5.2 * len(tables), 3.6 * len(dists)), squeeze=False)
    for i, dist in enumerate(dists):
        for j, table in enumerate(tables):
            ax = axes[i][j]
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
            series = _series(doc, table, dist)
            for name in _bandwidth_lines(series, variants):
                points = [(b, r["of_copy"] * 100) for b, r in series[name] if r.get("of_copy")]
                if not points:
                    continue
                v = variants.get(name, {})
                style = REFERENCES.get(name) or {"linestyle": "-" if v.get("kind") == "adapter" else "--",
                                                  "marker": "o", "markersize": 3}
                ax.plot([b for b, _ in points], [p for _, p in points], label=name, **style)
            ax.axhline(100, color="black", linestyle=":", linewidth=0.8)
            _batch_axis(ax)
            ax.set_title(f"{table} table, {dist} ids", fontsize=9)
            ax.set_xlabel("batch size (ids)", fontsize=8)
            ax.set_ylabel("% of 1-thread copy bandwidth", fontsize=8)
            ax.grid(True, which="both", alpha=0.25)
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Throughput as % of single-thread memcpy of the output\n(solid: bridge adapters into out=; "
                 "dashed: fastest raw call per framework)", fontsize=9)
    fig.tight_layout()
    return fig


def _pairs(plt: Any, doc: dict[str, Any]) -> Any:
    from benchmarks.targets import PARITY_MAX_RATIO

    pairs = doc["pairs"]
    order = {t["name"]: i for i, t in enumerate(doc["tables"])}
    cells = sorted({(p["table"], p["distribution"], p["batch"]) for p in pairs},
                   key=lambda c: (order.get(c[0], len(order)), c[1], c[2]))
    adapters = list(dict.fromkeys(p["adapter"] for p in pairs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) + 2.5), 4.2))
    if not pairs:
        ax.text(0.5, 0.5, f"no cell of >= {doc['config']['paired_min_batch']:,} ids in this run:\nno paired comparison",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    width = 0.8 / max(1, len(adapters))
    for k, name in enumerate(adapters):
        mine = {(p["table"], p["distribution"], p["batch"]): p for p in pairs if p["adapter"] == name}
        xs = [i + (k - (len(adapters) - 1) / 2) * width for i, c in enumerate(cells) if c in mine]
        rows = [mine[c] for c in cells if c in mine]
        ratios = [r["ratio"] for r in rows]
        spread = [[r["ratio"] - r["ratio_q1"] for r in rows], [r["ratio_q3"] - r["ratio"] for r in rows]]
        ax.errorbar(xs, ratios, yerr=spread, fmt="o", markersize=4, capsize=2, label=name,
                    color=plt.cm.tab10.colors[k % 10])
        noise = [r["noise_ratio"] for r in rows]  # the same method on identical work: the raw call against itself
        noise_spread = [[r["noise_ratio"] - r["noise_q1"] for r in rows],
                        [r["noise_q3"] - r["noise_ratio"] for r in rows]]
        ax.errorbar([x + 0.35 * width for x in xs], noise, yerr=noise_spread, fmt="x", markersize=3, capsize=1,
                    color="0.6", linewidth=0.8, label="its raw call against itself" if k == 0 else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(PARITY_MAX_RATIO, color="tab:red", linestyle="--", linewidth=0.9,
               label=f"target {PARITY_MAX_RATIO:.2f}x")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{t}\n{d}\n{_short(b)}" for t, d, b in cells], fontsize=7)
    ax.set_ylabel("adapter time / fastest raw call", fontsize=8)
    ax.set_title("Adapters (out=) against their framework's fastest raw call: median of paired ratios, "
                 "quartiles as bars (grey x: the raw call against itself, the noise floor)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    return fig


def _batch_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _short(x)))


def _short(x: float) -> str:
    for scale, suffix in ((2**20, "M"), (2**10, "k")):
        if x >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def _bandwidth_lines(series: dict[str, Any], variants: dict[str, dict[str, Any]]) -> list[str]:
    """Adapters writing into out=, the fastest raw variant of each framework, and np.take.

    "Fastest" is judged at the largest batch any raw variant of that framework reached.
    """
    names = [n for n in series if variants.get(n, {}).get("kind") == "adapter" and variants[n]["form"] == "out"]
    top: dict[str, tuple[int, float, str]] = {}
    for name, points in series.items():
        v = variants.get(name)
        if v is None or v["kind"] != "raw" or name == "np.take" or not points:
            continue
        batch, row = points[-1]
        key = (batch, -row["median_s"], name)
        if v["framework"] not in top or key[:2] > top[v["framework"]][:2]:
            top[v["framework"]] = key
    return names + [name for _, _, name in top.values()] + [n for n in ("np.take",) if n in series]
