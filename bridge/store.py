"""The on-disk embedding store: written atomically, opened with mmap, verified by sha256.

Layout (documented for non-Python readers in the README and in :mod:`bridge.manifest`)::

    STORE/manifest.json
    STORE/tables/<name>.npy      one per table, 64-byte aligned data, readable with mmap
    STORE/tables/<name>.scale.npy, <name>.zero.npy   a quantized table's scale and zero point
    STORE/vocab/<name>.txt       one token per line, line number = id
    STORE/<other files>          e.g. model.onnx written by ``embridge convert``
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge import dtypes
from bridge import manifest as mf
from bridge.atomic import atomic_directory
from bridge.errors import BridgeError, InputError, StoreError, TableNotFoundError
from bridge.npyio import file_sha256, open_npy, verify_sha256, write_npy
from bridge.paths import safe_child_path
from bridge.quantization import Quantization
from bridge.table import EmbeddingTable, SourceRef
from bridge.vocab import Vocabulary, escape_token, unescape_token

ExtraFile = bytes | Path
_OWN_DIRS = ("tables", "vocab")  # the store's own folders (with manifest.json): no extra file goes there


def write_store(
    out_dir: str | os.PathLike[str],
    tables: Sequence[EmbeddingTable],
    *,
    provenance: Mapping[str, Any] | None = None,
    force: bool = False,
    files: Mapping[str, ExtraFile] | None = None,
) -> Store:
    """Write ``tables`` (and extra ``files``) as a store in ``out_dir``, atomically.

    Nothing appears at ``out_dir`` unless every file was written; an existing non-empty
    ``out_dir`` is refused unless ``force``, in which case it is replaced as a whole.
    """
    _check_inputs(tables, files)
    with atomic_directory(out_dir, force=force) as staging:
        manifest = build_store_files(staging, tables, provenance=provenance, files=files)
        (staging / mf.MANIFEST).write_bytes(mf.write_manifest_bytes(manifest))
    return open_store(out_dir, verify=False)


def build_store_files(
    root: Path,
    tables: Sequence[EmbeddingTable],
    *,
    provenance: Mapping[str, Any] | None = None,
    files: Mapping[str, ExtraFile] | None = None,
) -> dict[str, Any]:
    """Write table, vocabulary and extra files under ``root``; return the manifest (not written)."""
    taken: set[str] = set()
    (root / "tables").mkdir(exist_ok=True)
    table_entries, vocab_entries = [], []
    for table in tables:
        stem = mf.safe_file_stem(table.name, taken)
        vocab_name = None
        if table.vocab is not None:
            vocab_entries.append(_write_vocab(root, table.name, stem, table.vocab))
            vocab_name = table.name
        entry = _write_table(root, table, stem, vocab_name)
        if table.quantization is not None:
            entry["quantization"] = _write_quantization(root, table.quantization, stem, taken)
        table_entries.append(entry)
    return {
        "format": mf.FORMAT,
        "generator": mf.generator_info(),
        "provenance": dict(provenance or {}),
        "tables": table_entries,
        "vocabularies": vocab_entries,
        "files": {name: _write_extra(root, name, src) for name, src in (files or {}).items()},
    }


def _check_inputs(tables: Sequence[EmbeddingTable], files: Mapping[str, ExtraFile] | None) -> None:
    """Refuse what would make a store that cannot be read back: wrong types, repeated names, clashing files."""
    if isinstance(tables, (str, bytes, EmbeddingTable)) or not isinstance(tables, Sequence):
        raise InputError(f"tables must be a list of EmbeddingTable, got {type(tables).__name__}")
    wrong = sorted({type(t).__name__ for t in tables if not isinstance(t, EmbeddingTable)})
    if wrong:
        raise InputError(f"tables must be a list of EmbeddingTable; it holds {', '.join(wrong)}: "
                         "wrap each array as EmbeddingTable(name, data)")
    _check_names(tables)
    for name in files or {}:
        parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".")]
        if parts == [mf.MANIFEST] or (len(parts) > 1 and parts[0] in _OWN_DIRS):
            raise InputError(f"extra file {name!r} would overwrite the store's own {mf.MANIFEST}, tables/ or vocab/; "
                             "give it another name")


def _check_names(tables: Sequence[EmbeddingTable]) -> None:
    names = [t.name for t in tables]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StoreError(f"table names must be unique; repeated: {', '.join(dupes)}")
    if not all(names):
        raise StoreError("every table needs a non-empty name")
    for name in names:
        if not isinstance(name, str) or not _is_unicode(name):
            raise InputError(f"table name {name!r} is not a valid Unicode string (a str without lone surrogates); "
                             "the manifest is UTF-8 JSON: rename the table")


def _is_unicode(text: str) -> bool:
    """True if ``text`` can be written as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_npy_file(root: Path, rel: str, array: Any, desc: str) -> Any:
    with open(root / rel, "wb") as fh:
        written = write_npy(fh, array, desc=desc)
        fh.flush()
        os.fsync(fh.fileno())
    return written


