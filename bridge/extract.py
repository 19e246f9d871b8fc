"""From an ONNX model to embedding tables and a store: scan, read (zero-copy), name, write."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge.atomic import check_output_dir
from bridge.npyio import file_sha256
from bridge.onnx_io import initializer_array, load_model
from bridge.onnx_vocab import attach_onnx_vocabularies
from bridge.quantization_onnx import quantization_from_ref
from bridge.scan import TableRef, default_table_name, scan, table_tensor
from bridge.store import Store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.ties import find_ties, ties_json


def read_tables(model: onnx.ModelProto, base_dir: Path | None) -> list[tuple[TableRef, np.ndarray]]:
    """Every embedding table of ``model`` with its data (external data memory-mapped, not read)."""
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
    """
    pairs = read_tables(model, base_dir)
    ties = find_ties(model, [ref for ref, _ in pairs], base_dir, arrays={ref.initializer: d for ref, d in pairs})
    taken: set[str] = set()
    tables = []
    for ref, data in pairs:
        name = (names or {}).get(ref.initializer) or default_table_name(ref.initializer, taken)
        taken.add(name)
        tables.append(EmbeddingTable(
            name=name, data=data, sources=tuple((sources or {}).get(ref.initializer, ())),
            initializer=ref.initializer,
            metadata={"onnx": ref.to_json(), "ties": ties_json(ties[ref.initializer])},
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
    tables = attach_onnx_vocabularies(model, tables_from_onnx(model, path.parent))
    info = {"source_model": str(path), "source_sha256": file_sha256(path), **(provenance or {})}
    return write_store(out_dir, tables, provenance=info, force=force)
