"""Serve models rewritten by ``embridge share``: many models, one copy of each table.

In one process, :class:`SharedSessions` memory-maps each store table once and hands the same
buffer to every session (``SessionOptions.add_initializer`` with an ``OrtValue`` over the
``np.load(mmap_mode="r")`` array; no copy). Across processes, each process does the same, so the
table's pages are the page cache's, shared by all of them. Models whose tables were cut out get
their vectors from the bridge (:class:`bridge.cut.CutModel`).

Nothing is served from a store that does not check out: before a session is created, the model
file, every table it reads (as external data or through a cut lookup) and every external data
file are checked against the manifest's sha256 (:class:`~bridge.errors.ChecksumError`), and every
external reference must point at a manifest table with its exact offset, length, shape and dtype
(:class:`~bridge.errors.StoreError`). A missing table file or manifest is a StoreError;
a store path that does not exist is an InputError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bridge import dtypes
from bridge.backends.base import MAX_THREADS, Lookup
from bridge.cut import CUT_KEY, CutModel, CutSpec, cut_specs, make_lookup, ort_input
from bridge.errors import InputError, StoreError, TableNotFoundError
from bridge.external import external_tensors, onnx_elem_type
from bridge.npyio import verify_sha256
from bridge.onnx_io import iter_graphs, load_model, safe_child_path
from bridge.store import Store, open_store

__all__ = [
    "ChecksumCache", "SharedModelInfo", "SharedSessions", "check_shared_model", "open_shared_session", "table_entry",
]


@dataclass(frozen=True)
class SharedModelInfo:
    """A checked model of a shared store: the main-graph initializers it reads from tables, and its cuts."""

    path: Path
    initializers: dict[str, str]  # main-graph initializer -> table
    tables: tuple[str, ...]  # every table the model needs, cuts included
    cut: tuple[CutSpec, ...]


class ChecksumCache:
    """Files whose sha256 matched, keyed by path, inode, size and mtime: each is hashed once per cache.

    A file replaced or rewritten after the check gets a new key and is hashed again.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, int, int, int, str]] = set()

    def check(self, path: Path, sha256: str, what: str) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{what} is missing: {str(path)!r} does not exist; the shared store is incomplete, "
                             "re-create it with `embridge share`") from None
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, sha256)
        if key not in self._seen:
            verify_sha256(path, sha256, what)
            self._seen.add(key)


def check_shared_model(
    model_path: str | os.PathLike[str],
    store: Store | str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    verified: ChecksumCache | None = None,
) -> SharedModelInfo:
    """Check a model written by ``embridge share`` against its store; raise before anything is served.

    ``store`` defaults to the model's directory (where ``embridge share`` writes models). With
    ``verify`` the sha256 of the model, its tables and its data files are checked (each once per
    ``verified`` cache). Raises :class:`ChecksumError`, :class:`StoreError` or :class:`UnsafePathError`.
    """
    path = Path(model_path)
    if isinstance(store, Store):
        opened = store
    else:
        opened = open_store(store if store is not None else path.parent, verify=False)
    if path.parent.resolve() != opened.path.resolve():
        raise StoreError(f"model {str(path)!r} is not in store {str(opened.path)!r}; models written by "
                         "`embridge share` live in the store directory and read its tables by relative path")
    listed = opened.manifest.get("files", {}).get(path.name)
    if listed is None:
        raise StoreError(f"{path.name!r} is not listed in {str(opened.path)!r}/manifest.json; it was not written "
                         "into this store by `embridge share`")
    checker = verified if verified is not None else ChecksumCache()
    if verify:
        checker.check(path, listed["sha256"], f"model {path.name!r}")
    model = load_model(path)
    initializers, tables = _check_external(model, opened, checker if verify else None)
    specs = cut_specs({p.key: p.value for p in model.metadata_props if p.key == CUT_KEY})
    for spec in specs:
        entry = table_entry(opened, spec.table)
        if verify:
            checker.check(safe_child_path(opened.path, entry["file"]), entry["sha256"], f"table {spec.table!r}")
        tables.add(spec.table)
    return SharedModelInfo(path, initializers, tuple(sorted(tables)), tuple(specs))


