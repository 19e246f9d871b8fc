"""onnxruntime backend: a one-node Gather graph run over the table's own memory.

The graph declares the table as a ``[1, dim]`` placeholder initializer;
``SessionOptions.add_initializer`` overrides it with an OrtValue that wraps ``table.data`` (also a
read-only memory map) without a copy. That OrtValue must outlive the session, or session creation and
runs read freed memory: the lookup keeps it in ``self._table_value`` next to ``self.session``.

Each call runs ``run_with_ortvaluevector`` with OrtValues bound to NumPy buffers, so onnxruntime writes
straight into the output (``session.run`` allocates and costs 7.5 us at batch 1). The lookup binds the
session's own ``_sess.run_with_ortvaluevector``: ``InferenceSession``'s wrapper only adds a WebGPU
graph-capture check, which a CPU session never needs, and costs 0.4 us a call; the start-up self-check
(:meth:`OnnxruntimeLookup._probe`) still proves that onnxruntime writes into the bound buffers. Large
batches bind the caller's ids and output directly; without ``out=`` that output is new on every call,
and its fresh pages cost about as much as the gather itself (pass a reused ``out=`` for large batches).
Small batches (at most ``SMALL_BYTES`` of output) reuse per-thread buffers whose OrtValues are built
once per ids shape (:class:`~bridge.backends.base.ThreadBuffers`): wrapping two arrays as OrtValues
costs more than copying a few rows in and out; without ``out=`` the result is a copy of the staged
rows. Sessions run ``threads`` intra-op threads, which keep spinning a while after each run (see
:func:`_options`).

onnxruntime's CPU Gather serves bfloat16; its OrtValues are built over the uint16 bit pattern with
``ortvalue_from_numpy_with_onnx_type``. A quantized table runs the dequantizing graph of
:mod:`bridge.backends.ort_dequant` instead of the one-node Gather, through the same fast path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from bridge.backends.base import StagedLookup, ThreadBuffers, contiguous_data, require
from bridge.backends.ort_dequant import dequant_model
from bridge.errors import BackendError

# table dtype name -> (ONNX element type, dtype the OrtValue is built from)
_DTYPES: dict[str, tuple[int, str]] = {
    "float16": (TensorProto.FLOAT16, "float16"),
    "float32": (TensorProto.FLOAT, "float32"),
    "float64": (TensorProto.DOUBLE, "float64"),
    "bfloat16": (TensorProto.BFLOAT16, "uint16"),
    "int8": (TensorProto.INT8, "int8"),
    "uint8": (TensorProto.UINT8, "uint8"),
    "int16": (TensorProto.INT16, "int16"),
    "int32": (TensorProto.INT32, "int32"),
    "int64": (TensorProto.INT64, "int64"),
}
TABLE, IDS, VECTORS = "table", "ids", "vectors"
_INT64 = int(TensorProto.INT64)


def gather_model(elem_type: int, dim: int, itemsize: int) -> onnx.ModelProto:
    """``vectors = Gather(table, ids, axis=0)`` with a zero ``[1, dim]`` placeholder for ``table``."""
    placeholder = helper.make_tensor(TABLE, elem_type, [1, dim], bytes(itemsize * dim), raw=True)
    graph = helper.make_graph(
        [helper.make_node("Gather", [TABLE, IDS], [VECTORS], axis=0)],
        "embedding_bridge_gather",
        [helper.make_tensor_value_info(IDS, TensorProto.INT64, None)],
        [helper.make_tensor_value_info(VECTORS, elem_type, None)],
        [placeholder],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _options(ort: Any, threads: int) -> Any:
    """Session options of both graphs: ``threads`` intra-op threads, one inter-op thread, quiet logs.

    The intra-op pool keeps onnxruntime's default, spinning: with ``threads`` > 1 its threads spin for
    30-60 ms after each run, holding the second core. Making them sleep instead
    (``session.intra_op.allow_spinning`` = 0, or ``session.force_spinning_stop``) was measured here
    (2 threads, 10,000 x 64 table) and costs latency on every call: 1,024 ids 47 us instead of 28 us,
    65,536 ids 1.3-1.7x the spinning time, so it is not set. One thread (the default) has no pool.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxruntimeLookup(StagedLookup):
    """Gathers with an onnxruntime session (CPU, ``threads`` intra-op threads) into the output buffer."""

    backend: ClassVar[str] = "onnxruntime"
    framework: ClassVar[str | None] = "onnxruntime"
    extra: ClassVar[str | None] = None  # onnxruntime is a core dependency

    def _setup(self, threads: int) -> None:
        ort = require("onnxruntime", backend=self.backend, extra=self.extra)
        elem, carrier = self._dtype_entry(_DTYPES)
        self._elem = int(elem)  # of the output (the table itself, unless it is quantized)
        self._carrier = np.dtype(carrier)
        self._same = self._carrier == self.dtype
        if self.table.quantization is not None:
            self.session = self._quantized_session(ort, threads)
        else:
            data = contiguous_data(self.table, self.backend).view(self._carrier)
            self._table_value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(data, self._elem)  # keep alive
            self.session = ort.InferenceSession(
                gather_model(self._elem, self.table.dim, self.dtype.itemsize).SerializeToString(),
                self._session_options(ort, threads),
                providers=["CPUExecutionProvider"],
            )
        self._bind_fast_path(ort)
        self._probe()
        if self.policy == "wrap" and self.table.quantization is None and self._gatherable:
            # Gather applies the wrap policy itself: see _gather_or_refuse
            self._unchecked_from = self._direct_from

    def _quantized_session(self, ort: Any, threads: int) -> Any:
        """A session running :func:`bridge.backends.ort_dequant.dequant_model` over the table's own memory.

        Graph optimizations are off: the graph is a handful of nodes, and nothing may fold or fuse
        the arithmetic (or a placeholder) before the overriding initializers are in place.
        """
        quant = self.table.quantization
        assert quant is not None
        model, arrays = dequant_model(quant, contiguous_data(self.table, self.backend))
        options = _options(ort, threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._param_values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
        for name, value in zip(arrays, self._param_values, strict=True):  # the OrtValues must outlive the session
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(
                f"onnxruntime cannot serve quantized table {self.table.name!r} ({quant.scheme}, "
                f"{quant.out_dtype}): {exc}; use backend='numpy' or 'torch'"
            ) from exc

    def _session_options(self, ort: Any, threads: int) -> Any:
        options = _options(ort, threads)
        options.add_initializer(TABLE, self._table_value)
        return options

    def _bind_fast_path(self, ort: Any) -> None:
        capi = ort.capi._pybind_state  # OrtValueVector and the raw OrtValue factories live only here
        device = capi.OrtDevice(capi.OrtDevice.cpu(), capi.OrtDevice.default_memory(), 0)
        self._vector = capi.OrtValueVector
        self._value = capi.OrtValue.ortvalue_from_numpy_with_onnx_type  # no copy, explicit ONNX type
        self._devices = [device]
        self._feed_names, self._fetch_names = [IDS], [VECTORS]
        self._run_options = ort.RunOptions()  # read-only during runs: shared by all calls and threads
        self._run_options.log_severity_level = 4  # a failed run raises its message; no second copy on stderr
        # the session's own method; InferenceSession's wrapper adds a WebGPU graph-capture check (0.4 us)
        self._run = getattr(self.session, "_sess", self.session).run_with_ortvaluevector
        self._ort_value = ort.OrtValue
        self._ort_version = ort.__version__
        self._staging = ThreadBuffers(self._bind)
        self._row_bytes = max(1, self.table.dim * self.dtype.itemsize)

    def _probe(self) -> None:
        """Check once, on both paths, that onnxruntime writes into the bound output buffer."""
        if not self._gatherable:
            return
        first = np.asarray(self.table.data[:1])
        if self.table.quantization is not None:
            first = self.table.quantization.dequantize_rows(first, np.zeros(1, np.int64))
        for n in (1, self._direct_from):
            out = np.empty((n, self.table.dim), self.dtype)
            out.view(np.uint8)[...] = 0xA5
            self._gather(np.zeros(n, np.int64), out)
            got = out[-1:].tobytes()
            if got != first.tobytes():
                raise self._probe_error(got == b"\xa5" * len(got))

    def _probe_error(self, unwritten: bool) -> BackendError:
        """The start-up check's failure: onnxruntime wrote nothing, or a row 0 that differs from NumPy's."""
        quant = self.table.quantization
        if quant is not None and not unwritten:  # the arithmetic differs: no backend is known to be right
            return BackendError(
                f"onnxruntime {self._ort_version} dequantizes row 0 of table {self.table.name!r} ({quant.scheme}, "
                f"{quant.out_dtype}) differently from NumPy, so this table cannot be served exactly on every "
                "backend; check each backend against the model (embridge parity --onnx) before using any of them"
            )
        what = "did not write row 0 into the bound output buffer" if unwritten else \
            "wrote a row 0 that differs from NumPy's"
        return BackendError(
            f"onnxruntime {self._ort_version} {what}; use backend='numpy' or 'torch', or onnxruntime 1.31"
        )

    def _gather_direct(self, ids: np.ndarray, out: np.ndarray) -> None:
        ids64 = np.ascontiguousarray(ids, dtype=np.int64)  # >= 1-D; named: ORT reads it during the run
        dst = out if self._same else out.view(self._carrier)
        feeds = self._vector()
        feeds.push_back(self._value(ids64, _INT64))
        fetches = self._vector()
        fetches.push_back(self._value(dst.reshape(1, -1) if ids.ndim == 0 else dst, self._elem))
        self._run(self._run_options, self._feed_names, feeds, self._fetch_names, fetches, self._devices)

    def _gather_or_refuse(self, ids: np.ndarray, out: np.ndarray) -> bool:
        """Under the ``wrap`` policy only: onnxruntime's Gather is that policy.

        It refuses every id outside ``[-rows, rows)`` (``InvalidArgument``) in a pass of its own before it
        writes a row, and serves row ``id + rows`` for a negative id: the policy's pass over the ids would
        repeat that work (3-5% of a call at 65,536 ids from a cached table, measured here). The other
        policies refuse or map negative ids, so they keep that pass. Any failed run counts as a refusal: the
        general path then raises the :class:`IdError`, or runs again and raises onnxruntime's own error.
        """
        try:
            self._gather_large(ids, out)
        except Exception:  # noqa: BLE001 - onnxruntime's exception types differ by version; see above
            return False
        return True

    def _stage(self, ids: np.ndarray) -> np.ndarray:
        ids_buf, out_buf, feeds, fetches = self._staging.get(ids.shape)
        ids_buf[...] = ids
        self._run(self._run_options, self._feed_names, feeds, self._fetch_names, fetches, self._devices)
        return out_buf

    def _bind(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Any, Any]:
        """Staging buffers for ``shape`` and the OrtValues over them (kept together: they share memory)."""
        ids_buf = np.zeros(shape, np.int64)
        out_buf = np.empty(shape + (self.table.dim,), self._carrier)
        out_buf.view(np.uint8)[...] = 0xA5  # not zeros: the start-up probe must see onnxruntime write row 0
        feeds = self._vector()
        feeds.push_back(self._value(ids_buf, _INT64))
        fetches = self._vector()
        fetches.push_back(self._value(out_buf, self._elem))
        return ids_buf, out_buf, feeds, fetches

    def _wrap(self, out: np.ndarray) -> Any:
        bits = out if self._same else out.view(self._carrier)
        return self._ort_value.ortvalue_from_numpy_with_onnx_type(bits, self._elem)
