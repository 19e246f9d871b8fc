"""Parity for a whole store: every table, every backend, plus the store's ONNX model and any
framework references (e.g. the Keras model's own layers) given by the caller."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.backends import BACKENDS
from bridge.errors import InputError, ParityError, UnsupportedError
from bridge.parity import DEFAULT_BACKENDS, Comparison, LookupFn, ParityReport, table_parity
from bridge.policy import IndexPolicy, as_ids
from bridge.store import Store, open_store
from bridge.table import EmbeddingTable

#: name -> (store -> {table name: ids -> vectors}); a framework reference built once the store is open
ReferenceFactory = Callable[[Store], Mapping[str, Mapping[str, LookupFn]]]

ONNX_REFERENCE = "onnx-model"


def onnx_references(store: Store, model_path: Path | None = None) -> dict[str, LookupFn | str]:
    """``{table: ids -> vectors}`` running each table's own Gather of the ONNX model in onnxruntime.

    The model is ``model_path`` or the store's ``model.onnx`` (none: ``{}``); tables are matched by
    initializer name. A table the model only reads with ``Slice`` (a position table) is served by its own
    Slice over all rows, indexed by the ids (:func:`bridge.onnx_reference.onnx_slice_reference`). A table
    the model does not hold, or whose Gather or Slice cannot be cut out (inside a Loop body), maps to the
    reason, a string, instead of a callable.
    """
    from bridge.onnx_io import load_model
    from bridge.onnx_reference import onnx_gather_reference, onnx_slice_reference
    from bridge.scan import scan, stored_ref

    path = model_path or (store.path / "model.onnx")
    if model_path is not None and not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"ONNX model {str(model_path)!r} {what}; pass the .onnx file to --onnx")
    if not path.is_file():
        return {}
    model = load_model(path)
    refs = scan(model)
    out: dict[str, LookupFn | str] = {}
    absent = 0
    for name in store:
        entry = store.entry(name)
        initializer = entry.get("initializer") or ""
        ref = stored_ref(initializer, entry.get("metadata"), refs)
        if ref is None:
            out[name], absent = _absent(path.name, name, initializer, entry.get("metadata")), absent + 1
            continue
        build = onnx_gather_reference if ref.gathers or not ref.slices else onnx_slice_reference
        try:
            out[name] = build(model, ref, path.parent)
        except UnsupportedError as exc:
            out[name] = f"the lookup in {path.name} cannot be run on its own: {exc}"
        except ParityError as exc:  # onnxruntime cannot run it (e.g. a float8 Gather on the CPU provider)
            out[name] = str(exc)
    if model_path is not None and out and absent == len(out):
        raise InputError(f"ONNX model {str(model_path)!r} holds none of the store's tables; pass the model the "
                         "store was made from to --onnx")
    return out


def store_parity(
    store: str | os.PathLike[str] | Store,
    *,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    policy: str = "error",
    tables: Sequence[str] | None = None,
    onnx_model: str | os.PathLike[str] | None = None,
    extra_references: ReferenceFactory | Mapping[str, Mapping[str, LookupFn]] | None = None,
    verify: bool = True,
    seed: int = 0,
) -> ParityReport:
    """Compare every backend, the ONNX model's own Gathers and ``extra_references`` on every table.

    ``extra_references`` maps a reference name (``"keras"``) to ``{table: ids -> vectors}``, or is
    a factory building that mapping from the opened store. All comparisons are bitwise: a lookup
    is a copy. A reference that has nothing for a table (the ONNX model does not hold it, or its
    lookup cannot be cut out) adds a ``skipped`` row saying why.
    """
    _check_backends(backends)
    opened = store if isinstance(store, Store) else open_store(store, verify=verify)
    names = _table_names(opened, tables)
    onnx_refs = onnx_references(opened, Path(onnx_model) if onnx_model is not None else None)
    extras = extra_references(opened) if callable(extra_references) else (extra_references or {})
    report = ParityReport()
    for name in names:
        per_table = {ref: fns[name] for ref, fns in extras.items() if name in fns}
        onnx_ref = onnx_refs.get(name)
        if isinstance(onnx_ref, str):
            report.extend([skipped(name, ONNX_REFERENCE, onnx_ref)])
        elif onnx_ref is not None:
            per_table[ONNX_REFERENCE] = onnx_ref
        report.extend(skipped(name, ref, "it has no layer this table came from") for ref in extras
                      if name not in extras[ref])
        if policy != "error":  # the frameworks have no such policy: they get the ids it maps to
            per_table = {ref: under_policy(fn, opened[name], policy) for ref, fn in per_table.items()}
        report.extend(table_parity(opened[name], backends, policy, extra_references=per_table, seed=seed).comparisons)
    return report


def _check_backends(backends: Sequence[str]) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(map(repr, unknown))}; choose from {', '.join(BACKENDS)}")
    if not backends:
        raise InputError(f"no backend given; choose from {', '.join(BACKENDS)}")


def _table_names(store: Store, tables: Sequence[str] | None) -> list[str]:
    """The tables to compare, each once, in order (all when ``tables`` is None or empty)."""
    names = list(dict.fromkeys(tables)) if tables else list(store)
    for name in names:
        store.entry(name)  # raises TableNotFoundError listing the valid names
    return names


def _absent(model: str, table: str, initializer: str, metadata: Any) -> str:
    """Why ``model`` has no reference for ``table``: the constant TensorFlow folded its lookup into (the
    Keras converter records it as ``metadata["truncated_in_onnx"]``), no initializer, or a missing one."""
    folded = (metadata or {}).get("truncated_in_onnx")
    if isinstance(folded, Mapping):
        return (f"{model} has no lookup of table {table!r}: TensorFlow folded the {folded.get('rows')} rows it "
                f"reads into constant {folded.get('initializer')!r}")
    if not initializer:
        return f"{model} has no lookup of table {table!r} (the store records no ONNX initializer for it)"
    return f"{model} has no table {initializer!r}"


def skipped(table: str, reference: str, reason: str) -> Comparison:
    """A ``skipped`` row: ``reference`` could not be compared on ``table``, and why."""
    return Comparison(table=table, backend=reference, reference="numpy.take", passed=True, max_abs_diff=0.0,
                      mismatches=0, total=0, first_mismatch_id=None, tolerance=None, case="skipped",
                      detail=f"skipped: {reason}", skipped=True)


__all__ = ["ONNX_REFERENCE", "onnx_references", "skipped", "store_parity", "under_policy"]


def under_policy(fn: LookupFn, table: EmbeddingTable, policy: str) -> LookupFn:
    """``fn`` (a framework's own lookup: the ONNX model, Keras) given the ids after ``policy`` maps them.

    A framework has no ``clip``, ``zero`` or ``oov`` policy (and wraps negatives its own way), so a
    comparison under such a policy feeds it the ids the policy makes, and zeroes the rows ``zero``
    marks: what it shows is that the framework serves the same rows for those ids.
    """
    index_policy = IndexPolicy.create(policy, table.rows, oov_id=table.oov_id, table=table.name)

    def run(ids: np.ndarray) -> np.ndarray:
        safe, zero = index_policy.apply(as_ids(ids))
        if zero is not None and zero.all():  # nothing to look up (a table without rows): the framework is not asked
            return np.zeros(safe.shape + (table.dim,), table.served_dtype)
        out = np.array(fn(safe))
        if zero is not None:
            out[zero] = 0
        return out

    return run