def _write_table(root: Path, table: EmbeddingTable, stem: str, vocab: str | None) -> dict[str, Any]:
    rel = f"tables/{stem}.npy"
    written = _write_npy_file(root, rel, table.data, f"writing {table.name}")
    return {
        "name": table.name,
        "file": rel,
        "shape": list(table.shape),
        "dtype": dtypes.dtype_name(table.dtype),
        "storage_dtype": dtypes.dtype_name(dtypes.storage_dtype(table.dtype)),
        "data_offset": written.data_offset,
        "nbytes": written.nbytes,
        "sha256": written.sha256,
        "source": [s.to_json() for s in table.sources],
        "initializer": table.initializer,
        "vocab": vocab,
        "oov_id": table.oov_id,
        "padding_id": table.padding_id,
        "metadata": table.metadata,
    }


def _write_quantization(root: Path, quant: Quantization, stem: str, taken: set[str]) -> dict[str, Any]:
    """Write scale (and zero point) next to the table; the manifest's ``quantization`` entry."""
    entry: dict[str, Any] = {"scheme": quant.scheme}
    for key, suffix, array in (("scale", "scale", quant.scale), ("zero_point", "zero", quant.zero_point)):
        if array is None:
            entry[key] = None
            continue
        rel = f"tables/{mf.safe_file_stem(f'{stem}.{suffix}', taken)}.npy"
        written = _write_npy_file(root, rel, array, f"writing {stem} {suffix}")
        entry[key] = {"file": rel, "sha256": written.sha256, "shape": list(array.shape),
                      "dtype": dtypes.dtype_name(array.dtype), "data_offset": written.data_offset}
    entry.update(group_size=quant.group_size, axis=quant.axis, out_dtype=quant.out_dtype)
    return entry


def _write_vocab(root: Path, name: str, stem: str, vocab: Vocabulary) -> dict[str, Any]:
    rel = f"vocab/{stem}.txt"
    (root / "vocab").mkdir(exist_ok=True)
    vocab.save(root / rel)
    return {
        "name": name,
        "file": rel,
        "size": len(vocab),
        "sha256": file_sha256(root / rel),
        "oov_id": vocab.oov_id,
        "reserved": dict(vocab.reserved),
        "source": vocab.source,
        **({"aliases": {escape_token(k): v for k, v in vocab.aliases.items()}} if vocab.aliases else {}),
        **({"unnamed": list(vocab.unnamed)} if vocab.unnamed else {}),
    }


