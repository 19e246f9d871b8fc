"""Keras models that are more than a plain Embedding: LoRA, float16/bfloat16, mixed precision, position tables.

Each model is converted once per module with :func:`converters.keras.convert` and checked with
:func:`converters.keras_parity.conversion_parity`: every backend (numpy, onnxruntime, torch) and the
ONNX model's own Gather against ``numpy.take`` bitwise, the Keras Embedding layers bitwise (through
the cast for a mixed policy), and the whole model Keras vs onnxruntime with a tolerance (Dense and
pooling follow the lookup; float16/bfloat16 tolerances scale with the precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from bridge.backends import lookup
from bridge.parity import ParityReport
from bridge.store import open_store
from converters.keras import ConversionResult, convert
from converters.keras_parity import conversion_parity

BACKENDS = ("numpy", "onnxruntime", "torch")


@dataclass
class Converted:
    model: Any
    result: ConversionResult
    parity: ParityReport

    def table(self, name: str) -> Any:
        return next(t for t in self.result.tables if t.name == name)

    def rows(self, table: str, backend: str) -> list[Any]:
        return [c for c in self.parity.comparisons if c.table == table and c.backend == backend]


@contextlib.contextmanager
def global_policy(keras: Any, name: str | None) -> Iterator[None]:
    """Set Keras's global dtype policy for the block; always restore the previous one."""
    if name is None:
        yield
        return
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ----------------------------------------------------------------------------- models


def lora_model(k: Any) -> Any:
    """Embedding with LoRA rank 2, trained one SGD step so the LoRA factors are not zero."""
    ids = k.Input((None,), dtype="int32", name="ids")
    emb = k.layers.Embedding(20, 6, name="lora_emb")
    out = k.layers.Dense(1, name="head")(k.layers.GlobalAveragePooling1D(name="mean")(emb(ids)))
    model = k.Model(ids, out, name="lora")
    emb.enable_lora(2)
    model.compile(optimizer=k.optimizers.SGD(0.5), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 20, (8, 5)).astype("int32"), rng.standard_normal((8, 1)), epochs=1, verbose=0)
    return model


def half_model(k: Any, dtype: str) -> Any:
    """Embedding, mean and Dense all in ``dtype`` (float16 or bfloat16)."""
    ids = k.Input((None,), dtype="int32", name="ids")
    x = k.layers.Embedding(9, 4, dtype=dtype, name="half_emb")(ids)
    x = k.layers.GlobalAveragePooling1D(dtype=dtype, name="mean")(x)
    return k.Model(ids, k.layers.Dense(3, dtype=dtype, name="head")(x), name=f"model_{dtype}")


def mixed_model(k: Any) -> Any:
    """Built under a mixed global policy: float32 table, rows cast to the compute dtype; float32 output head."""
    ids = k.Input((None,), dtype="int32", name="ids")
    x = k.layers.Embedding(12, 4, name="mixed_emb")(ids)
    x = k.layers.Dense(5, name="hidden")(x)
    return k.Model(ids, k.layers.Dense(2, dtype="float32", name="head")(x), name="mixed")


def position_layers(k: Any) -> tuple[type, type, type]:
    """Three position-embedding layers: Gather by arange, keras-hub style Slice, Embedding of a constant arange."""

    class ArangePositions(k.layers.Layer):
        """``x + take(W, arange(seq_len))``: a Gather over a dynamic range."""

        def build(self, input_shape: Any) -> None:
            self.positions = self.add_weight(shape=(12, 4), name="positions", initializer="uniform")

        def call(self, x: Any) -> Any:
            return x + k.ops.take(self.positions, k.ops.arange(k.ops.shape(x)[1]), axis=0)

    class SlicePositions(k.layers.Layer):
        """keras-hub ``PositionEmbedding``: ``broadcast_to(slice(W, (0, 0), (seq_len, dim)), x.shape)``."""

        def build(self, input_shape: Any) -> None:
            self.position_embeddings = self.add_weight(shape=(16, 4), name="embeddings", initializer="uniform")

        def call(self, x: Any) -> Any:
            shape = k.ops.shape(x)
            rows = k.ops.slice(self.position_embeddings, (0, 0), (shape[-2], shape[-1]))
            return k.ops.broadcast_to(rows, shape)

    class ConstantPositions(k.layers.Layer):
        """An Embedding looked up with a constant ``arange(8)``: TensorFlow folds it to 8 rows."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.table = k.layers.Embedding(12, 4, name="const_pos_emb")

        def call(self, x: Any) -> Any:
            return x + self.table(k.ops.arange(8))

    return ArangePositions, SlicePositions, ConstantPositions


def positions_model(k: Any) -> Any:
    """Static length 8: tokens + arange positions + keras-hub slice positions + constant-arange positions."""
    arange_cls, slice_cls, const_cls = position_layers(k)
    ids = k.Input((8,), dtype="int32", name="ids")
    tok = k.layers.Embedding(10, 4, name="tok_emb")(ids)
    x = arange_cls(name="arange_pos")(tok)
    x = k.layers.Add(name="add_slice")([x, slice_cls(name="slice_pos")(tok)])
    return k.Model(ids, const_cls(name="const_pos")(x), name="positions")


BUILDERS: dict[str, tuple[Callable[[Any], Any], str | None]] = {
    "lora": (lora_model, None),
    "float16": (lambda k: half_model(k, "float16"), None),
    "bfloat16": (lambda k: half_model(k, "bfloat16"), None),
    "mixed_float16": (mixed_model, "mixed_float16"),
    "mixed_bfloat16": (mixed_model, "mixed_bfloat16"),
    "positions": (positions_model, None),
}


@pytest.fixture(scope="module")
def converted(kmodels: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Converted]:
    """``converted(name)``: the model built (under its policy), converted and checked once per module."""
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            build, policy = BUILDERS[name]
            with global_policy(kmodels.keras, policy):
                kmodels.seed(20)
                model = build(kmodels.keras)
                result = convert(model, tmp_path_factory.mktemp(name) / "store")
                cache[name] = Converted(model, result, conversion_parity(result, backends=BACKENDS))
        return cache[name]

    return get


def keras_rows(k: Any, layer: Any, rows: int) -> np.ndarray:
    """``layer(arange(rows))``: the Keras layer's own output for every id."""
    return np.asarray(k.ops.convert_to_numpy(layer(np.arange(rows, dtype="int32"))))


