"""Parity for a whole store: every table, every backend, plus the store's ONNX model and any
framework references (e.g. the Keras model's own layers) given by the caller."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from bridge.backends import BACKENDS
from bridge.errors import InputError, UnsupportedError
from bridge.parity import DEFAULT_BACKENDS, LookupFn, ParityReport, table_parity
from bridge.policy import IndexPolicy, as_ids
from bridge.store import Store, open_store
from bridge.table import EmbeddingTable

#: name -> (store -> {table name: ids -> vectors}); a framework reference built once the store is open
ReferenceFactory = Callable[[Store], Mapping[str, Mapping[str, LookupFn]]]

ONNX_REFERENCE = "onnx-model"


def onnx_references(store: Store, model_path: Path | None = None) -> dict[str, LookupFn]:
    """``{table: ids -> vectors}`` running each table's own Gather of the ONNX model in onnxruntime.

    The model is ``model_path`` or the store's ``model.onnx``; tables are matched by
    initializer name. A table the model only reads with ``Slice`` (a position table) is served by its own
    Slice over all rows, indexed by the ids (:func:`bridge.onnx_reference.onnx_slice_reference`). Tables
    whose Gather or Slice cannot be cut out (e.g. inside a Loop body) are skipped.
    """
    from bridge.onnx_io import load_model
    from bridge.onnx_reference import onnx_gather_reference, onnx_slice_reference
    from bridge.scan import scan

    path = model_path or (store.path / "model.onnx")
    if not path.is_file():
        if model_path is not None:
            raise InputError(f"ONNX model {str(model_path)!r} does not exist; check the path given to --onnx")
        return {}
    model = load_model(path)
    refs = {ref.initializer: ref for ref in scan(model)}
    out: dict[str, LookupFn] = {}
    for name in store:
        ref = refs.get(store.entry(name).get("initializer") or "")
        if ref is None:
            continue
        build = onnx_gather_reference if ref.gathers or not ref.slices else onnx_slice_reference
        try:
            out[name] = build(model, ref, path.parent)
        except UnsupportedError:
            continue
    return out


def store_parity(
    store: str | os.PathLike[str] | Store,
    *,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    policy: str = "error",
    tables: Sequence[str] | None = None,
    onnx_model: Path | None = None,
    extra_references: ReferenceFactory | Mapping[str, Mapping[str, LookupFn]] | None = None,
    verify: bool = True,
    seed: int = 0,
) -> ParityReport:
    """Compare every backend, the ONNX model's own Gathers and ``extra_references`` on every table.

    ``extra_references`` maps a reference name (``"keras"``) to ``{table: ids -> vectors}``, or is
    a factory building that mapping from the opened store. All comparisons are bitwise: a lookup
    is a copy.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(map(repr, unknown))}; choose from {', '.join(BACKENDS)}")
    opened = store if isinstance(store, Store) else open_store(store, verify=verify)
    names = list(tables) if tables else list(opened)
    for name in names:
        opened[name]  # noqa: B018 - raises TableNotFoundError listing the valid names
    onnx_refs = onnx_references(opened, onnx_model)
    extras = extra_references(opened) if callable(extra_references) else (extra_references or {})
    report = ParityReport()
    for name in names:
        per_table = {ref: fns[name] for ref, fns in extras.items() if name in fns}
        if name in onnx_refs:
            per_table[ONNX_REFERENCE] = onnx_refs[name]
        if policy != "error":  # the frameworks have no such policy: they get the ids it maps to
            per_table = {ref: under_policy(fn, opened[name], policy) for ref, fn in per_table.items()}
        report.extend(table_parity(opened[name], backends, policy, extra_references=per_table, seed=seed).comparisons)
    return report


__all__ = ["ONNX_REFERENCE", "onnx_references", "store_parity"]


def under_policy(fn: LookupFn, table: EmbeddingTable, policy: str) -> LookupFn:
    """``fn`` (a framework's own lookup: the ONNX model, Keras) given the ids after ``policy`` maps them.

    A framework has no ``clip``, ``zero`` or ``oov`` policy (and wraps negatives its own way), so a
    comparison under such a policy feeds it the ids the policy makes, and zeroes the rows ``zero``
    marks: what it shows is that the framework serves the same rows for those ids.
    """
    index_policy = IndexPolicy.create(policy, table.rows, oov_id=table.oov_id, table=table.name)

    def run(ids: np.ndarray) -> np.ndarray:
        safe, zero = index_policy.apply(as_ids(ids))
        out = np.array(fn(safe))
        if zero is not None:
            out[zero] = 0
        return out

    return run
