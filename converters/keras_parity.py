"""Parity references from Keras itself: each Embedding layer called on the parity ids, and the
whole Keras model against the converted ONNX model on sample inputs.

Keras is the source of truth for a converted model, so these rows say "what Keras serves";
:mod:`bridge.store_parity` adds every backend and the ONNX model's own Gathers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import InputError, ParityError
from bridge.parity import DEFAULT_BACKENDS, Comparison, LookupFn, ParityReport, compare
from bridge.store import Store, open_store
from bridge.store_parity import store_parity
from converters.keras_env import to_numpy
from converters.keras_layers import embedding_layers, iter_layers, node_tensors
from converters.keras_load import load
from converters.keras_onnx import output_names
from converters.keras_precision import cast_comparisons, split_cast_tables
from converters.keras_signature import DICT, LIST, InputSpec, Signature, derive_signature

#: Keras serves ids in [0, rows) and wraps [-rows, -1]; other policies have no Keras counterpart.
KERAS_POLICIES = ("error", "wrap")
#: Whole-model outputs pass through arithmetic after the lookup (pooling, Dense): compared with a tolerance.
MODEL_ATOL, MODEL_RTOL = 1e-5, 1e-4
#: ... scaled to the output's precision: a float16/bfloat16 model rounds every intermediate result, and
#: onnxruntime computes bfloat16 arithmetic in float32 (:mod:`bridge.onnx_bf16`); a few units in the last place.
#: The tolerance follows the least precise float any layer computes in (or the output's dtype).
MODEL_TOLERANCES = {"float16": (2e-3, 8e-3), "bfloat16": (1.6e-2, 6.3e-2)}
#: The ``table`` of whole-model rows, and the ``case`` of the row saying the check could not run.
WHOLE_MODEL, SKIPPED = "(whole model)", "skipped"
_ORT_DTYPES = {"float": "float32", "double": "float64"}
_SUFFIX = re.compile(r":\d+$")  # tf2onnx's tensor-name suffix
#: onnxruntime's message head (its code, the model's path): dropped so that the reason comes first.
_ORT_MESSAGE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : (?:Load model from .*? failed: ?)?")
_log = logging.getLogger(__name__)


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


def conversion_signature(result: Any) -> Signature:
    """The input signature ``result`` was converted with (its provenance), else the one derived from its model.

    The signature's names are the ONNX model's input names, and its structure says how the Keras
    model is called (one tensor, a list, a dict); a subclassed model has no other source of either.
    """
    recorded = (getattr(result, "provenance", None) or {}).get("signature")
    if not recorded:
        return derive_signature(result.keras_model)
    specs = tuple(InputSpec(str(s["name"]), tuple(s["shape"]), str(s["dtype"])) for s in recorded["inputs"])
    return Signature(specs, str(recorded["structure"]))


def keras_inputs(model: Any, signature: Signature) -> dict[str, Any]:
    """``{signature name: the model's symbolic input}`` as the model is called with ``signature``; ``{}``
    for a model without symbolic inputs (subclassed). A dict input pairs by key, a list by its position."""
    struct = _symbolic_inputs(model)
    if isinstance(struct, Mapping):
        return {str(k): t for k, t in struct.items() if str(k) in signature.names}
    tensors = list(struct) if isinstance(struct, (list, tuple)) else [] if struct is None else [struct]
    return dict(zip(signature.names, tensors, strict=True)) if len(tensors) == len(signature.names) else {}


def _symbolic_inputs(model: Any) -> Any:
    """``model.input`` (a tensor, list or dict), else ``model.inputs`` (Sequential), else None (subclassed)."""
    for attr in ("input", "inputs"):
        try:
            struct = getattr(model, attr)
        except (AttributeError, ValueError, TypeError):
            continue
        if struct is not None and not (isinstance(struct, (list, tuple)) and not struct):
            return struct
    return None


def sample_inputs(model: Any, store: Store, seed: int = 0, batch: int = 3, length: int = 7, *,
                  signature: Signature | None = None) -> dict[str, np.ndarray]:
    """Inputs for a whole-model comparison by signature (ONNX input) name: valid ids, vocabulary tokens,
    or normal floats. Shapes are the signature's, static dims of the Keras inputs kept; ``signature``
    defaults to the one derived from ``model``."""
    signature = signature or derive_signature(model)
    rng = np.random.default_rng(seed)
    rows = min((store[n].rows for n in store), default=1)
    tokens = next((vocab.tokens for vocab in (store[n].vocab for n in store) if vocab is not None), None)
    symbolic = keras_inputs(model, signature)
    out = {}
    for spec in signature.inputs:
        shape = _sample_shape(spec, symbolic.get(spec.name), batch, length)
        if spec.dtype == "string":
            own = _lookup_tokens(model, symbolic.get(spec.name)) or tokens  # the input's own lookup, if it has one
            if own is None:
                raise InputError(f"input {spec.name!r} takes strings but no table has a vocabulary")
            out[spec.name] = rng.choice(np.array(own, dtype=object), size=shape)
        elif spec.dtype.startswith(("int", "uint")):
            out[spec.name] = rng.integers(0, rows, size=shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def _lookup_tokens(model: Any, tensor: Any) -> list[str] | None:
    """The vocabulary of a ``StringLookup`` reading the Keras input ``tensor`` directly, else None."""
    if tensor is None:
        return None
    for entry in iter_layers(model):
        if type(entry.layer).__name__ == "StringLookup" and hasattr(entry.layer, "get_vocabulary"):
            for node in getattr(entry.layer, "_inbound_nodes", []):
                inputs = node_tensors(node)
                if inputs and inputs[0] is tensor:
                    return [str(t) for t in entry.layer.get_vocabulary()]
    return None


def _sample_shape(spec: InputSpec, tensor: Any, batch: int, length: int) -> tuple[int, ...]:
    """``batch`` first, then the signature's dim, else the Keras input's static dim, else ``length``."""
    known = tuple(getattr(tensor, "shape", None) or ())
    if len(known) != len(spec.shape):
        known = (None,) * len(spec.shape)
    dims = zip(spec.shape, known, strict=True)
    return tuple(batch if i == 0 else int(d or k or length) for i, (d, k) in enumerate(dims))


def model_comparisons(model: Any, onnx_path: Path, inputs: Mapping[str, np.ndarray], *,
                      signature: Signature | None = None) -> list[Comparison]:
    """Keras model vs the ONNX model in onnxruntime, one row per output, with :func:`model_tolerance`.

    ``inputs`` are keyed by the signature's names (or the Keras inputs' names) and fed to both by
    name (:func:`pair_names`); ``signature`` defaults to the one derived from ``model``. When
    onnxruntime cannot load or run the model, one :func:`skipped_comparison` row says why.
    """
    signature = signature or derive_signature(model)
    feeds = _named_feeds(inputs, signature, model)
    session = _ort_session(onnx_path)
    if isinstance(session, str):
        return [_skip(session)]
    onnx_names = pair_names({s.name: s.dtype for s in signature.inputs},
                            {i.name: _ort_dtype(i.type) for i in session.get_inputs()},
                            "the Keras model's inputs", "the ONNX model's")
    got = _ort_run(session, {onnx_names[name]: _ort_feed(value) for name, value in feeds.items()})
    if isinstance(got, str):
        return [_skip(got)]
    raw = _call_keras(model, signature, feeds)
    # the converter named each ONNX output like this (tf2onnx then orders outputs by name): pair by name
    expected = output_names(model, raw, set(signature.names) | {str(getattr(model, "name", "model"))})
    return [_output_row(model, out.name, cand, expected)
            for out, cand in zip(session.get_outputs(), got, strict=True)]


def _output_row(model: Any, name: str, cand: Any, expected: Mapping[str, Any]) -> Comparison:
    """One output, Keras vs onnxruntime, within :func:`model_tolerance`."""
    if name not in expected:
        raise ParityError(f"the ONNX model's output {name!r} has no Keras counterpart "
                          f"(Keras outputs: {', '.join(expected)}); convert the model again")
    ref_np = to_numpy(expected[name])
    atol, rtol = model_tolerance(model, ref_np.dtype)
    flat_ids = np.arange(ref_np.reshape(-1, ref_np.shape[-1]).shape[0]) if ref_np.ndim else np.zeros(1, np.int64)
    return compare(ref_np.reshape(len(flat_ids), -1), np.asarray(cand).reshape(len(flat_ids), -1), flat_ids,
                   atol=atol, rtol=rtol, table=WHOLE_MODEL, backend="onnx-model", reference_name="keras",
                   case=f"output {name}")


def pair_names(wanted: Mapping[str, str], offered: Mapping[str, str], wanted_what: str,
               offered_what: str) -> dict[str, str]:
    """``{wanted name: offered name}`` from ``{name: dtype}`` maps: equal names (a tf2onnx ``:0`` suffix
    ignored), then what counts and dtypes leave unambiguous (the only one of its dtype on both sides,
    or the one left on each side); anything else is a :class:`ParityError`, never a guess by position."""
    bare = {_SUFFIX.sub("", o): o for o in offered}
    pairs = {w: bare[_SUFFIX.sub("", w)] for w in wanted if _SUFFIX.sub("", w) in bare}
    for w, dtype in wanted.items():
        left_w = [x for x in wanted if x not in pairs and wanted[x] == dtype]
        left_o = [o for o in offered if o not in pairs.values() and offered[o] == dtype]
        if w not in pairs and len(left_w) == len(left_o) == 1:
            pairs[w] = left_o[0]
    left_w = [w for w in wanted if w not in pairs]
    left_o = [o for o in offered if o not in pairs.values()]
    if len(left_w) == len(left_o) == 1:
        pairs[left_w[0]] = left_o[0]
    elif left_w or left_o:
        raise ParityError(f"cannot pair {wanted_what} ({_listing(wanted)}) with {offered_what} "
                          f"({_listing(offered)}) by name; name the inputs alike or convert the model again")
    return pairs


def _listing(names: Mapping[str, str]) -> str:
    return ", ".join(f"{name}: {dtype}" for name, dtype in names.items()) or "none"


def _named_feeds(inputs: Mapping[str, np.ndarray], signature: Signature, model: Any) -> dict[str, np.ndarray]:
    """``inputs`` keyed by signature name; keys may also be the Keras inputs' own names."""
    aliases = {str(getattr(t, "name", "")): name for name, t in keras_inputs(model, signature).items()}
    given = {(key if key in signature.names else aliases.get(key, key)): np.asarray(value)
             for key, value in inputs.items()}
    pairs = pair_names({s.name: s.dtype for s in signature.inputs},
                       {key: "string" if v.dtype.kind in "OUS" else v.dtype.name for key, v in given.items()},
                       "the model's inputs", "the inputs given")
    return {name: given[key] for name, key in pairs.items()}


