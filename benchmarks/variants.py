"""Every variant the benchmark times: one small factory each.

A factory takes a :class:`TableContext` (once per table: sessions, tensors and copies are built here)
and returns a binder; the binder takes a :class:`Cell` (ids and a shared, pre-touched output buffer)
and returns a :class:`~benchmarks.harness.Bound` whose ``call`` is, where possible, a
``functools.partial`` of the framework's own function. Frameworks are imported inside the factories,
so a run without TensorFlow never imports it.

Kinds: ``adapter`` (this library's lookups), ``raw`` (the frameworks' own calls, written as fast as we
know how), ``limit`` (single-thread ``np.copyto`` of a buffer the size of the output: the physical limit).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from benchmarks.config import BenchConfig, TableSpec
from benchmarks.data import prefault
from benchmarks.harness import Bound, Limits
from bridge.table import EmbeddingTable


@dataclass
class TableContext:
    """One table being benchmarked, and objects shared by its variants (built once, dropped after)."""

    spec: TableSpec
    table: EmbeddingTable
    array: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per table, shared by every variant that asks for ``key``."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclass(frozen=True)
class Cell:
    """One measurement point: ids (int64) and the output buffer that ``out=`` variants write into."""

    ids: np.ndarray
    out: np.ndarray


Binder = Callable[[Cell], Bound]


@dataclass(frozen=True)
class Variant:
    """A named way to look rows up, with its framework, kind, thread count and output form."""

    name: str
    framework: str
    kind: str
    threads: int | None
    form: str
    description: str
    make: Callable[[TableContext], Binder]
    requires: tuple[str, ...] = ()
    max_batch: int | None = None
    limits: Limits = Limits()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "framework": self.framework, "kind": self.kind, "threads": self.threads,
                "form": self.form, "description": self.description, "max_batch": self.max_batch,
                "max_samples": self.limits.max_samples}

    def missing(self) -> list[str]:
        """Required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


# --- limit and NumPy -------------------------------------------------------------------------------

def _memcpy(ctx: TableContext) -> Binder:
    def bind(cell: Cell) -> Bound:
        src = np.ones_like(cell.out)
        return Bound(partial(np.copyto, cell.out, src))
    return bind


def _np_take(ctx: TableContext) -> Binder:
    return lambda cell: Bound(partial(np.take, ctx.array, cell.ids, axis=0))


def _np_take_out_clip(ctx: TableContext) -> Binder:
    return lambda cell: Bound(partial(np.take, ctx.array, cell.ids, axis=0, out=cell.out, mode="clip"))


def _fancy_index(ctx: TableContext) -> Binder:
    return lambda cell: Bound(partial(operator.getitem, ctx.array, cell.ids))


# --- torch -----------------------------------------------------------------------------------------

def _torch_weight(ctx: TableContext) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(ctx.array)


def _torch_index_select(threads: int) -> Callable[[TableContext], Binder]:
    def make(ctx: TableContext) -> Binder:
        import torch

        weight = ctx.shared("torch_weight", lambda: _torch_weight(ctx))
        enter = partial(torch.set_num_threads, threads)

        def bind(cell: Cell) -> Bound:
            ids, out = torch.from_numpy(cell.ids), torch.from_numpy(cell.out)
            return Bound(partial(torch.index_select, weight, 0, ids, out=out), enter=enter)
        return bind
    return make


# --- onnxruntime -----------------------------------------------------------------------------------

def gather_model_bytes(dim: int) -> bytes:
    """A bare ``Gather(table, ids, axis=0)`` graph; ``table`` is a ``[1, dim]`` placeholder to override."""
    from onnx import TensorProto, helper

    placeholder = helper.make_tensor("table", TensorProto.FLOAT, [1, dim], np.zeros(dim, np.float32).tobytes(),
                                     raw=True)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], axis=0)], "bench_gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["n", dim])], [placeholder],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return bytes(model.SerializeToString())


