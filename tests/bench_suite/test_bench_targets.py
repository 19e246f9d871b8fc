"""The targets' judgement on a document: wrong outputs fail, unmeasured targets are never a pass, the bandwidth
target needs a real 2 GiB table; and the correctness check reads the out= buffer. Never timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.harness import Bound
from benchmarks.lookup_bench import MismatchError, check
from benchmarks.targets import PARITY_ADAPTERS, evaluate
from benchmarks.variants import Cell


def _doc(**changes: Any) -> dict[str, Any]:
    """A minimal document: one cell at batch 1 and one at 65,536, every judged adapter fast and paired."""
    cell = {"table": "small", "distribution": "uniform"}
    row = {"median_s": 1e-6, "cpu_median_s": 1e-6}
    results = [{"variant": v, **cell, "batch": 1, **row}
               for v in ("bridge.numpy", "bridge.torch@1t", "bridge.onnxruntime@1t")]
    pairs = [{"adapter": name, "raw": "raw", **cell, "batch": 65536, "ratio": 1.01, "cpu_ratio": 1.0,
              "noise_ratio": 1.0, "noise_q1": 0.99, "noise_q3": 1.01} for name, _, _ in PARITY_ADAPTERS]
    doc = {"results": results, "pairs": pairs, "errors": [], "variants": [], "tables": [],
           "tokens": {"tokens": 1_000_000, "errors": [], "results": [
               {"variant": f"bridge.{b}.tokens", "speedup_vs_gensim": 5.0, "cpu_median_s": 1.0}
               for b in ("numpy", "onnxruntime", "torch")] + [{"variant": "gensim.kv[words]", "cpu_median_s": 5.0,
                                                               "speedup_vs_gensim": 1.0}]}}
    doc.update(changes)
    return doc


def _targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in evaluate(doc)}


def test_the_minimal_document_passes() -> None:
    targets = _targets(_doc())
    assert all(targets[f"large-batch-{name}"]["passed"] for name, _, _ in PARITY_ADAPTERS)
    assert targets["batch1-numpy"]["passed"] and targets["tokens-bridge.onnxruntime.tokens"]["passed"]


def test_an_adapter_with_a_wrong_output_fails_its_targets_however_fast() -> None:
    errors = [{"variant": "bridge.numpy(out)", "table": "medium", "distribution": "zipf", "batch": 65536,
               "error": "MismatchError: out= buffer differs"},
              {"variant": "bridge.numpy", "table": "medium", "distribution": "zipf", "batch": 1, "error": "boom"}]
    targets = _targets(_doc(errors=errors))
    for name in ("large-batch-bridge.numpy(out)", "batch1-numpy"):
        assert targets[name]["passed"] is False and "medium/zipf" in targets[name]["detail"]
    assert targets["large-batch-bridge.torch(out)@1t"]["passed"] is True


def test_a_failed_token_lookup_fails_and_a_missing_adapter_is_not_measured() -> None:
    doc = _doc()
    doc["tokens"]["results"] = [r for r in doc["tokens"]["results"] if r["variant"] != "bridge.onnxruntime.tokens"]
    doc["tokens"]["errors"] = [{"variant": "bridge.onnxruntime.tokens", "error": "RuntimeError: x"}]
    doc["pairs"] = [p for p in doc["pairs"] if p["adapter"] != "bridge.torch(out)@2t"]
    targets = _targets(doc)
    assert targets["tokens-bridge.onnxruntime.tokens"]["passed"] is False
    missing = targets["large-batch-bridge.torch(out)@2t"]  # listed, not dropped, and never a pass
    assert missing["passed"] is None and missing["detail"].startswith("not measured")


@pytest.mark.parametrize(("rows", "measured"), [(1000, False), (524_288 * 4, True)])
def test_bandwidth_counts_only_a_large_table_of_2_gib(rows: int, measured: bool) -> None:
    cell = {"table": "large", "distribution": "uniform", "batch": 1_048_576, "cpu_median_s": 1.0}
    results = [{"variant": "memcpy", **cell, "median_s": 0.05},
               {"variant": "bridge.numpy(out)", **cell, "median_s": 0.1}]
    doc = _doc(results=results, variants=[{"name": "bridge.numpy(out)", "kind": "adapter"}],
               tables=[{"name": "large", "rows": rows, "dim": 256, "dtype": "float32", "bytes": rows * 256 * 4}])
    target = _targets(doc)["copy-bandwidth-large"]
    assert (target["value"] == pytest.approx(0.5) and target["passed"]) if measured else target["passed"] is None


def test_the_check_reads_the_out_buffer_of_an_out_variant() -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = np.array([3, 1, 4])
    cell = Cell(ids=ids, out=np.zeros((3, 4), np.float32))
    reference = np.take(table, ids, axis=0)
    ignores_out = Bound(lambda: np.take(table, ids, axis=0))  # right rows, returned; out= left untouched
    check(ignores_out, cell, reference)  # an alloc variant: what it returns is its output
    with pytest.raises(MismatchError, match="out= buffer differs"):
        check(ignores_out, cell, reference, writes_out=True)
    writes = Bound(lambda: np.take(table, ids, axis=0, out=cell.out))
    check(writes, cell, reference, writes_out=True)
    assert cell.out.tobytes() == reference.tobytes()


@pytest.mark.parametrize(("bitwise", "code"), [(True, 0), (False, 1)])
def test_convert_large_fails_on_wrong_vectors_whatever_its_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  bitwise: bool, code: int) -> None:
    from benchmarks import convert_large

    step = {"peak_rss_bytes": 1, "rss_before_bytes": 1, "convert_s": 1.0, "onnx_file_bytes": 1,
            "vectors_bitwise_equal": bitwise, "head_max_abs_diff": 0.0, "head_within_tolerance": True}
    monkeypatch.setattr(convert_large, "run_child", lambda *args: dict(step))  # the child's report, as measured
    assert convert_large.main(["--rows", "10", "--dim", "4", "--json-out", str(tmp_path / "r.json")]) == code
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["correct"] is bitwise and doc["meets_target"] is bitwise