def adapters_equal(table: Any, expected: np.ndarray) -> None:
    """Every backend's lookup of every id equals ``expected`` byte for byte."""
    ids = np.arange(table.rows, dtype=np.int64)
    for backend in BACKENDS:
        got = lookup(table, backend)(ids)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), backend


# ----------------------------------------------------------------------------- every case


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parity_passes(converted: Callable[[str], Converted], name: str) -> None:
    conv = converted(name)
    assert conv.parity.comparisons and conv.parity, conv.parity.to_text()
    backends = {c.backend for c in conv.parity.comparisons}
    assert {"numpy", "onnxruntime", "torch", "onnx-model"} <= backends
    assert any(c.table == "(whole model)" for c in conv.parity.comparisons)
    open_store(conv.result.store_path)  # every sha256 verifies


# ----------------------------------------------------------------------------- LoRA


def test_lora_table_is_the_folded_weight_mapped_to_its_layer(kmodels: Any,
                                                              converted: Callable[[str], Converted]) -> None:
    conv = converted("lora")
    layer = conv.model.get_layer("lora_emb")
    (table,) = [t for t in conv.result.tables]
    folded = np.asarray(layer.embeddings.numpy())
    base = np.asarray(layer._embeddings.numpy())
    assert not np.array_equal(folded, base), "the LoRA step changed the served table"
    assert table.data.tobytes() == folded.tobytes()
    assert [(s.layer, s.weight) for s in table.sources] == [("lora_emb", "lora_emb/embeddings")]
    assert table.metadata["lora"]["rank"] == 2 and table.metadata["lora"]["folded"] is True
    # tf2onnx emits one folded initializer: no LoRA factor and no MatMul on the table's path remain
    import onnx

    model = onnx.load(str(conv.result.onnx_path))
    shapes = {tuple(t.dims) for t in model.graph.initializer}
    assert (20, 2) not in shapes and (2, 6) not in shapes
    assert [c["role"] for c in table.metadata["onnx"]["consumers"]] == ["gather"]
    assert table.metadata["onnx"]["consumers"][0]["via"] == []
    adapters_equal(table, keras_rows(kmodels.keras, layer, 20))
    keras = conv.rows("lora_emb", "keras")
    assert keras and all(keras) and all(c.tolerance is None for c in keras)


# ----------------------------------------------------------------------------- float16 / bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_tables_keep_their_dtype_exactly(kmodels: Any, converted: Callable[[str], Converted], dtype: str) -> None:
    conv = converted(dtype)
    layer = conv.model.get_layer("half_emb")
    expected = np.asarray(layer.embeddings.numpy())
    assert expected.dtype == (np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.float16)
    reopened = open_store(conv.result.store_path)["half_emb"]
    assert reopened.dtype == expected.dtype and reopened.data.tobytes() == expected.tobytes()
    assert reopened.metadata["onnx"]["dtype"] == dtype
    adapters_equal(reopened, keras_rows(kmodels.keras, layer, 9))


