"""The benchmark suite on tiny sizes: the JSON schema, the Markdown, the PNG plots, the CLI. Never timings."""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import SCHEMA
from benchmarks.config import TableSpec, quick_config
from benchmarks.data import make_ids
from benchmarks.harness import STACK_DEPTHS, Bound, Limits, paired, plan_samples, round_robin, run_at_depth, time_sample
from benchmarks.report import validate  # noqa: E402
from benchmarks.runner import run_benchmark, write_outputs  # noqa: E402
from bridge.errors import InputError  # noqa: E402

TINY = TableSpec("tiny", 500, 8)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(**changes: Any) -> Any:
    base: dict[str, Any] = dict(tables=(TINY,), batches=(1, 16, 65536), tokens=1000, token_vocab=200, token_dim=8,
                                tensorflow=False, repeats=3, min_repeats=2, sample_s=0.0005, warmup_s=0.002,
                                variant_budget_s=0.05, token_repeats=2)
    base.update(changes)
    return quick_config(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("bench")
    doc = run_benchmark(tiny_config(gensim_max_batch=16), command="test", progress=False, tmp_dir=out)
    return doc, out, write_outputs(doc, out / "results")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    import zlib

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    crc = struct.unpack(">I", data[16 + length:20 + length])[0]
    assert crc == zlib.crc32(data[12:16 + length])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_document_matches_the_schema(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    doc, _, written = run
    assert validate(doc) == []
    on_disk = json.loads(written["json"].read_text())
    assert on_disk["schema"] == SCHEMA == "embridge-bench/4"
    assert validate(on_disk) == []
    assert on_disk["config"]["tables"][0] == {"name": "tiny", "rows": 500, "dim": 8, "dtype": "float32", "bytes": 16000}
    assert isinstance(on_disk["machine"]["timer"]["loop_overhead_s"], float)
    assert on_disk["cpu"]["self_cores"] >= 0


def test_every_cell_has_the_references_and_the_adapters(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    doc = run[0]
    assert doc["errors"] == []
    names = {(r["variant"], r["distribution"], r["batch"]) for r in doc["results"]}
    for variant in ("np.take", "memcpy", "np.take(out,clip)", "bridge.numpy", "bridge.numpy(out)",
                    "bridge.torch(out)@2t", "bridge.onnxruntime(out)@1t", "bridge.onnxruntime(out,wrap)@2t",
                    "ort.ortvaluevector(out)@2t"):
        for dist in ("uniform", "zipf"):
            for batch in (1, 16, 65536):
                assert (variant, dist, batch) in names
    assert not any(v["framework"] in ("tensorflow", "keras") for v in doc["variants"])  # tensorflow=False
    gensim_batches = {r["batch"] for r in doc["results"] if r["variant"] == "gensim.kv[ids]"}
    assert gensim_batches == {1, 16}  # capped at gensim_max_batch
    for r in doc["results"]:
        assert 0 < r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["samples"] >= 1 and r["inner"] >= 1
        assert r["bytes_out"] == r["batch"] * 8 * 4
        if r["variant"] == "np.take":
            assert r["vs_np_take"] == 1.0


def test_targets_are_evaluated_or_marked_not_measured(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    targets = {t["name"]: t for t in run[0]["targets"]}
    assert isinstance(targets["batch1-numpy"]["passed"], bool)
    assert isinstance(targets["large-batch-bridge.numpy(out)"]["passed"], bool)  # batch 65,536 was run
    assert targets["copy-bandwidth-large"]["passed"] is None  # no large table in this run
    assert targets["copy-bandwidth-large"]["value"] is None
    tokens = targets["tokens-bridge.numpy.tokens"]  # 1,000 tokens: the target is stated for 1,000,000
    assert tokens["value"] is None and tokens["passed"] is None and "the target is for 1,000,000" in tokens["detail"]
    assert isinstance(run[0]["tokens"]["results"][0]["speedup_vs_gensim"], float)  # measured all the same


def test_out_adapters_are_paired_with_their_fastest_raw_call(
        run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    doc = run[0]
    variants = {v["name"]: v for v in doc["variants"]}
    medians = {(r["variant"], r["distribution"], r["batch"]): r["median_s"] for r in doc["results"]}
    out_adapters = {n for n, v in variants.items() if v["kind"] == "adapter" and v["form"] == "out"}
    assert {(p["adapter"], p["distribution"]) for p in doc["pairs"]} == {(a, d) for a in out_adapters
                                                                         for d in ("uniform", "zipf")}
    for p in doc["pairs"]:
        assert p["batch"] == 65536  # only from PAIRED_MIN_BATCH on
        adapter, raw = variants[p["adapter"]], variants[p["raw"]]
        assert raw["kind"] == "raw" and raw["framework"] == adapter["framework"]
        assert (raw["threads"] or 1) == adapter["threads"]
        assert raw["form"] == "out"  # an allocating raw call is never the peer
        peers = [n for n, v in variants.items() if v["kind"] == "raw" and v["framework"] == adapter["framework"]
                 and v["form"] == "out" and (v["threads"] or 1) == adapter["threads"]
                 and (n, p["distribution"], 65536) in medians]
        assert medians[(p["raw"], p["distribution"], 65536)] == min(medians[(n, p["distribution"], 65536)]
                                                                     for n in peers)
        assert 0 < p["ratio_q1"] <= p["ratio"] <= p["ratio_q3"]
        assert 0 < p["noise_q1"] <= p["noise_ratio"] <= p["noise_q3"]
        assert 6 <= p["pairs"] <= 16 and p["pairs"] % 2 == 0
        length = doc["config"]["pair_sample_pool_s" if adapter["threads"] > 1 else "pair_sample_s"]  # a pool's: longer
        assert p["inner"] == max(1, round(length / medians[(p["raw"], p["distribution"], 65536)]))
    targets = {t["name"]: t for t in doc["targets"]}
    for name in out_adapters:
        assert targets[f"large-batch-{name}"]["value"] == max(p["ratio"] for p in doc["pairs"] if p["adapter"] == name)
    assert "## Adapters against the fastest raw call of their framework, paired" in run[2]["markdown"].read_text()


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_pool_is_woken_by_an_untimed_call_before_each_sample() -> None:
    """A variant that settles (a thread pool) finds its pool asleep: its first call is not a steady call."""
    state = {"calls": 0, "awake": False}

    def call() -> None:
        state["calls"] += 1
        spin(200e-6 if state["awake"] else 5e-3)  # waking the pool costs 5 ms, a steady call 0.2 ms
        state["awake"] = True

    for settles, low, high in ((True, 150e-6, 1e-3), (False, 1.5e-3, 3e-3)):
        state.update(calls=0, awake=False)
        wall, _ = time_sample(Bound(call=call, settle=settles), 3)
        assert state["calls"] == 3 + settles and low < wall < high


def test_an_allocating_raw_call_is_never_the_peer() -> None:
    """Even when its round-robin median is the lowest, the adapter is paired with the fastest out= raw call."""
    from benchmarks.harness import Stats
    from benchmarks.lookup_bench import run_pairs
    from benchmarks.variants import Variant

    def variant(name: str, kind: str, form: str) -> Variant:
        return Variant(name, "numpy", kind, 1, form, name, make=lambda ctx: None)  # type: ignore[arg-type,return-value]

    variants = [variant("take", "raw", "alloc"), variant("take(out)", "raw", "out"), variant("slow(out)", "raw", "out"),
                variant("adapter(out)", "adapter", "out")]
    medians = {"take": 1e-4, "take(out)": 2e-4, "slow(out)": 3e-4, "adapter(out)": 2e-4}
    stats = {n: Stats(m, m, m, m, 3, 1, m) for n, m in medians.items()}
    bounds = {n: Bound(call=int) for n in medians}
    rows = run_pairs(tiny_config(pairs=2, min_pairs=2), variants, bounds, stats)
    assert [(r["adapter"], r["raw"]) for r in rows] == [("adapter(out)", "take(out)")]
    del stats["take(out)"], stats["slow(out)"]  # only the allocating form ran: no pair at all
    assert run_pairs(tiny_config(pairs=2, min_pairs=2), variants, bounds, stats) == []


def test_paired_alternates_the_order_and_measures_the_ratio() -> None:
    entered: list[str] = []
    a = Bound(call=lambda: spin(400e-6), enter=lambda: entered.append("a"))
    b = Bound(call=lambda: spin(200e-6), enter=lambda: entered.append("b"))
    stats = paired(a, b, inner=5, pairs=6)
    assert entered == ["a", "b", "b", "a"] * 3
    assert stats.pairs == 6 and stats.inner == 5
    assert 1.5 < stats.ratio < 2.6 and stats.q1 <= stats.ratio <= stats.q3
    assert 380e-6 < stats.a_median and 190e-6 < stats.b_median < stats.a_median


def test_paired_stops_at_its_budget_after_an_even_number_of_pairs() -> None:
    calls: list[str] = []
    a = Bound(call=lambda: spin(1e-3), enter=lambda: calls.append("a"))
    b = Bound(call=lambda: spin(1e-3), enter=lambda: calls.append("b"))
    spent = paired(a, b, inner=1, pairs=100, budget_s=0.0, min_pairs=3)  # budget spent at once: stop after 4
    assert spent.pairs == 4 and calls == ["a", "b", "b", "a"] * 2
    assert paired(a, b, inner=1, pairs=3).pairs == 3  # no budget: exactly as many pairs as asked


def test_tokens_section(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    tokens = run[0]["tokens"]
    assert tokens["tokens"] == 1000 and tokens["errors"] == []
    variants = {r["variant"] for r in tokens["results"]}
    assert {"bridge.numpy.tokens", "gensim.kv[words]", "vocab.ids+np.take"} <= variants


def test_markdown_and_plots_are_written(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    _, _, written = run
    text = written["markdown"].read_text()
    assert text.startswith("# Lookup benchmark (quick mode)")
    assert "## Targets" in text and "## tiny: 500 x 8 float32" in text
    assert "| np.take | raw | " in text and "(1.00x)" in text
    for name in ("latency", "bandwidth", "pairs"):
        width, height = png_size(written[name])
        assert width > 200 and height > 200
    import matplotlib.image

    assert matplotlib.image.imread(written["latency"]).ndim == 3


def test_validate_names_the_problem(run: tuple[dict[str, Any], Path, dict[str, Path]]) -> None:
    doc = json.loads(run[2]["json"].read_text())
    doc["results"][0]["median_s"] = "fast"
    del doc["machine"]["versions"]
    doc["variants"][0]["kind"] = "other"
    problems = validate(doc)
    assert "$.results[0].median_s has type str, expected int or float" in problems
    assert "$.machine.versions is missing" in problems
    doc = json.loads(run[2]["json"].read_text())
    doc["variants"][0]["kind"] = "other"
    doc["schema"] = "embridge-bench/0"
    assert len(validate(doc)) == 2


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: d.update(config={}), "$.config.tables is missing"),
    (lambda d: d["machine"].pop("memory_bytes"), "$.machine.memory_bytes is missing"),
    (lambda d: d["machine"].update(timer={}), "$.machine.timer.clock is missing"),
    (lambda d: d["results"][0].update(distribution="gaussian"), "$.results[0].distribution 'gaussian' is not one of"),
    (lambda d: d["variants"][0].update(framework="jax"), "$.variants[0].framework 'jax' is not one of"),
    (lambda d: d["targets"][0].update(unit="furlongs"), "$.targets[0].unit 'furlongs' is not one of"),
    (lambda d: d["targets"][0].update(comparison="=="), "$.targets[0].comparison '==' is not one of"),
    (lambda d: d.update(mode="turbo"), "$.mode 'turbo' is not one of"),
    (lambda d: d.update(errors=[{"oops": 1}]), "$.errors[0].variant is missing"),
    (lambda d: d["cpu"].update(load_average_start=["a"]), "$.cpu.load_average_start should hold numbers"),
])
def test_validate_holds_the_whole_documented_schema(run: tuple[dict[str, Any], Path, dict[str, Path]],
                                                     change: Any, problem: str) -> None:
    doc = json.loads(run[2]["json"].read_text())
    change(doc)
    assert any(p.startswith(problem) for p in validate(doc)), validate(doc)


def test_zipf_ids_are_skewed_and_in_range() -> None:
    rng = np.random.default_rng(0)
    ids = make_ids(1000, 20000, "zipf", rng)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)
    assert counts[0] > 5 * counts[99] > 0  # weight 1/(k+1): row 0 about 100x row 99
    uniform = make_ids(1000, 20000, "uniform", rng)
    assert uniform.min() >= 0 and uniform.max() < 1000 and np.bincount(uniform).max() < 60


def frames() -> int:
    """Python frames on the stack now (each level of run_at_depth adds the same number)."""
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def test_run_at_depth_calls_once_and_nests_one_level_per_depth() -> None:
    calls: list[int] = []

    def probe() -> str:
        calls.append(frames())
        return "done"

    assert [run_at_depth(probe, d) for d in range(4)] == ["done"] * 4
    steps = {b - a for a, b in zip(calls, calls[1:], strict=False)}
    assert len(calls) == 4 and len(steps) == 1 and steps.pop() > 0  # one call each, one fixed step deeper per level


def test_samples_run_at_random_stack_depths_drawn_from_the_seed() -> None:
    def depths(run: Any, seed: int) -> list[int]:
        seen: list[int] = []
        bound = Bound(call=lambda: seen.append(frames()))
        run(bound, seed)
        return seen

    pairs = lambda bound, seed: paired(bound, bound, inner=1, pairs=16, seed=seed)  # noqa: E731
    rounds = lambda bound, seed: round_robin({"a": bound}, {"a": (1, 32)}, seed=seed)  # noqa: E731
    for run in (pairs, rounds):
        first = depths(run, 1)
        assert len(first) == 32 and 4 <= len(set(first)) <= STACK_DEPTHS  # 32 samples, many depths
        assert depths(run, 1) == first and depths(run, 2) != first  # the seed decides the draws


def test_stack_sites_times_the_same_call_at_every_depth(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import stack_sites

    medians = stack_sites.site_medians(rounds=2)
    assert len(medians) == stack_sites.SITES and all(0 < m < 1 for m in medians)
    assert stack_sites.main(["--rounds", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"us per call at depth 0..{stack_sites.SITES - 1}:")


def test_round_robin_takes_the_planned_samples() -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}
    entered: list[str] = []

    def bound(name: str) -> Bound:
        return Bound(call=lambda: calls.__setitem__(name, calls[name] + 1), enter=lambda: entered.append(name))

    stats = round_robin({"a": bound("a"), "b": bound("b")}, {"a": (10, 3), "b": (5, 1)})
    assert calls == {"a": 30, "b": 5}
    assert entered == ["a", "b", "a", "a"]  # round 2 starts with the second variant; b has one sample
    assert stats["a"].samples == 3 and stats["a"].inner == 10 and stats["b"].samples == 1
    assert plan_samples(1.0, 1, repeats=9, min_repeats=3, budget_s=2.0, limit=Limits()) == 3
    assert plan_samples(1e-6, 1000, repeats=9, min_repeats=3, budget_s=2.0, limit=Limits(5)) == 5


def cli(argv: list[str]) -> argparse.Namespace:
    from bridge.cli import bench_cmds

    parser = argparse.ArgumentParser(prog="embridge")
    bench_cmds.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_json_on_stdout_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBRIDGE_NO_PROGRESS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = tmp_path / "out"
    args = cli(["bench", "--quick", "--no-tf", "--table", "t=300x4", "--batches", "1,8", "--dist", "zipf",
                "--variants", "bridge.numpy*", "--tokens", "0", "--repeats", "2", "--out", str(out), "--json"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert validate(doc) == []
    assert doc["command"] == ("embridge bench --quick --no-tf --variants 'bridge.numpy*' --batches 1,8 --dist zipf "
                              f"--repeats 2 --tokens 0 --table t=300x4 --out {out}")
    assert doc["mode"] == "quick+custom" and doc["tokens"] is None
    assert {r["variant"] for r in doc["results"]} == {"np.take", "memcpy", "bridge.numpy", "bridge.numpy(out)"}
    assert sorted(p.name for p in out.iterdir()) == ["bandwidth.png", "latency.png", "pairs.png", "results.json",
                                                       "results.md"]
    assert "wrote " in captured.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--table", "big=10by4"], "bad table"),
    (["--batches", "1,x"], "bad batch sizes"),
    (["--dist", "normal"], "unknown id distribution"),
    (["--dist", ","], "one id distribution"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--table", "t=10x4", "--table", "t=20x4"], "table names must differ"),
    (["--seed=-1"], "the seed must be >= 0"),
    (["--table", "t=99999999999999999999x8"], "bad table"),
    (["--table", "t=1000000000x100000"], "of memory, and this machine has"),
    (["--batches", "99999999999999999999"], "bad batch sizes"),
    (["--variants", "nomatch*"], "match no variant"),
    (["--large", "--table", "t=10x4"], "--large adds the large preset"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_cli_rejects_bad_options_before_running(argv: list[str], message: str) -> None:
    args = cli(["bench", "--no-tf", *argv])
    with pytest.raises(InputError, match=message):
        args.func(args)


def test_cli_checks_out_before_running(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot be written"),
                         ("", "--out is empty")):
        args = cli(["bench", "--no-tf", "--table", "t=10x4", "--batches", "1", "--out", str(out)])
        with pytest.raises(InputError, match=message):
            args.func(args)


def test_duplicate_batches_and_distributions_are_timed_once() -> None:
    from bridge.cli.bench_cmds import build_config

    cfg = build_config(cli(["bench", "--no-tf", "--batches", "1,8,1", "--dist", "zipf,zipf"]))
    assert cfg.batches == (1, 8) and cfg.distributions == ("zipf",)


def test_outputs_replace_the_previous_set_or_leave_it(run: tuple[dict[str, Any], Path, dict[str, Path]],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt while the files are made leaves the previous results; --no-plots drops the old plots."""
    import benchmarks.plots

    doc, _, _ = run
    write_outputs(doc, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmarks.plots, "write_plots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_outputs({**doc, "duration_s": 1.5}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_outputs(doc, tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_ctrl_c_while_the_files_are_moved_waits_for_the_whole_set(
        run: tuple[dict[str, Any], Path, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    import benchmarks.runner

    doc, _, _ = run
    write_outputs(doc, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, moved = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).parent == tmp_path:  # the final moves (rendering may replace files of its own)
            if not moved:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the first file is moved
            moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(benchmarks.runner.os, "replace", replace)
    # the premise: Ctrl-C raises here (pytest started as a shell's background job inherits it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_outputs({**doc, "duration_s": 1.5}, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(moved) == len(before) == 5
    assert all(after[name] != before[name] for name in ("results.json", "results.md"))
    assert json.loads(after["results.json"])["duration_s"] == 1.5


@pytest.mark.slow
def test_tensorflow_and_keras_variants(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    cfg = tiny_config(tensorflow=True, batches=(1, 16, 2048), keras_max_batch=16, tokens=0, gensim=False,
                      variants=("tf.*", "keras.*"))
    doc = run_benchmark(cfg, progress=False, tmp_dir=tmp_path)
    assert doc["errors"] == [] and validate(doc) == []
    found = {(r["variant"], r["batch"]) for r in doc["results"]}
    assert {("tf.nn.embedding_lookup", 2048), ("keras.Embedding()", 16), ("keras.predict", 1)} <= found
    assert ("keras.predict", 2048) not in found  # capped at keras_max_batch
    assert max(r["samples"] for r in doc["results"] if r["variant"] == "keras.predict") <= 3


@pytest.mark.slow
def test_tensorflow_and_keras_read_the_store_files_pages_without_a_copy(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from benchmarks.data import make_store_table
    from benchmarks.variants import TableContext, _keras_call, _tf_embedding_lookup

    table = make_store_table(TINY, tmp_path, 0)
    ctx = TableContext(TINY, table, np.asarray(table.data))
    _tf_embedding_lookup(ctx), _keras_call(ctx)  # each builds what its variant reads, shared through ctx
    params, layer = ctx.cache["tf_table"], ctx.cache["keras_layer"]
    assert np.array_equal(np.asarray(params), ctx.array) and np.array_equal(layer.embeddings.numpy(), ctx.array)
    writer = np.load(table.data.filename, mmap_mode="r+")  # a shared mapping: writes reach the file's pages
    writer[3] = 7.0
    writer.flush()
    assert np.all(ctx.array[3] == 7.0)
    assert np.all(np.asarray(params)[3] == 7.0) and np.all(layer.embeddings.numpy()[3] == 7.0)  # the same pages