def _ort_session(ctx: TableContext, threads: int) -> tuple[Any, Any]:
    """(session, table OrtValue): the table is passed with ``add_initializer`` (no copy); keep both alive."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_numpy(ctx.array)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_initializer("table", value)
    session = ort.InferenceSession(gather_model_bytes(ctx.spec.dim), options, providers=["CPUExecutionProvider"])
    return session, value


def _ort_run(threads: int) -> Callable[[TableContext], Binder]:
    def make(ctx: TableContext) -> Binder:
        session, _ = ctx.shared(f"ort_session_{threads}", lambda: _ort_session(ctx, threads))
        return lambda cell: Bound(partial(session.run, None, {"ids": cell.ids}))
    return make


def _ort_ortvaluevector(threads: int) -> Callable[[TableContext], Binder]:
    def make(ctx: TableContext) -> Binder:
        import onnxruntime as ort

        capi = ort.capi._pybind_state
        session, _ = ctx.shared(f"ort_session_{threads}", lambda: _ort_session(ctx, threads))
        devices = [capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)]
        options = ort.RunOptions()

        def bind(cell: Cell) -> Bound:
            values = (ort.OrtValue.ortvalue_from_numpy(cell.ids), ort.OrtValue.ortvalue_from_numpy(cell.out))
            feeds, fetches = capi.OrtValueVector(), capi.OrtValueVector()
            feeds.push_back(values[0]._ortvalue)
            fetches.push_back(values[1]._ortvalue)
            call = partial(session.run_with_ortvaluevector, options, ["ids"], feeds, ["vectors"], fetches, devices)
            return Bound(call, fetch=partial(_keep, cell.out, values))
        return bind
    return make


def _ort_iobinding(threads: int) -> Callable[[TableContext], Binder]:
    def make(ctx: TableContext) -> Binder:
        import onnxruntime as ort

        session, _ = ctx.shared(f"ort_session_{threads}", lambda: _ort_session(ctx, threads))

        def bind(cell: Cell) -> Bound:
            binding = session.io_binding()
            binding.bind_cpu_input("ids", cell.ids)
            binding.bind_ortvalue_output("vectors", ort.OrtValue.ortvalue_from_numpy(cell.out))
            return Bound(partial(session.run_with_iobinding, binding), fetch=partial(_keep, cell.out, binding))
        return bind
    return make


def _keep(out: np.ndarray, _alive: object) -> np.ndarray:
    """``fetch`` for buffer-writing variants; holding ``_alive`` keeps their OrtValues alive."""
    return out


# --- TensorFlow / Keras / gensim ---------------------------------------------------------------------

def _tf() -> Any:
    from converters.keras_env import import_keras  # quiet: log level set, start-up notices dropped

    return import_keras()[0]


def _tf_table(ctx: TableContext) -> Any:
    """The table as a TensorFlow tensor over the store file's own pages, without a copy.

    DLPack exports only writable arrays, so the table's file is mapped a second time copy-on-write: the
    same page-cache pages as ``ctx.array``, and a write (none is made) would copy its page, never reach the
    file. TensorFlow and Keras thus read the memory every other variant reads. Copying the table instead
    (``tf.constant``, then a Keras variable assigned from it) touched 1.5 GiB of new memory for the 512 MiB
    table, 10-15 s of a quick run on a VM whose first touch of a page is slow. A table that is not a
    memory map (``filename`` unset) is copied.
    """
    tf = _tf()
    filename = getattr(ctx.table.data, "filename", None)
    if filename is None:
        return tf.convert_to_tensor(ctx.array)
    alias = np.load(filename, mmap_mode="c", allow_pickle=False)  # every variant's output is checked anyway
    prefault(alias)  # this mapping's own page-table entries: not faulted in during the timed calls
    return tf.experimental.dlpack.from_dlpack(alias.__dlpack__())


def _tf_embedding_lookup(ctx: TableContext) -> Binder:
    tf = _tf()
    params = ctx.shared("tf_table", lambda: _tf_table(ctx))
    return lambda cell: Bound(partial(tf.nn.embedding_lookup, params, tf.constant(cell.ids)))


def _keras_layer_of(ctx: TableContext) -> Any:
    """A built Keras Embedding layer whose variable starts as :func:`_tf_table` (TensorFlow shares its buffer)."""
    _tf()
    import keras

    params = ctx.shared("tf_table", lambda: _tf_table(ctx))
    layer = keras.layers.Embedding(ctx.spec.rows, ctx.spec.dim,
                                   embeddings_initializer=lambda shape, dtype=None: params)
    layer.build((None,))
    return layer


def _keras_call(ctx: TableContext) -> Binder:
    tf = _tf()
    layer = ctx.shared("keras_layer", lambda: _keras_layer_of(ctx))
    return lambda cell: Bound(partial(layer, tf.constant(cell.ids)))


def _keras_predict(ctx: TableContext) -> Binder:
    _tf()
    import keras

    def build() -> Any:
        layer = ctx.shared("keras_layer", lambda: _keras_layer_of(ctx))
        inputs = keras.Input(shape=(), dtype="int64")
        return keras.Model(inputs, layer(inputs))

    model = ctx.shared("keras_model", build)
    return lambda cell: Bound(partial(model.predict, cell.ids, batch_size=len(cell.ids), verbose=0))


def _gensim_ids(ctx: TableContext) -> Binder:
    from gensim.models import KeyedVectors

    def build() -> Any:
        kv = KeyedVectors(vector_size=ctx.spec.dim, count=0, dtype=np.float32)
        kv.vectors = ctx.array
        kv.index_to_key = list(range(ctx.spec.rows))
        kv.key_to_index = {i: i for i in range(ctx.spec.rows)}
        return kv

    kv = ctx.shared("gensim_kv", build)
    return lambda cell: Bound(partial(kv.__getitem__, cell.ids.tolist()))


# --- the bridge adapters ------------------------------------------------------------------------------

def _adapter(backend: str, threads: int, form: str, policy: str = "error") -> Callable[[TableContext], Binder]:
    def make(ctx: TableContext) -> Binder:
        from bridge.backends import lookup

        lk = lookup(ctx.table, backend, policy, threads=threads)
        enter = None
        if backend == "torch":  # torch threads are process-global: the caller sets them (see the adapter)
            import torch

            enter = partial(torch.set_num_threads, threads)

        def bind(cell: Cell) -> Bound:
            call = partial(lk, cell.ids, out=cell.out) if form == "out" else partial(lk, cell.ids)
            return Bound(call, enter=enter)
        return bind
    return make


def _numpy_path() -> str:
    """How this process's numpy adapter gathers: the C kernel, or np.take after the policy's check."""
    from bridge.backends.numpy import KERNEL

    return "C kernel bridge._kernels.take_rows" if KERNEL is not None else "np.take after the policy's id check"


def catalogue(cfg: BenchConfig) -> list[Variant]:
    """Every variant a run can time, in round-robin order."""
    keras_cap, gensim_cap = cfg.keras_max_batch, cfg.gensim_max_batch
    numpy_path = _numpy_path()
    v = Variant
    items = [
        v("memcpy", "memory", "limit", 1, "out", "np.copyto of a buffer the size of the output", _memcpy),
        v("np.take", "numpy", "raw", 1, "alloc", "np.take(table, ids, axis=0)", _np_take),
        v("np.take(out,clip)", "numpy", "raw", 1, "out", 'np.take(table, ids, axis=0, out=out, mode="clip")',
          _np_take_out_clip),
        v("table[ids]", "numpy", "raw", 1, "alloc", "table[ids] (fancy indexing)", _fancy_index),
        v("bridge.numpy", "numpy", "adapter", 1, "alloc", f"lookup(ids); {numpy_path}",
          _adapter("numpy", 1, "alloc")),
        v("bridge.numpy(out)", "numpy", "adapter", 1, "out", f"lookup(ids, out=out); {numpy_path}",
          _adapter("numpy", 1, "out")),
    ]
    for t in (1, 2):
        items.append(v(f"torch.index_select(out)@{t}t", "torch", "raw", t, "out",
                       f"torch.index_select(weight, 0, ids, out=out), {t} thread(s)", _torch_index_select(t),
                       ("torch",)))
    items.append(v("bridge.torch@1t", "torch", "adapter", 1, "alloc", "lookup(ids), 1 torch thread",
                   _adapter("torch", 1, "alloc"), ("torch",)))
    for t in (1, 2):
        items.append(v(f"bridge.torch(out)@{t}t", "torch", "adapter", t, "out", f"lookup(ids, out=out), {t} torch "
                       "thread(s)", _adapter("torch", t, "out"), ("torch",)))
    for t in (1, 2):
        items += [
            v(f"ort.run@{t}t", "onnxruntime", "raw", t, "alloc", f"session.run on a bare Gather, {t} thread(s)",
              _ort_run(t), ("onnxruntime",)),
            v(f"ort.ortvaluevector(out)@{t}t", "onnxruntime", "raw", t, "out",
              f"run_with_ortvaluevector into a preallocated output, {t} thread(s)", _ort_ortvaluevector(t),
              ("onnxruntime",)),
        ]
    items += [
        v("ort.iobinding(out)@1t", "onnxruntime", "raw", 1, "out", "run_with_iobinding into a preallocated output",
          _ort_iobinding(1), ("onnxruntime",)),
        v("bridge.onnxruntime@1t", "onnxruntime", "adapter", 1, "alloc", "lookup(ids), 1 intra-op thread",
          _adapter("onnxruntime", 1, "alloc"), ("onnxruntime",)),
    ]
    for t in (1, 2):
        items.append(v(f"bridge.onnxruntime(out)@{t}t", "onnxruntime", "adapter", t, "out",
                       f"lookup(ids, out=out), {t} intra-op thread(s)", _adapter("onnxruntime", t, "out"),
                       ("onnxruntime",)))
    for t in (1, 2):  # Gather's own rule is the wrap policy: no id check of the adapter's for large batches
        items.append(v(f"bridge.onnxruntime(out,wrap)@{t}t", "onnxruntime", "adapter", t, "out",
                       f"lookup(ids, out=out) under policy 'wrap', {t} intra-op thread(s)",
                       _adapter("onnxruntime", t, "out", "wrap"), ("onnxruntime",)))
    if cfg.tensorflow:
        items += [
            v("tf.nn.embedding_lookup", "tensorflow", "raw", None, "alloc", "eager tf.nn.embedding_lookup",
              _tf_embedding_lookup, ("tensorflow",)),
            v("keras.Embedding()", "keras", "raw", None, "alloc", "Keras Embedding layer call (eager)",
              _keras_call, ("tensorflow", "keras"), keras_cap, Limits(5)),
            v("keras.predict", "keras", "raw", None, "alloc", "model.predict(ids, batch_size=len(ids))",
              _keras_predict, ("tensorflow", "keras"), keras_cap, Limits(3)),
        ]
    if cfg.gensim:
        items.append(v("gensim.kv[ids]", "gensim", "raw", 1, "alloc", "KeyedVectors[list of int keys]", _gensim_ids,
                       ("gensim",), gensim_cap, Limits(5)))
    return [x for x in items if _selected(x.name, cfg.variants)]


def _selected(name: str, patterns: tuple[str, ...]) -> bool:
    """Always keep the references (np.take, memcpy); otherwise match any pattern (all if none)."""
    if not patterns or name in ("np.take", "memcpy"):
        return True
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
