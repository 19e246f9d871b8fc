"""Parity: compare lookups with a reference and return the result as a value (Polygraphy ``CompareFunc`` style).

:func:`compare` compares two outputs for the same ids and returns a :class:`Comparison` (truthy when it
passes); :func:`table_parity` runs every backend, and any extra callable ``ids -> vectors`` (a Keras model,
an ONNX model in onnxruntime), on the id sets of :func:`parity_ids` and collects the comparisons in a
:class:`ParityReport`.

Counting: ``total`` is the number of looked-up vectors (ids), ``mismatches`` how many of them differ in at
least one element, and ``first_mismatch_id`` the id of the first differing vector in C order. Without a
tolerance the comparison is bitwise (equal NaN bit patterns are equal; ``-0.0`` differs from ``0.0``); with
``atol``/``rtol`` an element passes if ``c == r``, if both are NaN (as ``np.testing.assert_allclose``
does), or if ``r`` is finite and ``|c - r| <= atol + rtol * |r|`` (an infinity matches only itself).
``max_abs_diff`` is computed in float64; a NaN that is not matched bit for bit counts as ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bridge.errors import BridgeError, IdError, InputError, ParityError
from bridge.policy import POLICIES
from bridge.render import format_table, json_safe, markdown_table
from bridge.table import EmbeddingTable

LookupFn = Callable[[np.ndarray], Any]
DEFAULT_BACKENDS: tuple[str, ...] = ("numpy", "onnxruntime", "torch")
REFERENCE_NAME = "numpy.take"
_CHUNK = 1 << 16  # ids per comparison step for large id sets (bounds memory to chunk x dim)


@dataclass
class Comparison:
    """One candidate against one reference on one id set. Truthy when it passed."""

    table: str
    backend: str
    reference: str
    passed: bool
    max_abs_diff: float
    mismatches: int
    total: int
    first_mismatch_id: int | None
    tolerance: tuple[float, float] | None  # (atol, rtol); None = bitwise
    case: str = ""  # the id set, e.g. "all_rows"
    detail: str = ""  # why it failed (or "both raised ..."), empty otherwise
    skipped: bool = False  # the comparison could not run (``detail`` says why); it neither passes nor fails

    def __bool__(self) -> bool:
        return self.passed

    @property
    def result(self) -> str:
        """``pass``, ``FAIL`` or ``skipped``, as the report shows it."""
        return "skipped" if self.skipped else "pass" if self.passed else "FAIL"

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (an infinite ``max_abs_diff`` is the string ``"Infinity"``, as in all ``--json`` output)."""
        obj = asdict(self)
        obj["max_abs_diff"] = _json_float(self.max_abs_diff)
        obj["tolerance"] = None if self.tolerance is None else list(self.tolerance)
        return obj


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else json_safe(value)  # type: ignore[no-any-return]


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    ids: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    table: str = "",
    backend: str = "candidate",
    reference_name: str = REFERENCE_NAME,
    case: str = "",
) -> Comparison:
    """Compare ``candidate`` with ``reference`` (both ``ids.shape + (dim,)``); bitwise when no tolerance."""
    ids = np.asarray(ids)
    ref, cand = np.asarray(reference), np.asarray(candidate)
    tolerance = None if atol is None and rtol is None else (float(atol or 0.0), float(rtol or 0.0))
    base: dict[str, Any] = {"table": table, "backend": backend, "reference": reference_name, "tolerance": tolerance,
                            "case": case}
    if ref.shape[: ids.ndim] != ids.shape or ref.ndim != ids.ndim + 1:
        raise ParityError(f"reference shape {ref.shape} does not match ids shape {ids.shape} + (dim,)")
    problem = _layout_problem(ref, cand, tolerance)
    if problem:
        first = int(ids.reshape(-1)[0]) if ids.size else None
        return Comparison(
            passed=False, max_abs_diff=math.inf, mismatches=ids.size, total=ids.size,
            first_mismatch_id=first, detail=problem, **base,
        )  # fmt: skip
    n, dim = ids.size, ref.shape[-1]
    bad, max_diff = _element_diff(ref.reshape(n, dim), cand.reshape(n, dim), tolerance)
    bad_rows = bad.any(axis=1)
    mismatches = int(bad_rows.sum())
    first = int(ids.reshape(-1)[int(np.argmax(bad_rows))]) if mismatches else None
    return Comparison(
        passed=mismatches == 0, max_abs_diff=max_diff, mismatches=mismatches, total=n,
        first_mismatch_id=first, **base,
    )  # fmt: skip


