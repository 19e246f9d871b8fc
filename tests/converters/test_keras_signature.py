"""Input signatures: derived from Keras models (dynamic ids dims) or read from the caller."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import InputError
from converters.keras_signature import DICT, LIST, SINGLE, InputSpec, Signature, derive_signature, normalize_signature


def test_derived_ids_dims_are_all_dynamic_even_for_a_static_length(kmodels: Any) -> None:
    sig = derive_signature(kmodels.functional("int64", length=8))
    assert sig == Signature((InputSpec("ids", (None, None), "int64"),), SINGLE)


def test_derived_float_features_keep_their_width(kmodels: Any) -> None:
    k = kmodels.keras
    x = k.Input((5,), dtype="float32", name="features")
    ids = k.Input((None,), dtype="int32", name="ids")
    model = k.Model([ids, x], [k.layers.Embedding(3, 2)(ids), k.layers.Dense(2)(x)])
    sig = derive_signature(model)
    assert sig.structure == LIST
    assert sig.inputs == (InputSpec("ids", (None, None), "int32"), InputSpec("features", (None, 5), "float32"))


def test_derived_dict_and_sequential(kmodels: Any) -> None:
    assert derive_signature(kmodels.two_inputs()).structure == DICT
    assert derive_signature(kmodels.two_inputs()).names == ["words", "chars"]
    assert derive_signature(kmodels.sequential()) == Signature((InputSpec("input", (None, None), "int64"),), SINGLE)


def test_sequential_built_from_data_is_refused(kmodels: Any) -> None:
    import numpy as np

    k = kmodels.keras
    model = k.Sequential([k.layers.Embedding(4, 2)])
    model(np.zeros((1, 3), np.int32))  # Keras records a float32 input
    with pytest.raises(InputError, match="keras.Input"):
        derive_signature(model)


def test_subclassed_model_has_no_derivable_signature(kmodels: Any) -> None:
    with pytest.raises(InputError, match="pass input_signature"):
        derive_signature(kmodels.subclassed())


def test_normalize_accepted_forms(kmodels: Any) -> None:
    tf = kmodels.tf
    spec = tf.TensorSpec((None, 7), tf.int64, name="ids")
    assert normalize_signature(spec) == Signature((InputSpec("ids", (None, 7), "int64"),), SINGLE)
    assert normalize_signature({"ids": "int32"}) == Signature((InputSpec("ids", (None, None), "int32"),), SINGLE)
    assert normalize_signature([{"a": "int64", "b": ((None,), "string")}]) == Signature(
        (InputSpec("a", (None, None), "int64"), InputSpec("b", (None,), "string")), DICT)
    assert normalize_signature([spec]) == normalize_signature(spec)  # tf2onnx's list of positional args
    listed = normalize_signature([spec, tf.TensorSpec((None, None), tf.int32)])
    assert listed.structure == LIST and listed.names == ["ids", "input_1"]


@pytest.mark.parametrize("bad", [None, 3, {"ids": "int65"}, {"ids": object()}, {}])
def test_normalize_rejects_with_help(bad: Any) -> None:
    with pytest.raises(InputError, match="int64|dtype|at least one"):
        normalize_signature(bad)