def _ort_dtype(onnx_type: str) -> str:
    """``tensor(float)`` -> ``float32``: an onnxruntime input type as a NumPy/Keras dtype name."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return _ORT_DTYPES.get(name, name)


def _ort_error(exc: BaseException) -> str | None:
    """onnxruntime's one-line reason for its own exception types; None for anything else (a bug here)."""
    if not type(exc).__module__.startswith("onnxruntime"):
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    match = _ORT_MESSAGE.match(text)
    if match is None:
        return text
    where, sep, error = text[match.end():].rpartition(" , Error ")  # "In Node, (...) , Error <why>"
    return f"{match.group(1)}: {error}" + (f" ({where})" if sep else "")


def _ort_session(onnx_path: Path) -> Any:
    """An onnxruntime session of the model, or the one-line reason onnxruntime cannot load it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is reported once, as the skipped row's reason
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = _ort_error(exc)
        if reason is None:
            raise
        return reason


def _ort_run(session: Any, feeds: dict[str, np.ndarray]) -> list[Any] | str:
    """The session's outputs, or the one-line reason onnxruntime cannot run the model."""
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = _ort_error(exc)
        if reason is None:
            raise
        return reason


def skipped_comparison(reason: str) -> Comparison:
    """A skipped whole-model row (case ``skipped``) that says why the check could not run.

    It does not fail the report (a model onnxruntime cannot run is no parity failure, and its tables
    are still checked); the report shows it as ``skipped`` and its summary counts it.
    """
    return Comparison(table=WHOLE_MODEL, backend="onnx-model", reference="keras", passed=True, max_abs_diff=0.0,
                      mismatches=0, total=0, first_mismatch_id=None, tolerance=(MODEL_ATOL, MODEL_RTOL),
                      case=SKIPPED, detail=f"{SKIPPED}: the whole-model check could not run: {reason}", skipped=True)