def table_entry(store: Store, name: str) -> dict[str, Any]:
    """The manifest entry of table ``name`` (without opening its file); :class:`TableNotFoundError` if absent."""
    for entry in store.manifest["tables"]:
        if entry["name"] == name:
            return dict(entry)
    valid = ", ".join(t["name"] for t in store.manifest["tables"]) or "(none)"
    raise TableNotFoundError(f"no table {name!r} in store {str(store.path)!r}; tables: {valid}")


def _check_external(
    model: onnx.ModelProto, store: Store, checker: ChecksumCache | None
) -> tuple[dict[str, str], set[str]]:
    by_file = {entry["file"]: entry for entry in store.manifest["tables"]}
    # onnxruntime gives an added initializer to every graph holding one of that name, subgraphs too
    nested = {t.name for path, graph in iter_graphs(model) if path for t in graph.initializer}
    initializers: dict[str, str] = {}
    tables: set[str] = set()
    for graph, tensor, ext in external_tensors(model):
        target = safe_child_path(store.path, ext.location)
        rel = target.relative_to(store.path.resolve()).as_posix()
        entry = by_file.get(rel)
        if not target.is_file():
            raise StoreError(f"initializer {tensor.name!r} reads {ext.location!r}, which is missing from "
                             f"{str(store.path)!r}; the shared store is incomplete: re-create it with `embridge share`")
        if entry is None:
            _check_data_file(store, rel, target, tensor.name, checker)
            continue
        _check_reference(tensor, ext.offset, ext.length, entry)
        if checker is not None:
            checker.check(target, entry["sha256"], f"table {entry['name']!r}")
        tables.add(entry["name"])
        if graph == "" and tensor.name not in nested:  # else onnxruntime maps this one itself
            initializers[tensor.name] = entry["name"]
    return initializers, tables


def _check_data_file(store: Store, rel: str, target: Path, name: str, checker: ChecksumCache | None) -> None:
    listed = store.manifest.get("files", {}).get(rel)
    if listed is None:
        raise StoreError(f"initializer {name!r} reads {rel!r}, which is neither a table nor a file of the store's "
                         "manifest; re-create the store with `embridge share`")
    if checker is not None:
        checker.check(target, listed["sha256"], f"file {rel!r}")


def _check_reference(tensor: onnx.TensorProto, offset: int, length: int | None, entry: Mapping[str, Any]) -> None:
    dtype = dtypes.from_name(entry["dtype"])
    expected = (entry["data_offset"], entry["nbytes"], list(entry["shape"]), onnx_elem_type(dtype))
    actual = (offset, length, list(tensor.dims), tensor.data_type)
    if actual != expected:
        raise StoreError(
            f"initializer {tensor.name!r} reads {entry['file']!r} as (offset, length, shape, type) {actual}, "
            f"but the manifest says {expected}; the model and the store do not belong together"
        )