def _layout_problem(ref: np.ndarray, cand: np.ndarray, tolerance: tuple[float, float] | None) -> str:
    if cand.shape != ref.shape:
        return f"shape {cand.shape} differs from the reference's {ref.shape}"
    if tolerance is None and cand.dtype != ref.dtype:
        return f"dtype {cand.dtype} differs from the reference's {ref.dtype} (a bitwise comparison needs equal dtypes)"
    return ""


def _bits(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.itemsize not in (1, 2, 4, 8) or arr.dtype.kind == "c":
        raise ParityError(f"cannot compare dtype {arr.dtype}; embedding tables are real numbers of 1 to 8 bytes")
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def _element_diff(
    ref: np.ndarray, cand: np.ndarray, tolerance: tuple[float, float] | None
) -> tuple[np.ndarray, float]:
    """Per-element mismatch mask of two ``[n, dim]`` arrays, and the max absolute difference.

    Bitwise, a NaN matches only the same NaN bits; within a tolerance, a NaN matches any NaN (both
    sides computed "not a number" there) and an infinity only the same infinity.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaNs (signalling ones warn when cast) and infinities
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        diff = np.abs(r - c)
        equal = (r == c) | (np.isnan(r) & np.isnan(c))
        if tolerance is None:
            bad = _bits(ref) != _bits(cand)
            same = ~bad
        else:
            atol, rtol = tolerance
            bad = ~(equal | (np.isfinite(r) & (diff <= atol + rtol * np.abs(r))))  # an infinity: only itself
            same = equal
    diff[same] = 0.0
    diff[np.isnan(diff)] = math.inf
    return bad, float(diff.max()) if diff.size else 0.0


#: The first line of every Markdown report (an HTML comment, invisible when rendered): ``embridge parity
#: --report`` replaces an existing file only if it starts with it.
REPORT_MARK = "<!-- embridge parity report -->"


def parity_ids(rows: int, policy: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Id sets for a table of ``rows`` rows under ``policy`` (all int64).

    ``all_rows`` (every row once), ``edges`` (first and last row, plus the ids the policy treats
    specially: negatives and out-of-range ids where it accepts them), and random batches of shapes
    ``()``, ``(7,)``, ``(3, 5, 2)`` and ``(0,)`` drawn from the ids the policy accepts.
    """
    if policy not in POLICIES:
        raise InputError(f"unknown index policy {policy!r}; choose one of {', '.join(POLICIES)}")
    rng = np.random.default_rng(seed)
    cases = {"all_rows": np.arange(rows, dtype=np.int64), "edges": _edges(rows, policy)}
    low, high = {"error": (0, rows), "wrap": (-rows, rows)}.get(policy, (-2 * rows - 3, 2 * rows + 3))
    for name, shape in (("random_scalar", ()), ("random_7", (7,)), ("random_3x5x2", (3, 5, 2))):
        if high > low:
            cases[name] = rng.integers(low, high, size=shape, dtype=np.int64)
    cases["empty"] = np.zeros((0,), np.int64)
    return cases


def _edges(rows: int, policy: str) -> np.ndarray:
    edges = [0, rows - 1] if rows else []
    if policy == "wrap" and rows:
        edges += [-1, -rows]
    if policy in ("clip", "zero", "oov"):
        info = np.iinfo(np.int64)
        edges += [-1, rows, -rows - 1, rows + 1000, int(info.min), int(info.max)]
    return np.array(list(dict.fromkeys(edges)), dtype=np.int64)


def reference_lookup(table: EmbeddingTable, policy: str = "error", oov_id: int | None = None) -> LookupFn:
    """``np.take`` on ``table.data`` after applying ``policy`` with plain NumPy.

    Written independently of :mod:`bridge.policy`, so parity also cross-checks the shared policy code.
    A quantized table's rows are dequantized with :meth:`bridge.quantization.Quantization.dequantize_rows`
    (the NumPy statement of each scheme's arithmetic).
    """
    data, rows = table.data, table.rows
    oov = oov_id if oov_id is not None else table.oov_id
    if policy not in POLICIES:
        raise InputError(f"unknown index policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "oov" and oov is None:
        raise InputError(f"policy 'oov' needs an OOV row, but table {table.name!r} has no oov_id; pass oov_id=<row>")

    def lookup(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise IdError(f"reference lookup needs integer ids, got dtype {ids.dtype}")
        big = ids >= rows
        neg = ids < 0 if ids.dtype.kind == "i" else np.zeros(ids.shape, bool)
        values = np.where(big | neg, 0, ids).astype(np.int64)
        if policy == "wrap":
            wrapped = neg & (ids >= -rows)
            values[wrapped] = ids[wrapped].astype(np.int64) + rows
            neg = neg & ~wrapped
        bad = big | neg
        if policy in ("error", "wrap") and bad.any():
            raise IdError(f"reference lookup: id {ids[bad].reshape(-1)[0]} is out of range under {policy!r}")
        if not rows:
            return np.zeros(ids.shape + (table.dim,), table.served_dtype)
        if policy == "clip":
            values[big] = rows - 1
        elif policy == "oov":
            assert oov is not None  # checked above
            values[bad] = oov
        out = np.asarray(np.take(data, values, axis=0))
        if table.quantization is not None:
            out = table.quantization.dequantize_rows(out, values)
        if policy == "zero":
            out[bad] = 0
        return out

    return lookup


def table_parity(
    table: EmbeddingTable,
    backends: Iterable[str] = DEFAULT_BACKENDS,
    policy: str = "error",
    reference: LookupFn | tuple[str, LookupFn] | None = None,
    *,
    extra_references: Mapping[str, LookupFn] | None = None,
    ids: Mapping[str, np.ndarray] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    oov_id: int | None = None,
    threads: int = 1,
    seed: int = 0,
) -> ParityReport:
    """Compare every backend (and every extra callable) with a reference on the :func:`parity_ids` sets.

    ``reference`` defaults to :func:`reference_lookup` (``np.take`` on ``table.data``, policy applied);
    pass a callable or a ``(name, callable)`` pair to compare against something else.
    ``extra_references`` maps names to callables ``ids -> vectors`` (the Keras model, the converted ONNX
    model in onnxruntime); each adds rows like a backend. ``ids`` replaces the default id sets;
    ``tolerances`` gives ``(atol, rtol)`` per candidate name, ``atol``/``rtol`` the default (bitwise when
    both are None). A backend that cannot be created (framework not installed) is a failed row saying why.
    When the reference and a candidate both raise (bad ids under ``error``), the row passes.
    """
    ref_name, ref_fn = _resolve_reference(table, policy, oov_id, reference)
    id_sets = dict(ids) if ids is not None else parity_ids(table.rows, policy, seed)
    candidates, report = _candidates(table, backends, policy, oov_id, threads, ref_name, extra_references)
    tolerances = dict(tolerances or {})
    for case, case_ids in id_sets.items():
        case_ids = np.asarray(case_ids)
        rows: dict[str, list[Comparison]] = {name: [] for name in candidates}
        for part in _chunks(case_ids):
            expected = _run(ref_fn, part)
            for name, fn in candidates.items():
                tol: tuple[float | None, float | None] = tolerances.get(name, (atol, rtol))
                meta = {"table": table.name, "backend": name, "reference_name": ref_name, "case": case}
                rows[name].append(_compare_run(expected, _run(fn, part), part, tol, meta))
        report.comparisons.extend(_merge(parts) for parts in rows.values())
    return report


def _resolve_reference(
    table: EmbeddingTable, policy: str, oov_id: int | None, reference: LookupFn | tuple[str, LookupFn] | None
) -> tuple[str, LookupFn]:
    if reference is None:
        return REFERENCE_NAME, reference_lookup(table, policy, oov_id)
    if isinstance(reference, tuple):
        return reference
    return getattr(reference, "__name__", "reference"), reference


def _candidates(
    table: EmbeddingTable,
    backends: Iterable[str],
    policy: str,
    oov_id: int | None,
    threads: int,
    ref_name: str,
    extras: Mapping[str, LookupFn] | None,
) -> tuple[dict[str, LookupFn], ParityReport]:
    """Create the backends' lookups; a backend that cannot be created becomes a failed row."""
    from bridge.backends import lookup  # lazy: bridge.backends imports nothing heavy, but parity need not

    candidates: dict[str, LookupFn] = {}
    report = ParityReport()
    for name in backends:
        try:
            candidates[name] = lookup(table, name, policy, oov_id=oov_id, threads=threads)
        except BridgeError as exc:
            report.comparisons.append(
                Comparison(
                    table=table.name, backend=name, reference=ref_name, passed=False, max_abs_diff=math.inf,
                    mismatches=0, total=0, first_mismatch_id=None, tolerance=None, case="*",
                    detail=f"unavailable: {exc}",
                )  # fmt: skip
            )
    candidates.update(extras or {})
    return candidates, report


def _chunks(ids: np.ndarray) -> list[np.ndarray]:
    if ids.ndim != 1 or ids.size <= _CHUNK:
        return [ids]
    return [ids[i : i + _CHUNK] for i in range(0, ids.size, _CHUNK)]


def _run(fn: LookupFn, ids: np.ndarray) -> np.ndarray | str:
    """The output of ``fn(ids)``, or a one-line description of what it raised (a result, not an error)."""
    try:
        return np.asarray(fn(ids))
    except Exception as exc:  # noqa: BLE001 - a candidate failing is a parity result to report
        return f"{type(exc).__name__}: {exc}"


def _compare_run(
    expected: np.ndarray | str,
    got: np.ndarray | str,
    ids: np.ndarray,
    tol: tuple[float | None, float | None],
    meta: dict[str, str],
) -> Comparison:
    if isinstance(expected, np.ndarray) and isinstance(got, np.ndarray):
        return compare(expected, got, ids, atol=tol[0], rtol=tol[1], **meta)
    tolerance = None if tol == (None, None) else (float(tol[0] or 0.0), float(tol[1] or 0.0))
    if isinstance(expected, str) and isinstance(got, str):
        both, detail = True, f"both raised ({got.split(':')[0]})"
    else:
        both, detail = False, f"candidate raised {got}" if isinstance(got, str) else f"reference raised {expected}"
    first = None if both or not ids.size else int(ids.reshape(-1)[0])
    return Comparison(
        table=meta["table"], backend=meta["backend"], reference=meta["reference_name"], passed=both,
        max_abs_diff=0.0 if both else math.inf, mismatches=0 if both else ids.size, total=ids.size,
        first_mismatch_id=first, tolerance=tolerance, case=meta["case"], detail=detail,
    )  # fmt: skip


def _merge(parts: list[Comparison], case: str | None = None) -> Comparison:
    """One comparison from several: the chunks of one id set, or (with ``case``) several id sets."""
    if len(parts) == 1 and case is None:
        return parts[0]
    firsts = [p.first_mismatch_id for p in parts if p.first_mismatch_id is not None]
    details = [p.detail for p in parts if p.detail]
    head = parts[0]
    return Comparison(
        table=head.table, backend=head.backend, reference=head.reference, passed=all(parts),
        max_abs_diff=max(p.max_abs_diff for p in parts), mismatches=sum(p.mismatches for p in parts),
        total=sum(p.total for p in parts), first_mismatch_id=firsts[0] if firsts else None,
        tolerance=head.tolerance, case=head.case if case is None else case, detail=details[0] if details else "",
        skipped=all(p.skipped for p in parts),
    )  # fmt: skip


@dataclass
class ParityReport:
    """All comparisons of a parity run. Truthy when there is at least one and all passed."""

    comparisons: list[Comparison] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def skipped(self) -> list[Comparison]:
        """Comparisons that could not run (they count as passed: nothing was found to differ)."""
        return [c for c in self.comparisons if c.skipped]

    def extend(self, comparisons: Iterable[Comparison]) -> None:
        """Add rows, e.g. whole-model comparisons computed elsewhere."""
        self.comparisons.extend(comparisons)

    def to_json(self) -> dict[str, Any]:
        """``{"passed", "total", "failed", "skipped", "comparisons": [...]}``, JSON-safe."""
        return {
            "passed": self.passed,
            "total": len(self.comparisons),
            "failed": len(self.failures),
            "skipped": len(self.skipped),
            "comparisons": [c.to_json() for c in self.comparisons],
        }

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table and a summary line, after the :data:`REPORT_MARK` comment."""
        table = markdown_table(_HEADERS, [_cells(c) for c in self.comparisons])
        return f"{REPORT_MARK}\n{table}\n\n{self.summary()}\n"

    def grouped(self) -> list[Comparison]:
        """One row per (table, candidate, reference): the id sets merged, first failure kept."""
        groups: dict[tuple[str, str, str], list[Comparison]] = {}
        for c in self.comparisons:
            groups.setdefault((c.table, c.backend, c.reference), []).append(c)
        return [_merge(parts, case=parts[0].case if len(parts) == 1 else f"{len(parts)} id sets")
                for parts in groups.values()]

    def to_text(self, *, per_case: bool = False) -> str:
        """A plain-text table for a terminal (one row per table and candidate unless ``per_case``)."""
        rows = self.comparisons if per_case else self.grouped()
        table = format_table(_HEADERS, [_cells(c, _TEXT_DETAIL) for c in rows])
        return f"{table}\n{self.summary()}\n"

    def summary(self) -> str:
        n, bad, skipped = len(self.comparisons), len(self.failures), len(self.skipped)
        if not n:
            return "parity: no comparisons were run"
        note = f" ({skipped} could not run: see 'skipped')" if skipped else ""
        if bad:
            return f"parity: FAILED {bad} of {n} comparisons{note}"
        return f"parity: all {n - skipped} comparisons that ran passed{note}" if skipped else \
            f"parity: all {n} comparisons passed"


_HEADERS = ("table", "backend", "reference", "ids", "result", "max abs diff", "mismatches", "first bad id",
            "tolerance", "detail")  # fmt: skip
_TEXT_DETAIL = 90  # characters of detail in the terminal table (to_json and to_markdown keep all)


def _cells(c: Comparison, detail_width: int | None = None) -> list[str]:
    tol = "bitwise" if c.tolerance is None else f"atol={c.tolerance[0]:g} rtol={c.tolerance[1]:g}"
    first = "" if c.first_mismatch_id is None else str(c.first_mismatch_id)
    detail = " ".join(c.detail.split())
    if detail_width is not None and len(detail) > detail_width:
        detail = detail[: detail_width - 3] + "..."
    return [c.table, c.backend, c.reference, c.case, c.result, f"{c.max_abs_diff:.3g}",
            f"{c.mismatches}/{c.total}", first, tol, detail]  # fmt: skip
