"""Parity references from Keras itself: each Embedding layer called on the parity ids, and the
whole Keras model against the converted ONNX model on sample inputs.

Keras is the source of truth for a converted model, so these rows say "what Keras serves";
:mod:`bridge.store_parity` adds every backend and the ONNX model's own Gathers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import InputError, ParityError
from bridge.parity import DEFAULT_BACKENDS, Comparison, LookupFn, ParityReport, compare
from bridge.store import Store, open_store
from bridge.store_parity import store_parity
from converters.keras_env import to_numpy
from converters.keras_layers import embedding_layers, iter_layers
from converters.keras_load import load
from converters.keras_onnx import output_names
from converters.keras_precision import cast_comparisons, split_cast_tables

#: Keras serves ids in [0, rows) and wraps [-rows, -1]; other policies have no Keras counterpart.
KERAS_POLICIES = ("error", "wrap")
#: Whole-model outputs pass through arithmetic after the lookup (pooling, Dense): compared with a tolerance.
MODEL_ATOL, MODEL_RTOL = 1e-5, 1e-4
#: ... scaled to the output's precision: a float16/bfloat16 model rounds every intermediate result, and
#: onnxruntime computes bfloat16 arithmetic in float32 (:mod:`bridge.onnx_bf16`); a few units in the last place.
#: The tolerance follows the least precise float any layer computes in (or the output's dtype).
MODEL_TOLERANCES = {"float16": (2e-3, 8e-3), "bfloat16": (1.6e-2, 6.3e-2)}


def model_tolerance(model: Any, output_dtype: np.dtype[Any]) -> tuple[float, float]:
    """``(atol, rtol)`` for a whole-model output: :data:`MODEL_TOLERANCES` of the least precise compute dtype."""
    dtypes = {np.dtype(output_dtype).name}
    if hasattr(model, "layers"):
        dtypes |= {str(getattr(e.layer, "compute_dtype", "")) for e in iter_layers(model)}
    for name in ("bfloat16", "float16"):
        if name in dtypes:
            return MODEL_TOLERANCES[name]
    return MODEL_ATOL, MODEL_RTOL


def _layer_fn(layer: Any) -> LookupFn:
    def run(ids: np.ndarray) -> np.ndarray:
        return to_numpy(layer(np.asarray(ids)))

    return run


class KerasReferences:
    """A reference factory: ``refs(store) -> {"keras": {table: layer(ids)}}`` from the manifest's Keras sources.

    A table with several source layers (twin layers merged by tf2onnx) gets one reference per
    layer, named ``keras:<layer path>``. Tables whose layer casts its rows (a mixed-precision
    policy, ``keras_compute_dtype`` in the metadata) are left out of ``refs(store)``: Keras serves
    another dtype than the table's, so :meth:`cast_comparisons` compares them through the cast.
    """

    def __init__(self, model: Any) -> None:
        self.layers = embedding_layers(model)

    def all(self, store: Store) -> dict[str, dict[str, LookupFn]]:
        """Every Keras reference, cast tables included."""
        refs: dict[str, dict[str, LookupFn]] = {}
        for name in store:
            sources = [s for s in store[name].sources if s.framework == "keras" and s.layer in self.layers]
            for source in sources:
                label = "keras" if len(sources) == 1 else f"keras:{source.layer}"
                refs.setdefault(label, {})[name] = _layer_fn(self.layers[source.layer])
        return refs

    def __call__(self, store: Store) -> dict[str, dict[str, LookupFn]]:
        return split_cast_tables(self.all(store), store)[0]

    def cast(self, store: Store) -> dict[str, dict[str, LookupFn]]:
        """The references of tables whose layer casts after the lookup."""
        return split_cast_tables(self.all(store), store)[1]

    def cast_comparisons(self, store: str | os.PathLike[str] | Store,
                         backends: Sequence[str] = DEFAULT_BACKENDS, policy: str = "error") -> list[Comparison]:
        """Keras and every backend through the cast, bitwise (:func:`converters.keras_precision.cast_comparisons`)."""
        opened = store if isinstance(store, Store) else open_store(store, verify=False)
        return cast_comparisons(opened, self.cast(opened), backends, policy)


def layer_references(model: Any) -> KerasReferences:
    """:class:`KerasReferences` of ``model``'s Embedding layers."""
    return KerasReferences(model)


