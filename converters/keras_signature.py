"""Input signatures for converting a Keras model: derived from the model, or given by the caller.

A :class:`Signature` names every ONNX input, gives its shape and dtype, and says how the model
is called with them (one tensor, a list, or a dict). Derived signatures make the batch *and*
sequence dimensions of integer and string inputs dynamic (``None``): with a static sequence
length, tf2onnx constant-folds a position table indexed by ``arange(length)`` and only the
used rows would remain in the ONNX model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.errors import InputError, UnsupportedError
from bridge.names import unique_name

#: How the model is called with the inputs.
SINGLE, LIST, DICT = "single", "list", "dict"

_AUTO_NAME = re.compile(r"^(keras_tensor|input_layer|input)(_\d+)?$")
_VALID_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

SIGNATURE_HELP = (
    "pass input_signature, e.g. input_signature={'ids': 'int64'} (a [batch, seq] int64 input named 'ids'), "
    "a tf.TensorSpec, a list of them, or a dict of name -> tf.TensorSpec"
)


@dataclass(frozen=True)
class InputSpec:
    """One model input: its ONNX name, shape (``None`` = dynamic) and dtype name (``"int64"``, ``"string"``)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Signature:
    """The inputs of a conversion and the structure the model is called with (``single``/``list``/``dict``)."""

    inputs: tuple[InputSpec, ...]
    structure: str

    def __post_init__(self) -> None:
        names = [s.name for s in self.inputs]
        if not names:
            raise InputError(f"an input signature needs at least one input; {SIGNATURE_HELP}")
        if len(set(names)) != len(names):
            raise InputError(f"input names must be unique, got {names}")
        if self.structure == SINGLE and len(names) != 1:
            raise InputError(f"a single-input signature has exactly one input, got {names}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def to_json(self) -> dict[str, Any]:
        return {"structure": self.structure, "inputs": [s.to_json() for s in self.inputs]}


def _dynamic_shape(shape: Sequence[int | None], dtype: str) -> tuple[int | None, ...]:
    """All dims dynamic for ids and strings; only the batch dim for anything else (features keep their width)."""
    if dtype.startswith(("int", "uint")) or dtype == "string":
        return tuple(None for _ in shape)
    return tuple([None, *shape[1:]]) if shape else ()


def _input_name(tensor: Any, fallback: str) -> str:
    name = str(getattr(tensor, "name", "") or "")
    return fallback if not name or _AUTO_NAME.match(name) or not _VALID_NAME.match(name) else name


def tensor_dtype_name(tensor: Any) -> str:
    """The dtype name of a symbolic tensor: a string in Keras 3, a ``tf.DType`` (``.name``) in Keras 2."""
    raw = getattr(tensor, "dtype", "")
    return str(getattr(raw, "name", raw))


def _spec_of(tensor: Any, name: str) -> InputSpec:
    if getattr(tensor, "sparse", False) or getattr(tensor, "ragged", False):
        raise UnsupportedError(f"input {name!r} is sparse or ragged; only dense inputs convert to ONNX")
    dtype = tensor_dtype_name(tensor)
    shape = tuple(getattr(tensor, "shape", ()))
    return InputSpec(name=name, shape=_dynamic_shape(shape, dtype), dtype=dtype)


def derive_signature(model: Any) -> Signature:
    """The signature of a built Functional/Sequential model (or a subclassed one wrapped in Functional).

    Raises :class:`InputError` when the model has no symbolic inputs (a subclassed model, or a
    Sequential model without an ``Input``): the caller must pass ``input_signature``.
    """
    struct = _input_struct(model)
    if struct is None:
        raise InputError(
            f"model {getattr(model, 'name', '?')!r} ({type(model).__name__}) has no symbolic inputs "
            f"(a subclassed model, or a Sequential model built without keras.Input), so its input "
            f"signature cannot be derived; {SIGNATURE_HELP}"
        )
    if isinstance(struct, Mapping):
        specs = [_spec_of(t, str(k)) for k, t in struct.items()]
        return Signature(tuple(specs), DICT)
    if isinstance(struct, (list, tuple)):
        if any(isinstance(t, (Mapping, list, tuple)) for t in struct):
            raise UnsupportedError(f"nested input structures are not supported; {SIGNATURE_HELP}")
        names = _unique([_input_name(t, f"input_{i}") for i, t in enumerate(struct)])
        return Signature(tuple(_spec_of(t, n) for t, n in zip(struct, names, strict=True)), LIST)
    return Signature((_spec_of(struct, _input_name(struct, "input")),), SINGLE)


def _input_struct(model: Any) -> Any:
    """``model.input`` (a tensor, list or dict); for a Sequential model, its one input."""
    try:
        return model.input
    except (AttributeError, ValueError, TypeError):
        pass
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError, TypeError):
        return None
    if len(inputs) != 1:
        return inputs or None
    first = next(iter(getattr(model, "layers", None) or []), None)
    if type(first).__name__ == "Embedding" and not tensor_dtype_name(inputs[0]).startswith(("int", "uint")):
        raise InputError(
            f"model {model.name!r} was built from data and Keras recorded a {inputs[0].dtype} input for "
            f"an Embedding; build it with keras.Input(dtype='int64') or {SIGNATURE_HELP}"
        )
    return inputs[0]