def _skip(reason: str) -> Comparison:
    """:func:`skipped_comparison`, with a one-line note in the log (stderr unless logging is configured)."""
    row = skipped_comparison(reason)
    _log.warning("note: %s", row.detail.removeprefix(f"{SKIPPED}: "))
    return row


def _call_keras(model: Any, signature: Signature, feeds: Mapping[str, np.ndarray]) -> Any:
    """``model`` called the way the converter called it: one tensor, a list, or a dict (the signature's structure).

    Every feed is a tensor: Keras refuses a nested call mixing tensors (strings must be) and arrays.
    """
    values = [_keras_feed(feeds[name]) for name in signature.names]
    if signature.structure == DICT:
        return model(dict(zip(signature.names, values, strict=True)))
    return model(values if signature.structure == LIST else values[0])


def _ort_feed(value: np.ndarray) -> np.ndarray:
    return value.astype(str) if value.dtype == object else value


def _keras_feed(value: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.constant(value.astype(str) if value.dtype == object else value)


def conversion_parity(result: Any, *, backends: tuple[str, ...] = ("numpy", "onnxruntime", "torch"),
                      inputs: Mapping[str, np.ndarray] | None = None) -> ParityReport:
    """Parity of a :class:`converters.keras.ConversionResult`: every table on every backend, the ONNX
    model's own Gathers and the Keras layers (bitwise), and the whole model Keras vs ONNX (tolerance).

    The whole model runs on ``inputs`` (default :func:`sample_inputs`), keyed by the input names of the
    conversion's signature (:func:`conversion_signature`, the ONNX model's) or of the Keras inputs.
    """
    model = result.keras_model
    keras_refs = layer_references(model) if model is not None and hasattr(model, "layers") else None
    report = store_parity(result.store, backends=backends, onnx_model=result.onnx_path,
                          extra_references=keras_refs, verify=False)
    if keras_refs is not None:
        report.extend(cast_comparisons(result.store, keras_refs.cast(result.store), backends))
        signature = conversion_signature(result)
        try:
            feed = inputs if inputs is not None else sample_inputs(model, result.store, signature=signature)
        except InputError as exc:  # e.g. strings only hashed (no vocabulary to draw tokens from)
            report.extend([_skip(f"no sample inputs for the whole model: {exc}")])
            return report
        report.extend(model_comparisons(model, result.onnx_path, feed, signature=signature))
    return report