def _write_extra(root: Path, name: str, src: ExtraFile) -> dict[str, Any]:
    target = safe_child_path(root, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        target.write_bytes(src)
    else:
        shutil.copyfile(src, target)
    return {"sha256": file_sha256(target), "bytes": target.stat().st_size}


class Store(Mapping[str, EmbeddingTable]):
    """An opened store: a read-only mapping from table name to memory-mapped :class:`EmbeddingTable`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._entries = {t["name"]: t for t in manifest["tables"]}
        self._vocab_entries = {v["name"]: v for v in manifest.get("vocabularies", [])}
        self._cache: dict[str, EmbeddingTable] = {}

    def __getitem__(self, name: str) -> EmbeddingTable:
        if name not in self._cache:
            self._cache[name] = self._open_table(self.entry(name))
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, tables={list(self._entries)})"

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of table ``name`` (nothing is opened)."""
        if name not in self._entries:
            valid = ", ".join(self._entries) or "(none)"
            raise TableNotFoundError(f"no table {name!r} in store {str(self.path)!r}; tables: {valid}")
        return self._entries[name]

    def file_path(self, relative: str) -> Path:
        """Resolve a manifest path inside the store, refusing paths that escape it or are missing."""
        path = safe_child_path(self.path, relative)
        if not path.is_file():
            raise StoreError(
                f"store {str(self.path)!r} lists {relative!r} but the file is missing; re-create the store"
            )
        return path

    def vocabulary(self, name: str) -> Vocabulary:
        """Load vocabulary ``name`` from its text file."""
        entry = self._vocab_entries.get(name)
        if entry is None:
            raise TableNotFoundError(f"no vocabulary {name!r} in store {str(self.path)!r}")
        vocab = Vocabulary.load(
            self.file_path(entry["file"]), oov_id=entry.get("oov_id"),
            reserved=dict(entry.get("reserved") or {}), source=entry.get("source"),
            aliases={unescape_token(k): v for k, v in (entry.get("aliases") or {}).items()},
            unnamed=tuple(entry.get("unnamed") or ()),
        )
        if len(vocab) != entry.get("size", len(vocab)):
            raise StoreError(f"vocabulary {name!r} has {len(vocab)} tokens, the manifest says {entry['size']}")
        return vocab

    def table_files(self, name: str) -> list[tuple[Path, str, str]]:
        """``(path, sha256, what)`` of every file table ``name`` is served from: its data, its scale and
        zero point (quantized), its vocabulary."""
        entry = self.entry(name)
        files = [(self.file_path(entry["file"]), entry["sha256"], f"table {name!r}")]
        files += [(self.file_path(p["file"]), p["sha256"], f"{key} of table {name!r}")
                  for key, p in _quantization_files(entry)]
        vocab = self._vocab_entries.get(entry.get("vocab") or "")
        if vocab is not None:
            files.append((self.file_path(vocab["file"]), vocab["sha256"], f"vocabulary {vocab['name']!r}"))
        return files

    def verify(self) -> None:
        """Check every file listed in the manifest against its sha256: :class:`ChecksumError` for one that
        differs, :class:`StoreError` for one that is missing."""
        checked: set[Path] = set()
        for name in self._entries:
            for path, sha256, what in self.table_files(name):
                if path not in checked:
                    verify_sha256(path, sha256, what)
                    checked.add(path)
        for entry in self._vocab_entries.values():
            if self.file_path(entry["file"]) not in checked:
                verify_sha256(self.file_path(entry["file"]), entry["sha256"], f"vocabulary {entry['name']!r}")
        for name, info in self.manifest.get("files", {}).items():
            verify_sha256(self.file_path(name), info["sha256"], f"file {name!r}")

    def _open_table(self, entry: dict[str, Any]) -> EmbeddingTable:
        dtype = dtypes.from_name(entry["dtype"])
        data = open_npy(self.file_path(entry["file"]), tuple(entry["shape"]), dtype)
        vocab = self.vocabulary(entry["vocab"]) if entry.get("vocab") else None
        return EmbeddingTable(
            name=entry["name"], data=data, vocab=vocab,
            sources=tuple(SourceRef.from_json(s) for s in entry.get("source", [])),
            initializer=entry.get("initializer"), oov_id=entry.get("oov_id"),
            padding_id=entry.get("padding_id"), metadata=dict(entry.get("metadata") or {}),
            quantization=self._open_quantization(entry),
        )

    def _open_quantization(self, entry: dict[str, Any]) -> Quantization | None:
        """The table's :class:`Quantization` with memory-mapped parameters; None if it has none."""
        info = entry.get("quantization")
        if not info:
            return None
        params = {key: open_npy(self.file_path(p["file"]), tuple(p["shape"]), dtypes.from_name(p["dtype"]))
                  for key, p in _quantization_files(entry)}
        try:
            return Quantization(scheme=info["scheme"], scale=params["scale"], zero_point=params.get("zero_point"),
                                group_size=info.get("group_size"), out_dtype=info.get("out_dtype", "float32"),
                                axis=info.get("axis"))
        except (KeyError, BridgeError) as exc:
            raise StoreError(f"table {entry['name']!r}: invalid quantization entry ({exc}); re-create the store") \
                from exc


def _quantization_files(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(key, file entry)]`` of a table's quantization parameters (none for a plain table)."""
    info = entry.get("quantization") or {}
    found = [(key, info[key]) for key in ("scale", "zero_point") if isinstance(info.get(key), dict)]
    for key, param in found:
        if not all(k in param for k in ("file", "sha256", "shape", "dtype")):
            raise StoreError(f"table {entry['name']!r}: quantization {key} entry lacks file/sha256/shape/dtype; "
                             "re-create the store")
    return found


def open_store(path: str | os.PathLike[str], *, verify: bool = True) -> Store:
    """Open a store directory; with ``verify`` (the default) check every sha256 first.

    Pass ``verify=False`` only to inspect a store you suspect is damaged, or when the files
    were verified moments ago by this process.
    """
    root = Path(path)
    store = Store(root, mf.read_manifest(root))
    if verify:
        store.verify()
    return store