def keras_layer_references(path: str | os.PathLike[str], *, safe_mode: bool = True) -> KerasReferences:
    """:func:`layer_references` for a model file (``.keras`` / ``.h5``, loaded with ``safe_mode``)."""
    loaded = load(Path(path), safe_mode=safe_mode)
    if loaded.kind == "saved_model":
        raise InputError("a SavedModel has no Keras layers to call; pass the .keras or .h5 file to --keras")
    return layer_references(loaded.model)


def sample_inputs(model: Any, store: Store, seed: int = 0, batch: int = 3, length: int = 7) -> dict[str, np.ndarray]:
    """Inputs for a whole-model comparison: valid ids, vocabulary tokens, or normal floats."""
    rng = np.random.default_rng(seed)
    rows = min((store[n].rows for n in store), default=1)
    tokens = next((vocab.tokens for vocab in (store[n].vocab for n in store) if vocab is not None), None)
    out = {}
    for tensor in model.inputs:
        shape = tuple(batch if i == 0 else (d or length) for i, d in enumerate(tensor.shape))
        dtype = str(getattr(tensor.dtype, "name", tensor.dtype))
        if dtype == "string":
            if tokens is None:
                raise InputError(f"input {tensor.name!r} takes strings but no table has a vocabulary")
            out[tensor.name] = rng.choice(np.array(tokens, dtype=object), size=shape)
        elif dtype.startswith(("int", "uint")):
            out[tensor.name] = rng.integers(0, rows, size=shape).astype(dtype)
        else:
            out[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return out


def model_comparisons(model: Any, onnx_path: Path, inputs: Mapping[str, np.ndarray]) -> list[Comparison]:
    """Keras model vs the ONNX model in onnxruntime, one row per output, with :func:`model_tolerance`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    feeds = {name: _ort_feed(value) for name, value in zip(feed_names, inputs.values(), strict=True)}
    got = session.run(None, feeds)
    raw = model([_keras_feed(v) for v in inputs.values()] if len(inputs) > 1
                else _keras_feed(next(iter(inputs.values()))))
    # the converter named each ONNX output like this (tf2onnx then orders outputs by name): pair by name
    expected = output_names(model, raw, set(feed_names) | {str(getattr(model, "name", "model"))})
    rows = []
    for out, cand in zip(session.get_outputs(), got, strict=True):
        if out.name not in expected:
            raise ParityError(f"the ONNX model's output {out.name!r} has no Keras counterpart "
                              f"(Keras outputs: {', '.join(expected)}); convert the model again")
        ref_np = to_numpy(expected[out.name])
        atol, rtol = model_tolerance(model, ref_np.dtype)
        flat_ids = np.arange(ref_np.reshape(-1, ref_np.shape[-1]).shape[0]) if ref_np.ndim else np.zeros(1, np.int64)
        rows.append(compare(ref_np.reshape(len(flat_ids), -1), np.asarray(cand).reshape(len(flat_ids), -1), flat_ids,
                            atol=atol, rtol=rtol, table="(whole model)", backend="onnx-model",
                            reference_name="keras", case=f"output {out.name}"))
    return rows


def _ort_feed(value: np.ndarray) -> np.ndarray:
    return value.astype(str) if value.dtype == object else value


def _keras_feed(value: np.ndarray) -> Any:
    if value.dtype == object:
        import tensorflow as tf

        return tf.constant(value.astype(str))
    return value


def conversion_parity(result: Any, *, backends: tuple[str, ...] = ("numpy", "onnxruntime", "torch"),
                      inputs: Mapping[str, np.ndarray] | None = None) -> ParityReport:
    """Parity of a :class:`converters.keras.ConversionResult`: every table on every backend, the ONNX
    model's own Gathers and the Keras layers (bitwise), and the whole model Keras vs ONNX (tolerance)."""
    model = result.keras_model
    keras_refs = layer_references(model) if model is not None and hasattr(model, "layers") else None
    report = store_parity(result.store, backends=backends, onnx_model=result.onnx_path,
                          extra_references=keras_refs, verify=False)
    if keras_refs is not None:
        report.extend(cast_comparisons(result.store, keras_refs.cast(result.store), backends))
        feed = inputs if inputs is not None else sample_inputs(model, result.store)
        report.extend(model_comparisons(model, result.onnx_path, feed))
    return report