def open_shared_session(
    model_path: str | os.PathLike[str],
    store: Store | str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    providers: Sequence[str] | None = None,
    session_options: Any = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a shared model, created only after :func:`check_shared_model`.

    The tables are memory-mapped by onnxruntime from the store's files (external data). For a model
    with cut lookups, wrap the session in :class:`bridge.cut.CutModel` (or use :class:`SharedSessions`).
    """
    import onnxruntime as ort

    check_shared_model(model_path, store, verify=verify)
    return ort.InferenceSession(str(model_path), session_options, providers=list(providers or ["CPUExecutionProvider"]))


class SharedSessions:
    """Sessions for many shared models of one store, in one process, over one mapping of each table.

    >>> sessions = SharedSessions("shared/")
    >>> a = sessions.session("shared/model_a.onnx")
    >>> b = sessions.session("shared/model_b.onnx")      # same table buffer as ``a``

    Each table is checked (sha256) once, memory-mapped once and given to every session through
    ``SessionOptions.add_initializer``; the ``OrtValue`` and options are kept alive with the session.
    ``in_process_sharing=False`` lets onnxruntime map the external data itself (one mapping per session,
    still one copy in the page cache).
    """

    def __init__(self, store_dir: str | os.PathLike[str], *, verify: bool = True,
                 providers: Sequence[str] | None = None, threads: int = 1, in_process_sharing: bool = True,
                 backend: str = "numpy") -> None:
        self.store = open_store(store_dir, verify=False)
        self.verify = verify
        self.providers = list(providers or ["CPUExecutionProvider"])
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise InputError(f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
        self.threads = threads
        self.in_process_sharing = in_process_sharing
        self.backend = backend
        self._verified = ChecksumCache()
        self._ortvalues: dict[str, Any] = {}
        self._sessions: dict[Path, Any] = {}
        self._lookups: dict[tuple[str, str], Any] = {}

    def info(self, model_path: str | os.PathLike[str]) -> SharedModelInfo:
        """Check ``model_path`` against the store (sha256 once per file) and describe it."""
        return check_shared_model(self._resolve(model_path), self.store, verify=self.verify, verified=self._verified)

    def session(self, model_path: str | os.PathLike[str]) -> Any:
        """The (cached) ``InferenceSession`` of a shared model; tables given as one shared buffer."""
        path = self._resolve(model_path)
        if path not in self._sessions:
            self._sessions[path] = self._create(path, self.info(path))
        return self._sessions[path]

    def cut_model(self, model_path: str | os.PathLike[str]) -> CutModel:
        """A :class:`CutModel` for a model written with ``--cut``: ``run`` takes the original inputs."""
        return CutModel(self.session(model_path), self.store, backend=self.backend, lookups=self._lookups)

    def run_cut(self, model_paths: Sequence[str | os.PathLike[str]], feeds: Mapping[str, Any]) -> dict[str, list[Any]]:
        """Run several cut models on the same original inputs, looking each table's vectors up once."""
        vectors: dict[tuple[str, str, str], np.ndarray] = {}
        results = {}
        for p in model_paths:
            model = self.cut_model(p)
            results[str(p)] = model.session.run(None, model.feeds(feeds, vectors))
        return results

    def lookup(self, table: str, policy: str = "error") -> Lookup:
        """A shared ``bridge.backends`` lookup over a store table (checked once)."""
        if self.verify:  # the data, scale, zero point and vocabulary (TableNotFoundError for an unknown table)
            for path, sha256, what in self.store.table_files(table):
                self._verified.check(path, sha256, what)
        if (table, policy) not in self._lookups:
            self._lookups[(table, policy)] = make_lookup(self.store[table], self.backend, policy)
        return self._lookups[(table, policy)]

    def _resolve(self, model_path: str | os.PathLike[str]) -> Path:
        path = Path(model_path)
        if not path.is_absolute() and (self.store.path / path).is_file():
            path = self.store.path / path
        if not path.is_file():
            raise InputError(f"model {str(model_path)!r} does not exist in {str(self.store.path)!r}")
        return path

    def _create(self, path: Path, info: SharedModelInfo) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        keep = []
        if self.in_process_sharing:
            for name, table in info.initializers.items():
                value = self._ortvalue(table)
                if value is not None:
                    opts.add_initializer(name, value)
                    keep.append(value)
        session = ort.InferenceSession(str(path), opts, providers=self.providers)
        session._bridge_keepalive = (opts, keep)  # the OrtValues must outlive the session
        return session

    def _ortvalue(self, table: str) -> Any:
        import onnxruntime as ort

        if table not in self._ortvalues:
            data = self.store[table].data
            if not data.flags.c_contiguous:
                self._ortvalues[table] = None  # let onnxruntime map the external data itself
            else:
                self._ortvalues[table] = ort_input(data) if dtypes.storage_dtype(data.dtype) != data.dtype \
                    else ort.OrtValue.ortvalue_from_numpy(data)
        return self._ortvalues[table]