def _unique(names: list[str]) -> list[str]:
    taken: set[str] = set()
    return [unique_name(name, taken) for name in names]


def _from_value(name: str, value: Any) -> InputSpec:
    """An InputSpec from a tf.TensorSpec, a dtype name, or a ``(shape, dtype)`` pair."""
    if isinstance(value, str):
        return InputSpec(name, (None, None), _dtype_name(value))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        shape, dtype = value
        return InputSpec(name, tuple(None if d is None else int(d) for d in shape), _dtype_name(dtype))
    if type(value).__name__ == "TensorSpec":
        shape = value.shape
        if shape.rank is None:
            raise InputError(f"input {name!r}: a TensorSpec needs a known rank, e.g. TensorSpec((None, None), "
                             "tf.int64)")
        return InputSpec(name, tuple(None if d is None else int(d) for d in shape.as_list()), value.dtype.name)
    raise InputError(f"input {name!r}: cannot read {value!r} as an input spec; {SIGNATURE_HELP}")


def _dtype_name(dtype: str) -> str:
    name = str(dtype).strip().lower().removeprefix("tf.")
    known = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string",
             "float16", "bfloat16", "float32", "float64", "bool"}
    if name not in known:
        raise InputError(f"unknown input dtype {dtype!r}; use one of {', '.join(sorted(known))}")
    return name


def _spec_name(spec: Any, fallback: str) -> str:
    name = getattr(spec, "name", None)
    return str(name) if name else fallback


def normalize_signature(signature: Any) -> Signature:
    """Read a caller's ``input_signature``.

    Accepted: a ``tf.TensorSpec`` or a one-element list of it (the model is called with one
    tensor); a list of several (called with a list); a dict
    ``name -> TensorSpec | "int64" | (shape, "int64")`` or a list holding one such dict (called
    with a dict; a one-entry dict calls the model with the tensor alone).
    A bare dtype name means shape ``[batch, seq]``, both dynamic.
    """
    if isinstance(signature, Signature):
        return signature
    if isinstance(signature, (list, tuple)) and len(signature) == 1 and isinstance(signature[0], Mapping):
        signature = signature[0]
    if isinstance(signature, Mapping):
        specs = tuple(_from_value(str(k), v) for k, v in signature.items())
        return Signature(specs, SINGLE if len(specs) == 1 else DICT)
    if isinstance(signature, (list, tuple)) and signature:
        names = _unique([_spec_name(s, f"input_{i}") for i, s in enumerate(signature)])
        if len(names) == 1:  # tf2onnx's convention: a list of positional arguments
            names = [_spec_name(signature[0], "input")]
        specs = tuple(_from_value(n, s) for n, s in zip(names, signature, strict=True))
        return Signature(specs, SINGLE if len(specs) == 1 else LIST)
    if type(signature).__name__ == "TensorSpec":
        return Signature((_from_value(_spec_name(signature, "input"), signature),), SINGLE)
    raise InputError(f"cannot read input_signature={signature!r}; {SIGNATURE_HELP}")


def tf_specs(signature: Signature, tf: Any) -> dict[str, Any]:
    """``{name: tf.TensorSpec}`` for the signature's inputs (the TensorSpec names become ONNX input names)."""
    return {s.name: tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in signature.inputs}