def test_bfloat16_model_runs_in_onnxruntime(converted: Callable[[str], Converted]) -> None:
    import onnxruntime as ort

    conv = converted("bfloat16")
    assert any("no bfloat16 kernel" in w and "MatMul" in w for w in conv.result.warnings)
    session = ort.InferenceSession(str(conv.result.onnx_path), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 8], [0, 0, 5]], np.int32)
    (got,) = session.run(None, {"ids": ids})
    want = np.asarray(conv.model(ids)).astype(np.float32)
    assert got.dtype == np.float32  # widened exactly: session.run cannot return bfloat16
    np.testing.assert_allclose(got, want, atol=1.6e-2, rtol=6.3e-2)


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_policy_table_is_float32_and_keras_is_its_cast(kmodels: Any, converted: Callable[[str], Converted],
                                                             name: str) -> None:
    conv = converted(name)
    compute = name.removeprefix("mixed_")
    table = conv.table("mixed_emb")
    layer = conv.model.get_layer("mixed_emb")
    assert table.dtype == np.float32 and table.data.tobytes() == np.asarray(layer.embeddings.numpy()).tobytes()
    assert table.metadata["keras_compute_dtype"] == compute
    assert table.metadata["keras_dtype_policy"] == name
    assert any("mixed_emb" in w and f"cast(table[id], {compute})" in w for w in conv.result.warnings)
    keras_out = keras_rows(kmodels.keras, layer, 12)
    assert keras_out.dtype.name == compute
    assert keras_out.tobytes() == np.asarray(table.data).astype(keras_out.dtype).tobytes()
    cast_rows = [c for c in conv.parity.comparisons if c.reference == f"numpy.take->{compute}"]
    assert {c.backend for c in cast_rows} == {"keras", *(f"{b}->{compute}" for b in BACKENDS)}
    assert all(cast_rows) and all(c.tolerance is None for c in cast_rows)
    assert all(c.reference == f"numpy.take->{compute}" for c in conv.rows("mixed_emb", "keras"))


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_policy_model_from_a_file_maps_its_folded_table(kmodels: Any, tmp_path: Any, name: str) -> None:
    """Loaded from a ``.keras`` file, the model casts its whole table before the lookup and tf2onnx folds
    the cast: the ONNX table is the weight cast to the compute dtype. It is mapped to its layer all the
    same, and Keras, the ONNX model and every backend serve those rows bit for bit."""
    with global_policy(kmodels.keras, name):
        kmodels.seed(21)
        model = mixed_model(kmodels.keras)
    model.save(tmp_path / "m.keras")
    result = convert(tmp_path / "m.keras", tmp_path / "store")
    compute = name.removeprefix("mixed_")
    table = result.store["mixed_emb"]
    weight = np.asarray(model.get_layer("mixed_emb").embeddings.numpy())
    assert table.dtype.name == compute and table.data.tobytes() == weight.astype(table.dtype).tobytes()
    assert [s.layer for s in table.sources] == ["mixed_emb"]
    assert table.metadata["keras_variable_dtype"] == "float32" and table.metadata["keras_dtype_policy"] == name
    assert any("cast to" in w and "folded" in w for w in result.warnings)
    report = conversion_parity(result, backends=BACKENDS)
    assert report, report.to_text()
    keras_rows = [c for c in report.comparisons if c.table == "mixed_emb" and c.backend == "keras"]
    assert keras_rows and all(keras_rows) and all(c.tolerance is None for c in keras_rows)


# ----------------------------------------------------------------------------- positions


def test_static_length_arange_positions_keep_every_row(converted: Callable[[str], Converted]) -> None:
    conv = converted("positions")
    table = conv.table("arange_pos")
    weight = np.asarray(conv.model.get_layer("arange_pos").positions.numpy())
    assert table.shape == (12, 4) and table.data.tobytes() == weight.tobytes()
    assert table.metadata["onnx"]["consumers"][0]["role"] == "gather"
    assert conv.result.provenance["signature"]["inputs"][0]["shape"] == [None, None]


def test_slice_read_positions_are_found_mapped_and_served(kmodels: Any, converted: Callable[[str], Converted]) -> None:
    conv = converted("positions")
    table = conv.table("slice_pos")
    layer = conv.model.get_layer("slice_pos")
    assert [(s.layer, s.weight) for s in table.sources] == [("slice_pos", "slice_pos/embeddings")]
    assert [c["role"] for c in table.metadata["onnx"]["consumers"]] == ["slice"]
    # the layer's own output for a sequence as long as the table: row i is position i
    keras_out = np.asarray(layer(np.zeros((1, 16, 4), np.float32)))[0]
    assert table.shape == (16, 4)
    adapters_equal(table, keras_out)
    # parity's onnx-model row for this table runs the model's own Slice (tf2onnx's int32 starts), and passes
    rows = [c for c in conv.parity.comparisons if c.table == "slice_pos" and c.backend == "onnx-model"]
    assert rows and all(c.passed for c in rows), conv.parity.to_text()


def test_constant_folded_positions_are_reported_and_stored_whole(kmodels: Any,
                                                                 converted: Callable[[str], Converted]) -> None:
    conv = converted("positions")
    table = conv.table("const_pos_emb")
    layer = conv.model.get_layer("const_pos").table
    trunc = table.metadata["truncated_in_onnx"]
    assert (trunc["rows"], trunc["of"], trunc["read_by"]) == (8, 12, ["Add"])
    assert any("truncated to 8 of 12 rows" in w for w in conv.result.warnings)
    assert not any("const_pos_emb" in w and "has no table" in w for w in conv.result.warnings)
    assert table.initializer is None and [s.layer for s in table.sources] == ["const_pos/const_pos_emb"]
    adapters_equal(table, keras_rows(kmodels.keras, layer, 12))
    keras = conv.rows("const_pos_emb", "keras")
    assert keras and all(keras)
