"""float16, bfloat16 and mixed-precision Keras models: typing, metadata and parity references.

* tf2onnx 1.17 maps TensorFlow's ``bfloat16`` to ONNX ``FLOAT16`` for every node type (constants
  keep their real type): under ``mixed_bfloat16`` the Cast of an activation to bfloat16 becomes a
  Cast to float16 and onnxruntime rejects the model (``MatMul bound to different types``).
  :func:`bfloat16_typing` corrects the mapping while tf2onnx runs; :func:`bridge.onnx_bf16.upcast_bfloat16`
  then makes the bfloat16 arithmetic runnable on onnxruntime's CPU provider.
* Under a mixed policy (``mixed_float16``, ``mixed_bfloat16``) an Embedding's table is float32 and
  Keras casts the looked-up rows: the layer serves ``cast(table[id], compute_dtype)``. The store keeps
  the float32 table (what the ONNX model holds); :func:`compute_dtype_metadata` records the cast and
  :func:`cast_comparisons` proves, bit for bit, that Keras's output is that cast of every backend's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from bridge.backends import lookup
from bridge.errors import BridgeError
from bridge.parity import Comparison, LookupFn, parity_ids, reference_lookup, table_parity
from bridge.store import Store

#: Metadata keys written on a table whose Keras layer casts the rows it looks up.
COMPUTE_DTYPE, DTYPE_POLICY = "keras_compute_dtype", "keras_dtype_policy"
_FLOATS = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


@contextlib.contextmanager
def bfloat16_typing() -> Iterator[None]:
    """Within the block, tf2onnx types TensorFlow bfloat16 values as ONNX BFLOAT16 (not FLOAT16).

    tf2onnx reads the mapping from one dict, ``tf2onnx.tf_utils.TF_TO_ONNX_DTYPE``; it is restored on exit.
    """
    from onnx import TensorProto
    from tensorflow.core.framework import types_pb2
    from tf2onnx import tf_utils

    table = tf_utils.TF_TO_ONNX_DTYPE
    saved = table.get(types_pb2.DT_BFLOAT16)
    table[types_pb2.DT_BFLOAT16] = TensorProto.BFLOAT16
    try:
        yield
    finally:
        if saved is None:
            table.pop(types_pb2.DT_BFLOAT16, None)
        else:
            table[types_pb2.DT_BFLOAT16] = saved


def _policy_name(layer: Any) -> str:
    policy = getattr(layer, "dtype_policy", None)
    return str(getattr(policy, "name", policy) or "")


def compute_dtype_metadata(layers: Sequence[Any], table_dtype: np.dtype[Any]) -> dict[str, str]:
    """``{keras_compute_dtype, keras_dtype_policy}`` when the layers cast their float table's rows, else ``{}``.

    A quantized layer (``quantization_mode``) dequantizes rather than casts and is left out.
    """
    for layer in layers:
        if getattr(layer, "quantization_mode", None):
            continue
        compute = str(getattr(layer, "compute_dtype", "") or "")
        if compute in _FLOATS and np.dtype(table_dtype).kind == "f" and _FLOATS[compute] != np.dtype(table_dtype):
            return {COMPUTE_DTYPE: compute, DTYPE_POLICY: _policy_name(layer)}
    return {}


#: Metadata key on a table that holds its Keras weight already cast to the compute dtype (see below).
VARIABLE_DTYPE = "keras_variable_dtype"


def folded_cast_metadata(layers: Sequence[Any], table_dtype: np.dtype[Any]) -> dict[str, str]:
    """``{keras_variable_dtype, keras_dtype_policy}`` when the table is the layers' weight cast to their compute dtype.

    A mixed-precision model loaded from a file runs its layers in its own autocast scope: the Embedding
    reads its float32 weight cast to float16 (the whole table) and then gathers, and tf2onnx folds that
    cast into the constant. The ONNX model then holds a float16 table, which is also what Keras serves.
    """
    for layer in layers:
        variable = str(getattr(layer, "variable_dtype", "") or "")
        compute = str(getattr(layer, "compute_dtype", "") or "")
        if variable in _FLOATS and compute == np.dtype(table_dtype).name and _FLOATS[variable] != _FLOATS[compute]:
            return {VARIABLE_DTYPE: variable, DTYPE_POLICY: _policy_name(layer)}
    return {}


def folded_cast_warning(name: str, table_dtype: np.dtype[Any], meta: dict[str, str]) -> str:
    """The conversion warning for a table that holds the Keras weight cast to the compute dtype."""
    dtype = np.dtype(table_dtype).name
    return (f"table {name!r} is the Keras weight ({meta[VARIABLE_DTYPE]}) cast to {dtype}: the model, loaded from a "
            f"file, casts the whole table before its lookup (dtype policy {meta.get(DTYPE_POLICY) or '?'}) and "
            f"tf2onnx folded that cast into the ONNX constant; the store serves these {dtype} rows, which Keras and "
            f"the ONNX model serve too (the {meta[VARIABLE_DTYPE]} weights stay in the Keras model)")


def cast_warning(name: str, table_dtype: np.dtype[Any], meta: dict[str, str]) -> str:
    """The conversion warning for a table whose Keras layer casts after the lookup."""
    compute = meta[COMPUTE_DTYPE]
    return (f"table {name!r} is stored as {np.dtype(table_dtype).name} (the layer's weight, as in the ONNX model); "
            f"Keras (dtype policy {meta.get(DTYPE_POLICY) or '?'}) serves cast(table[id], {compute}): the adapters "
            f"serve the {np.dtype(table_dtype).name} rows; cast them to {compute} for Keras's vectors bit for bit")


def cast_lookup(fn: LookupFn, dtype: np.dtype[Any]) -> LookupFn:
    """``ids -> fn(ids).astype(dtype)`` (NumPy and ml_dtypes round to nearest even, as TensorFlow's Cast does)."""

    def run(ids: np.ndarray) -> np.ndarray:
        return np.asarray(fn(ids)).astype(dtype)

    return run


def cast_comparisons(
    store: Store,
    keras_fns: dict[str, dict[str, LookupFn]],
    backends: Sequence[str],
    policy: str = "error",
) -> list[Comparison]:
    """For each table with :data:`COMPUTE_DTYPE`: Keras's layer output and every backend's rows cast to the
    compute dtype, against ``numpy.take`` cast the same way; bitwise.

    ``keras_fns`` maps a reference label (``"keras"``) to ``{table: layer(ids)}``.
    """
    rows: list[Comparison] = []
    for name in store:
        table = store[name]
        compute = table.metadata.get(COMPUTE_DTYPE)
        if compute not in _FLOATS:
            continue
        dtype = _FLOATS[compute]
        reference = (f"numpy.take->{compute}", cast_lookup(reference_lookup(table, policy), dtype))
        candidates: dict[str, LookupFn] = {f"{label}": fns[name] for label, fns in keras_fns.items() if name in fns}
        for backend in backends:
            try:
                candidates[f"{backend}->{compute}"] = cast_lookup(lookup(table, backend, policy), dtype)
            except BridgeError:
                continue  # the ordinary parity rows already report an unavailable backend
        report = table_parity(table, (), policy, reference, extra_references=candidates,
                              ids=parity_ids(table.rows, policy))
        rows.extend(report.comparisons)
    return rows


def split_cast_tables(
    refs: dict[str, dict[str, LookupFn]], store: Store,
) -> tuple[dict[str, dict[str, LookupFn]], dict[str, dict[str, LookupFn]]]:
    """``(plain, cast)``: Keras references of tables without and with :data:`COMPUTE_DTYPE`."""
    plain: dict[str, dict[str, LookupFn]] = {}
    cast: dict[str, dict[str, LookupFn]] = {}
    for label, fns in refs.items():
        for name, fn in fns.items():
            target = cast if store[name].metadata.get(COMPUTE_DTYPE) in _FLOATS else plain
            target.setdefault(label, {})[name] = fn
    return plain, cast

