"""``embridge share``: one store for the tables of many models, and the models rewritten to read it.

Identical tables (same bytes, shape and dtype) across the given models are stored once. Each model
is rewritten into the store directory as ``<stem>.onnx`` with its table initializers turned into
ONNX external data pointing at the store's ``.npy`` files (``location = "tables/x.npy"``,
``offset = data_offset``, ``length = nbytes``), so onnxruntime memory-maps one copy of each table
for every model and every process. Other external data of a model is copied to
``<stem>.onnx.data`` next to it. With ``cut=True`` the lookups themselves are cut out of the models
(:mod:`bridge.cut`): the vectors become model inputs, fed by the bridge.

Every rewritten model is run against its original in onnxruntime on sample inputs before anything
is written; outputs must be bitwise equal. A model whose original onnxruntime cannot run on sample
inputs (string inputs, ops it lacks) is written unchecked, ``check.verified`` None and ``check.note``
saying why. The manifest lists each model under ``files`` (sha256)
and, under ``provenance["models"]``, its source, the tables it reads and its cuts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge import dtypes
from bridge import manifest as mf
from bridge.atomic import atomic_directory, check_output_dir
from bridge.cut import CUT_KEY, CutModel, CutSpec, TableCut, cut_gathers, feed_cut_model, overridable_initializers
from bridge.errors import InputError, UnsupportedError
from bridge.external import (
    check_external_locations,
    external_tensors,
    move_external_tensors,
    point_initializer_at_file,
    save_model,
)
from bridge.npyio import file_sha256
from bridge.onnx_casts import has_cast, table_casts
from bridge.onnx_io import external_data_info, initializer_array, load_model, safe_child_path
from bridge.progress import byte_bar
from bridge.quantization import Quantization
from bridge.quantization_onnx import quantization_from_ref
from bridge.scan import TableRef, default_table_name, scan, table_tensor
from bridge.share_check import CheckResult, check_rewrite, model_inputs, ort_session
from bridge.store import Store, build_store_files, open_store
from bridge.table import EmbeddingTable

__all__ = ["CutSpec", "ShareResult", "SharedModel", "feed_cut_model", "share", "table_digest"]

_HASH_CHUNK = 8 * 1024 * 1024
_CUTTABLE_VIA = frozenset({"Identity"})


@dataclass(frozen=True)
class SharedModel:
    """One rewritten model: where it came from, the tables it reads, its cuts, and its check."""

    source: str
    source_sha256: str
    file: str
    tables: dict[str, str]
    cut: tuple[CutSpec, ...] = ()
    kept: tuple[str, ...] = ()
    data_file: str | None = None
    check: CheckResult = CheckResult(None, "not checked")
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "source_sha256": self.source_sha256, "file": self.file,
                "tables": dict(self.tables),
                "cut": [c.to_json() for c in self.cut], "kept": list(self.kept), "data_file": self.data_file,
                **self.check.to_json(), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class ShareResult:
    """What :func:`share` wrote: the store (tables + models), and the bytes before and after."""

    store: Store
    models: tuple[SharedModel, ...]
    source_bytes: int
    shared_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"store": str(self.store.path), "tables": self.store.manifest["tables"],
                "models": [m.to_json() for m in self.models],
                "source_bytes": self.source_bytes, "shared_bytes": self.shared_bytes}


@dataclass
class _Source:
    path: Path
    model: onnx.ModelProto
    refs: list[TableRef]
    tables: dict[tuple[str, str], str] = field(default_factory=dict)  # (graph, initializer) -> table


@dataclass
class _Slot:
    table: EmbeddingTable
    users: list[dict[str, str]]


def share(
    model_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    cut: bool = False,
    verify: bool = True,
) -> ShareResult:
    """Write one store in ``out_dir`` with the deduplicated tables of ``model_paths``, and the rewritten models.

    With ``cut``, gathers are cut out where that is exact (see :mod:`bridge.cut`). With ``verify``
    (default), each rewritten model must give bitwise the same outputs as its original on sample
    inputs, else :class:`~bridge.errors.ParityError` and nothing is written.
    """
    check_output_dir(out_dir, force, keep=model_paths)
    sources = [_read_source(p) for p in _unique_paths(model_paths)]
    data_files = [f for s in sources for f in check_external_locations(s.model, s.path.parent)]
    check_output_dir(out_dir, force, keep=data_files)  # replacing out_dir must not delete the inputs' data
    slots = _dedupe(sources)
    source_bytes = sum(_source_bytes(s) for s in sources)
    with atomic_directory(out_dir, force=force) as staging:
        manifest = build_store_files(staging, [s.table for s in slots.values()],
                                     provenance={"tool": "embridge share", "cut": cut})
        store = Store(staging, manifest)
        taken = {"manifest"}
        models = [_write_model(src, staging, store, mf.safe_file_stem(src.path.stem, taken), cut, verify)
                  for src in sources]
        manifest["provenance"]["models"] = {m.file: m.to_json() for m in models}
        for m in models:
            for rel in filter(None, (m.file, m.data_file)):
                manifest["files"][rel] = {"sha256": file_sha256(staging / rel), "bytes": (staging / rel).stat().st_size}
        (staging / mf.MANIFEST).write_bytes(mf.write_manifest_bytes(manifest))
    written = open_store(out_dir, verify=False)
    shared_bytes = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    return ShareResult(written, tuple(models), source_bytes, shared_bytes)


def _unique_paths(model_paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise InputError("no models given; pass one or more .onnx files")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise InputError(f"model {str(p)!r} is given twice (also as {str(seen[key])!r}); pass each model once")
        seen[key] = p
    return paths


def _read_source(path: Path) -> _Source:
    model = load_model(path)
    if any(prop.key == CUT_KEY for prop in model.metadata_props):  # its cuts name tables of another store
        raise InputError(f"{str(path)!r} was cut by an earlier `embridge share --cut` (some of its lookups are fed "
                         "from that store); share the original model instead")
    refs = scan(model)
    if not refs:
        raise InputError(f"{str(path)!r} has no embedding tables (no Gather on a 2-D constant); leave it out")
    return _Source(path, model, refs)


def _dedupe(sources: Sequence[_Source]) -> dict[str, _Slot]:
    """One slot per distinct table content (and quantization), named after its first initializer.

    A quantized table keeps its integers (which the rewritten model reads) and its
    :class:`~bridge.quantization.Quantization`, so the store serves the dequantized vectors, as
    :func:`bridge.extract.extract` does; the same integers with other parameters are another table.
    """
    slots: dict[str, _Slot] = {}
    taken: set[str] = set()
    for src in sources:
        for ref in src.refs:
            tensor = table_tensor(src.model, ref)
            array = initializer_array(tensor, src.path.parent)
            digest = table_digest(array, tensor, src.path.parent)
            quant = _quantization(src, ref, array)
            key = digest if quant is None else quantization_digest(digest, quant)
            note = _cast_note(src, ref, array)
            if key not in slots:
                name = default_table_name(ref.initializer, taken)
                taken.add(name)
                meta = {"content_sha256": digest, "shared_by": [], **note}
                table = EmbeddingTable(name=name, data=array, initializer=ref.initializer, metadata=meta,
                                       quantization=quant)
                slots[key] = _Slot(table, table.metadata["shared_by"])
            slot = slots[key]
            if slot.table.metadata.get("model_casts") != note.get("model_casts"):  # the readers disagree
                slot.table.metadata["model_casts"] = _disagreeing(array, slot.table.metadata.get("model_casts"),
                                                                  note.get("model_casts"))
            slot.users.append({"model": str(src.path), "initializer": ref.initializer, "graph": ref.graph})
            src.tables[(ref.graph, ref.initializer)] = slot.table.name
    return slots


def _cast_note(src: _Source, ref: TableRef, array: np.ndarray) -> dict[str, Any]:
    """``{"model_casts": ...}`` for a plain table the model reads through ``Cast`` nodes, else ``{}``.

    The store keeps the initializer's values, which the rewritten model reads and still casts; a lookup
    from the store serves those values, not the cast ones (``embridge extract`` stores the cast ones).
    """
    if ref.quantization or not has_cast(ref):
        return {}
    try:
        chain = [d.name for d in table_casts(src.model, ref, array.dtype)]
    except UnsupportedError as exc:
        return {"model_casts": {"from": array.dtype.name, "note": str(exc)}}
    return {"model_casts": {"from": array.dtype.name, "chain": chain,
                            "note": "the models cast these values after reading them; lookups serve them uncast"}}


def _disagreeing(array: np.ndarray, old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any]:
    """The ``model_casts`` note of a table its models read through different casts (or some through none)."""
    seen: set[str] = set()
    for cast in (old, new):
        if cast is None:
            seen.add("no cast")
        elif "readers" in cast:
            seen.update(cast["readers"].split("; "))
        else:
            seen.add(" -> ".join([array.dtype.name, *cast.get("chain", ["?"])]))
    return {"from": array.dtype.name, "readers": "; ".join(sorted(seen)),
            "note": "the models read these values through different casts (see readers); lookups serve them uncast"}


def _quantization(src: _Source, ref: TableRef, array: np.ndarray) -> Quantization | None:
    """The dequantization of a quantized table (its casts in front checked as extract checks them); None if plain."""
    if not ref.quantization:
        return None
    table_casts(src.model, ref, array.dtype)
    return quantization_from_ref(src.model, ref, src.path.parent)


def quantization_digest(digest: str, quant: Quantization) -> str:
    """sha256 of a quantized table's key: its content ``digest``, the scheme and every parameter's dtype,
    shape and bytes."""
    h = hashlib.sha256(f"{digest}\n{json.dumps(quant.metadata(), sort_keys=True)}\n".encode())
    for param in (quant.scale, quant.zero_point):
        if param is not None:
            h.update(f"{param.dtype.name}{list(param.shape)}\n".encode())
            h.update(np.ascontiguousarray(param).tobytes())
        h.update(b"|")
    return h.hexdigest()


def table_digest(array: np.ndarray, tensor: onnx.TensorProto | None = None, base_dir: Path | None = None) -> str:
    """sha256 of a table's dtype, shape and bytes: the key under which tables are deduplicated.

    For external data (``tensor`` and ``base_dir`` given) the bytes are read from the file in chunks,
    so hashing does not map the table into this process's memory.
    """
    digest = hashlib.sha256(f"{dtypes.dtype_name(array.dtype)}{list(array.shape)}\n".encode())
    ext = external_data_info(tensor) if tensor is not None else None
    if ext is not None and base_dir is not None:
        with open(safe_child_path(base_dir, ext.location), "rb") as fh, \
                byte_bar(array.nbytes, f"hashing {ext.location}") as bar:
            fh.seek(ext.offset)
            left = array.nbytes
            while left:
                chunk = fh.read(min(_HASH_CHUNK, left))
                if not chunk:
                    raise InputError(f"external data of {tensor.name!r} is truncated")  # type: ignore[union-attr]
                digest.update(chunk)
                left -= len(chunk)
                bar.update(len(chunk))
    else:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        for start in range(0, flat.nbytes, _HASH_CHUNK):
            digest.update(flat[start : start + _HASH_CHUNK].data)
    return digest.hexdigest()


def _source_bytes(src: _Source) -> int:
    files = {src.path.resolve()}
    for _, _, ext in external_tensors(src.model):
        files.add(safe_child_path(src.path.parent, ext.location))
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------ rewriting


def _write_model(src: _Source, staging: Path, store: Store, stem: str, cut: bool, verify: bool) -> SharedModel:
    inputs = model_inputs(src.model)
    warnings = _overridable_warnings(src)  # before the model is rewritten in place
    model = src.model
    data_file = f"{stem}.onnx.data"
    pointed = _point_tables(model, src, store)  # first: a Constant's table becomes an initializer, never copied
    moved = move_external_tensors(model, src.path.parent, staging, data_file, skip=pointed)
    specs, kept = _cut(model, src, store) if cut else ([], [])
    rel = f"{stem}.onnx"
    save_model(model, staging / rel)
    check = CheckResult(None, "verification skipped (verify=False)")
    if verify:
        rows = min(ref.shape[0] for ref in src.refs)
        check = check_rewrite(src.path, inputs, lambda feeds: _run(staging / rel, store, bool(specs), feeds), rows)
    tables = {ref.initializer: src.tables[(ref.graph, ref.initializer)] for ref in src.refs}
    return SharedModel(source=str(src.path), source_sha256=file_sha256(src.path), file=rel, tables=tables,
                       cut=tuple(specs), kept=tuple(kept), data_file=data_file if moved else None, check=check,
                       warnings=tuple(warnings))


def _point_tables(model: onnx.ModelProto, src: _Source, store: Store) -> frozenset[tuple[str, str]]:
    """Point every table of ``model`` at its store file; return the ``(graph, initializer)`` now reading the store.

    A table held in a ``Constant`` node reads it through a new initializer (``<name>__data``), so the
    names returned are those of the rewritten initializers, not always the tables' own.
    """
    pointed = set()
    for ref in src.refs:
        entry = store.entry(src.tables[(ref.graph, ref.initializer)])
        tensor = point_initializer_at_file(model, ref.initializer, entry["file"], entry["data_offset"],
                                           entry["nbytes"], entry["shape"], dtypes.from_name(entry["dtype"]),
                                           graph=ref.graph)
        pointed.add((ref.graph, tensor.name))
    return frozenset(pointed)


def _run(path: Path, store: Store, cut: bool, feeds: Any) -> list[Any]:
    session = ort_session(path)
    return CutModel(session, store).run(None, feeds) if cut else session.run(None, feeds)


def _overridable_warnings(src: _Source) -> list[str]:
    """A warning for each table whose initializer is also a graph input (callers may feed their own values)."""
    overridable = overridable_initializers(src.model)
    return [f"table {src.tables[(ref.graph, ref.initializer)]!r}: initializer {ref.initializer!r} of "
            f"{str(src.path)!r} is also a graph input, so callers may override it; the model still honours an "
            "override, but the store (and every lookup from it) holds the model's default values"
            for ref in src.refs if ref.graph == "" and ref.initializer in overridable]


def _where(use: Any) -> str:
    """A lookup's node label, with its graph path when it is in a subgraph (labels repeat across graphs)."""
    return f"{use.graph}/{use.node}" if use.graph else use.node


