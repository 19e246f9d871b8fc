"""Parity as values: compare(), parity_ids(), table_parity() and the report's renderings."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

import bridge.parity as parity
from bridge.errors import ParityError
from bridge.parity import REPORT_MARK, Comparison, ParityReport, compare, parity_ids, reference_lookup, table_parity
from bridge.policy import POLICIES
from bridge.table import EmbeddingTable

ROWS, DIM = 40, 5


def make_table(dtype: object = np.float32, rows: int = ROWS, oov_id: int | None = 1) -> EmbeddingTable:
    data = (np.random.default_rng(0).standard_normal((rows, DIM)) * 3).astype(dtype)
    data[2] = np.nan
    data[3, 0] = -0.0
    return EmbeddingTable("emb", data, oov_id=oov_id)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_all_backends_pass_on_a_table(policy: str, dtype: object) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    report = table_parity(make_table(dtype), policy=policy)
    assert report, report.to_text()
    assert {c.backend for c in report.comparisons} == {"numpy", "onnxruntime", "torch"}
    cases = {c.case for c in report.comparisons}
    assert cases == set(parity_ids(ROWS, policy))
    assert all(c.tolerance is None and c.max_abs_diff == 0.0 for c in report.comparisons)
    all_rows = [c for c in report.comparisons if c.case == "all_rows"]
    assert all(c.total == ROWS and c.mismatches == 0 for c in all_rows)


def tampered(table: EmbeddingTable, row: int) -> parity.LookupFn:
    """An 'adapter' that gets one row wrong by one ulp."""

    def fn(ids: np.ndarray) -> np.ndarray:
        out = np.take(table.data, ids, axis=0)
        out[ids == row] = np.nextafter(out[ids == row], np.float32(np.inf))
        return out

    return fn


def test_tampered_candidate_is_caught_with_its_first_id() -> None:
    table = make_table()
    report = table_parity(table, backends=("numpy",), extra_references={"tampered": tampered(table, 17)})
    assert not report
    failures = report.failures
    assert {c.backend for c in failures} == {"tampered"}
    by_case = {c.case: c for c in failures}
    assert by_case["all_rows"].first_mismatch_id == 17
    assert by_case["all_rows"].mismatches == 1 and by_case["all_rows"].total == ROWS
    assert 0 < by_case["all_rows"].max_abs_diff < 1e-5
    assert all(c.passed for c in report.comparisons if c.backend == "numpy")


def test_first_mismatch_is_in_c_order_of_multidim_ids() -> None:
    ref = np.zeros((2, 3, DIM), np.float32)
    cand = ref.copy()
    cand[1, 0, 4] = 1.0
    cand[1, 2, 0] = 2.0
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    result = compare(ref, cand, ids)
    assert (result.passed, result.mismatches, result.total, result.first_mismatch_id) == (False, 2, 6, 8)
    assert result.max_abs_diff == 2.0


def test_large_id_sets_are_compared_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parity, "_CHUNK", 16)
    table = make_table(rows=100)
    report = table_parity(table, backends=("numpy",), extra_references={"tampered": tampered(table, 70)})
    row = next(c for c in report.comparisons if c.backend == "tampered" and c.case == "all_rows")
    assert (row.total, row.mismatches, row.first_mismatch_id) == (100, 1, 70)


def test_bitwise_nan_equals_same_nan_but_not_another_payload() -> None:
    ids = np.array([0])
    nan = np.array([[np.nan, 1.0]], np.float32)
    assert compare(nan, nan.copy(), ids)
    other = nan.copy()
    other.view(np.uint32)[0, 0] |= 1  # a different NaN payload
    result = compare(nan, other, ids)
    assert not result and result.max_abs_diff == math.inf and result.first_mismatch_id == 0


def test_nan_matches_only_nan_with_tolerance() -> None:
    nan = np.array([[np.nan, 1.0]], np.float32)
    assert compare(nan, nan.copy(), np.array([4]), atol=1.0, rtol=1.0)  # both sides compute NaN: they agree
    result = compare(nan, np.array([[1.0, 1.0]], np.float32), np.array([4]), atol=1.0, rtol=1.0)
    assert not result and result.first_mismatch_id == 4 and result.tolerance == (1.0, 1.0)
    assert not compare(np.array([[1.0]]), np.array([[np.nan]]), np.array([0]), atol=1e9)


def test_infinity_matches_only_itself_with_tolerance() -> None:
    ref = np.array([[np.inf, -np.inf, np.inf]], np.float32)
    assert compare(ref, ref.copy(), np.array([0]), atol=1e-3, rtol=1e-3)
    for cand in ([[-np.inf, -np.inf, np.inf]], [[np.inf, -np.inf, 3.0e38]]):  # rtol * inf must not excuse them
        assert not compare(ref, np.array(cand, np.float32), np.array([0]), atol=1e-3, rtol=1e-3)


def test_tolerance() -> None:
    ref = np.array([[1.0, -0.0, np.inf]], np.float32)
    cand = np.array([[1.0 + 1e-6, 0.0, np.inf]], np.float32)
    assert not compare(ref, cand, np.array([0]))  # bitwise: 1 ulp and the sign of zero differ
    close = compare(ref, cand, np.array([0]), atol=1e-5)
    assert close and 0 < close.max_abs_diff < 1e-5 and close.tolerance == (1e-5, 0.0)
    assert not compare(ref, cand, np.array([0]), rtol=1e-9)
    assert compare(ref, cand.astype(np.float64), np.array([0]), atol=1e-5)  # dtypes may differ with a tolerance


def test_shape_and_dtype_mismatch_fail_with_detail() -> None:
    ref = np.zeros((2, DIM), np.float32)
    bad_shape = compare(ref, np.zeros((2, DIM + 1), np.float32), np.array([3, 4]))
    assert not bad_shape and "shape" in bad_shape.detail and bad_shape.first_mismatch_id == 3
    bad_dtype = compare(ref, ref.astype(np.float16), np.array([3, 4]))
    assert not bad_dtype and "dtype" in bad_dtype.detail
    with pytest.raises(ParityError, match="ids shape"):
        compare(ref, ref, np.array([1, 2, 3]))


def test_empty_ids_pass() -> None:
    result = compare(np.zeros((0, DIM)), np.zeros((0, DIM)), np.zeros(0, np.int64))
    assert result and result.total == 0 and result.first_mismatch_id is None


@pytest.mark.parametrize("policy", POLICIES)
def test_parity_ids(policy: str) -> None:
    sets = parity_ids(ROWS, policy, seed=3)
    assert list(sets) == ["all_rows", "edges", "random_scalar", "random_7", "random_3x5x2", "empty"]
    assert sets["all_rows"].tolist() == list(range(ROWS))
    shapes = {name: sets[name].shape for name in ("random_scalar", "random_7", "random_3x5x2", "empty")}
    assert shapes == {"random_scalar": (), "random_7": (7,), "random_3x5x2": (3, 5, 2), "empty": (0,)}
    assert all(a.dtype == np.int64 for a in sets.values())
    everything = np.concatenate([a.reshape(-1) for a in sets.values()])
    assert {0, ROWS - 1} <= set(sets["edges"].tolist())
    if policy == "error":
        assert everything.min() >= 0 and everything.max() < ROWS
    elif policy == "wrap":
        assert everything.min() >= -ROWS and everything.max() < ROWS and {-1, -ROWS} <= set(sets["edges"].tolist())
    else:
        assert {-1, ROWS, -ROWS - 1} <= set(sets["edges"].tolist())
    assert parity_ids(ROWS, policy, seed=3)["random_7"].tolist() == sets["random_7"].tolist()


def test_reference_lookup_applies_policies() -> None:
    table = make_table()
    ids = np.array([0, ROWS, -1, -ROWS - 1])
    data = table.data
    assert reference_lookup(table, "clip")(ids).tobytes() == data[[0, ROWS - 1, 0, 0]].tobytes()
    assert reference_lookup(table, "oov")(ids).tobytes() == data[[0, 1, 1, 1]].tobytes()
    zero = reference_lookup(table, "zero")(ids)
    assert zero[0].tobytes() == data[0].tobytes() and not zero[1:].any()
    assert reference_lookup(table, "wrap")(ids[:3] % ROWS - ROWS).tobytes() == data[[0, 0, ROWS - 1]].tobytes()


def test_both_raising_passes_and_one_raising_fails() -> None:
    table = make_table()
    report = table_parity(
        table, backends=("numpy",), ids={"bad": np.array([1, ROWS])},
        extra_references={"lenient": lambda ids: np.take(table.data, np.clip(ids, 0, ROWS - 1), axis=0)},
    )  # fmt: skip
    rows = {c.backend: c for c in report.comparisons}
    assert rows["numpy"].passed and "both raised (IdError)" in rows["numpy"].detail
    assert not rows["lenient"].passed and "reference raised" in rows["lenient"].detail


def test_unknown_backend_is_a_failed_row() -> None:
    report = table_parity(make_table(), backends=("numpy", "nope"))
    bad = report.failures
    assert len(bad) == 1 and bad[0].backend == "nope" and "unavailable" in bad[0].detail


def test_custom_reference_and_per_candidate_tolerance() -> None:
    table = make_table()
    table.data[2] = 0.0  # no NaN: a tolerance comparison would fail on it by design

    def as_f64(ids: np.ndarray) -> np.ndarray:
        return np.take(table.data, ids, axis=0).astype(np.float64) + 1e-9

    report = table_parity(table, backends=("numpy",), reference=("float64", as_f64), tolerances={"numpy": (1e-6, 0.0)})
    assert report, report.to_text()
    assert {c.reference for c in report.comparisons} == {"float64"}
    assert all(c.tolerance == (1e-6, 0.0) for c in report.comparisons)


def test_report_renderings() -> None:
    table = make_table()
    report = table_parity(table, backends=("numpy",), extra_references={"tampered": tampered(table, 17)})
    obj = report.to_json()
    text = json.dumps(obj, allow_nan=False)  # strict JSON
    assert obj["passed"] is False and obj["failed"] == len(report.failures) > 0
    assert json.loads(text)["comparisons"][0]["table"] == "emb"
    md = report.to_markdown()
    mark, table_head = md.splitlines()[:2]
    assert mark == REPORT_MARK and table_head.startswith("| table | backend |")
    assert "| tampered |" in md and "FAILED" in md
    lines = report.to_text(per_case=True).splitlines()
    assert lines[0].split()[:3] == ["table", "backend", "reference"] and set(lines[1]) <= {"-", " "}
    assert len(lines) == len(report.comparisons) + 3
    assert any("FAIL" in line and "17" in line for line in lines)
    grouped = report.to_text().splitlines()
    assert len(grouped) == 2 + 2 + 1  # header, rule, one row per candidate (numpy, tampered), summary
    (numpy_row,) = [line for line in grouped if line.startswith("emb    numpy")]
    (bad_row,) = [line for line in grouped if " tampered " in line]
    assert " pass " in numpy_row and "id sets" in numpy_row
    assert " FAIL " in bad_row and " 17 " in bad_row
    assert grouped[-1] == report.summary()


def test_report_truthiness_and_extend() -> None:
    assert not ParityReport()
    good = Comparison("t", "numpy", "ref", True, 0.0, 0, 3, None, None)
    bad = Comparison("t", "keras", "ref", False, math.inf, 1, 3, 7, (0.0, 0.0), "all_rows", "why")
    report = ParityReport([good])
    assert report and report.passed
    report.extend([bad])
    assert not report and report.failures == [bad]
    assert bad.to_json()["max_abs_diff"] == "Infinity" and bad.to_json()["tolerance"] == [0.0, 0.0]


def test_a_skipped_comparison_neither_passes_nor_fails_silently() -> None:
    from bridge.parity import Comparison, ParityReport

    ran = Comparison("t", "numpy", "numpy.take", True, 0.0, 0, 4, None, None, case="all_rows")
    skipped = Comparison("(whole model)", "onnx-model", "keras", True, 0.0, 0, 0, None, (1e-5, 1e-5),
                         case="skipped", detail="skipped: onnxruntime cannot load the model", skipped=True)
    report = ParityReport([ran, skipped])
    assert report and report.to_json()["skipped"] == 1 and report.to_json()["failed"] == 0
    assert report.summary() == "parity: all 1 comparisons that ran passed (1 could not run: see 'skipped')"
    assert "| skipped |" in report.to_markdown() and " skipped " in report.to_text()
    assert ParityReport([ran]).summary() == "parity: all 1 comparisons passed"
