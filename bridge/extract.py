"""From an ONNX model to embedding tables and a store: scan, read (zero-copy), name, write.

A table read through ``Cast`` nodes (``Gather(Cast(W, to=FLOAT16), ids)``) is stored as the Gather reads
it, the casts applied and recorded (:mod:`bridge.onnx_casts`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.atomic import check_output_dir
from bridge.cut import overridable_initializers
from bridge.external import check_external_locations
from bridge.npyio import file_sha256
from bridge.onnx_casts import ModelGraphs, has_cast, served_data
from bridge.onnx_io import initializer_array, load_model
from bridge.onnx_vocab import attach_onnx_vocabularies
from bridge.quantization_onnx import quantization_from_ref
from bridge.scan import TableRef, default_table_name, scan, table_tensor
from bridge.store import Store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.ties import find_ties, ties_json


def read_tables(model: onnx.ModelProto, base_dir: Path | None) -> list[tuple[TableRef, np.ndarray]]:
    """Every embedding table of ``model`` with its initializer's data (external data memory-mapped, not read).

    The data is the initializer as stored, before any ``Cast`` in front of the lookup
    (see :func:`bridge.onnx_casts.table_casts`).
    """
    return [(ref, initializer_array(table_tensor(model, ref), base_dir)) for ref in scan(model)]


def tables_from_onnx(
    model: onnx.ModelProto,
    base_dir: Path | None,
    *,
    sources: Mapping[str, Sequence[SourceRef]] | None = None,
    names: Mapping[str, str] | None = None,
) -> list[EmbeddingTable]:
    """:class:`EmbeddingTable` objects for every table in ``model``.

    ``sources`` and ``names`` are keyed by initializer name (from a framework converter that
    mapped tables back to layers); other tables are named after their initializer. A table the
    model dequantizes (Keras int8/int4, DequantizeLinear, Mul by a scale) keeps its integer data
    and gets a :class:`~bridge.quantization.Quantization` read from the model's scale / zero point.
    A table the model casts before its lookup holds the cast values (see the module docstring). A table
    whose initializer is also a graph input, which callers may override, holds the model's default
    values and is marked ``metadata["onnx"]["overridable"]``.
    """
    pairs = read_tables(model, base_dir)
    overridable = overridable_initializers(model)
    ties = find_ties(model, [ref for ref, _ in pairs], base_dir, arrays={ref.key: d for ref, d in pairs})
    graphs = ModelGraphs(model) if any(has_cast(ref) for ref, _ in pairs) else None
    taken: set[str] = set()
    tables = []
    for ref, data in pairs:
        name = (names or {}).get(ref.initializer) or default_table_name(ref.initializer, taken)
        taken.add(name)
        served, cast = served_data(model, ref, data, graphs)
        onnx_info = {**ref.to_json(), **({"cast": cast} if cast else {}),
                     **({"overridable": True} if not ref.graph and ref.initializer in overridable else {})}
        tables.append(EmbeddingTable(
            name=name, data=served, sources=tuple((sources or {}).get(ref.initializer, ())),
            initializer=ref.initializer, metadata={"onnx": onnx_info, "ties": ties_json(ties[ref.key])},
            quantization=quantization_from_ref(model, ref, base_dir),
        ))
    return tables


def extract(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Store:
    """Write a store with every embedding table of the ONNX model at ``model_path``."""
    check_output_dir(out_dir, force, keep=[model_path])
    path = Path(model_path)
    model = load_model(path)
    check_output_dir(out_dir, force, keep=check_external_locations(model, path.parent))  # its data files too
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, path.parent))
    info = {"source_model": str(path), "source_sha256": file_sha256(path), **(provenance or {})}
    return write_store(out_dir, tables, provenance=info, force=force)