def _cut(model: onnx.ModelProto, src: _Source, store: Store) -> tuple[list[CutSpec], list[str]]:
    plan, kept = [], []
    overridable = overridable_initializers(model)
    for ref in src.refs:
        name = src.tables[(ref.graph, ref.initializer)]
        cuttable = [u for u in ref.gathers if ref.graph == "" and u.graph == "" and set(u.via) <= _CUTTABLE_VIA]
        ok = [u.node for u in cuttable]
        kept += [f"table {name!r}, {_where(u)}: " + (f"the lookup goes through {', '.join(u.via)}" if u.graph == ""
                                                      else "the lookup is in a subgraph")
                 for u in ref.gathers if u not in cuttable]
        if ok and ref.graph == "" and ref.initializer in overridable:
            kept += [f"table {name!r}, {node}: initializer {ref.initializer!r} is also a graph input, so a caller "
                     "may override it, and a cut lookup would serve the stored values instead" for node in ok]
        elif ok and ref.quantization is not None:
            kept += [f"table {name!r}, {node}: the model dequantizes the rows it gathers" for node in ok]
        elif ok:
            plan.append(TableCut(table=name, gathers=tuple(ok),
                                 shape=(int(ref.shape[0]), int(ref.shape[1])), dtype=store[name].dtype))
    specs, not_cut = cut_gathers(model, plan)
    return specs, kept + not_cut

