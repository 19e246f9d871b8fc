"""converters.torch: tables -> nn.Embedding, Keras -> torch with a semantics report, torch -> ONNX -> store.

Real torch, torch.onnx (legacy and dynamo exporters), onnxruntime and Keras; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bridge.errors import ConversionError, InputError, OutputExistsError, UnsupportedError  # noqa: E402
from bridge.store import open_store, write_store  # noqa: E402
from bridge.store_parity import store_parity  # noqa: E402
from bridge.table import EmbeddingTable, SourceRef  # noqa: E402
from converters.torch import (  # noqa: E402
    export_onnx,
    extract_torch,
    keras_to_torch,
    to_torch_embedding,
    to_torch_embedding_bag,
)

V, D = 23, 6
EXPORTERS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def _bits(x) -> bytes:
    """The bytes of a tensor or array (bfloat16 tensors through their int16 view)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        x = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
        return x.contiguous().numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def _run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds.values(), strict=True)))


# ----------------------------------------------------------------------------- table -> nn.Embedding


def _float_table(dtype: str, name: str = "t", **kwargs) -> EmbeddingTable:
    data = np.random.default_rng(1).standard_normal((V, D)).astype(np.float32)
    data[0, 0], data[1, 1] = -0.0, np.nan
    return EmbeddingTable(name, data.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype), **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_to_torch_embedding_is_bitwise(dtype: str) -> None:
    table = _float_table(dtype)
    emb = to_torch_embedding(table)
    assert emb.weight.dtype == getattr(torch, dtype)
    assert _bits(emb.weight) == _bits(table.data)
    ids = np.random.default_rng(0).integers(0, V, size=(4, 9))
    assert _bits(emb(torch.from_numpy(ids))) == _bits(np.take(table.data, ids, axis=0))
    assert not emb.weight.requires_grad and emb.padding_idx is None


def test_frozen_shares_memory_trainable_copies() -> None:
    table = _float_table("float32")
    frozen = to_torch_embedding(table)
    assert frozen.weight.data_ptr() == table.data.ctypes.data  # zero-copy
    trainable = to_torch_embedding(table, trainable=True)
    assert trainable.weight.requires_grad and trainable.weight.data_ptr() != table.data.ctypes.data
    assert _bits(trainable.weight) == _bits(table.data)
    copied = to_torch_embedding(table, copy=True)
    assert copied.weight.data_ptr() != table.data.ctypes.data


def test_store_memory_map_copy_rules(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s", [_float_table("float32", name="t")])
    table = store["t"]
    assert not table.data.flags.writeable
    default = to_torch_embedding(table)  # read-only data, copy=None: a private copy
    assert default.weight.data_ptr() != table.data.ctypes.data
    view = to_torch_embedding(table, copy=False)  # the store file mapped again, copy-on-write: no copy made
    assert _bits(view(torch.arange(V))) == _bits(table.data)
    with pytest.raises(InputError, match="read-only"):
        to_torch_embedding(table, trainable=True, copy=False)


def test_padding_idx_only_from_padding_id() -> None:
    masked = _float_table("float32", metadata={"mask_zero": True})
    assert to_torch_embedding(masked).padding_idx is None  # a mask is not a padding row
    padded = _float_table("float32", padding_id=2)
    emb = to_torch_embedding(padded)
    assert emb.padding_idx == 2
    assert _bits(emb.weight[2]) == _bits(padded.data[2])  # the row is kept, not zeroed


def test_non_float_table_is_refused() -> None:
    table = EmbeddingTable("q", np.ones((V, D), dtype=np.int8))
    with pytest.raises(UnsupportedError, match="int8"):
        to_torch_embedding(table)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_to_torch_embedding_bag(mode: str) -> None:
    table = _float_table("float32")
    table.data[1, 1] = 0.5  # no NaN in a reduction test
    bag = to_torch_embedding_bag(table, mode=mode)
    ids, offsets = np.array([1, 2, 4, 5, 5, 22]), np.array([0, 2, 5])
    out = bag(torch.from_numpy(ids), torch.from_numpy(offsets)).numpy()
    rows = [table.data[ids[a:b]] for a, b in zip(offsets, [*offsets[1:], len(ids)], strict=True)]
    expected = np.stack([r.sum(0) if mode == "sum" else r.mean(0) for r in rows])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # the bag does arithmetic
    with pytest.raises(InputError, match="mode"):
        to_torch_embedding_bag(table, mode="median")


# ----------------------------------------------------------------------------- torch modules -> store


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.proj = nn.Linear(D, 3)  # another 2-D weight, of another shape

    def forward(self, ids):
        vectors = self.tok(ids)
        return vectors, self.proj(vectors)


class BagModel(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode)

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


class TiedLM(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=1)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_embedding_module(tmp_path: Path, dynamo: bool) -> None:
    model = _seeded(TokenModel)
    store = extract_torch(model, (torch.tensor([[1, 2, 3]]),), tmp_path / "out", dynamo=dynamo)
    assert list(store) == ["tok.weight"]
    table = store["tok.weight"]
    assert table.sources == (SourceRef("torch", "tok", "tok.weight"),)
    assert _bits(table.data) == _bits(model.tok.weight.detach().numpy())
    ids = np.arange(V)
    assert _bits(np.take(table.data, ids, axis=0)) == _bits(model.tok(torch.from_numpy(ids)))
    assert table.metadata["ties"] == [] and table.padding_id is None
    assert store.manifest["provenance"]["onnx"]["exporter"] == ("dynamo" if dynamo else "legacy")
    assert store.manifest["provenance"]["warnings"] == []
    # the stored model.onnx runs in onnxruntime and returns exactly the module's vectors
    batch = np.array([[0, V - 1, 5]], dtype=np.int64)
    vectors = _run_ort(store.path / "model.onnx", {"ids": batch})[0]
    assert _bits(vectors) == _bits(model.tok(torch.from_numpy(batch)))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_embedding_bag_module(tmp_path: Path, dynamo: bool, mode: str) -> None:
    model = _seeded(BagModel, mode)
    ids, offsets = torch.tensor([1, 2, 4, 5, 7, 22]), torch.tensor([0, 2, 5])
    store = extract_torch(model, (ids, offsets), tmp_path / "out", dynamo=dynamo)
    table = store["bag.weight"]
    assert _bits(table.data) == _bits(model.bag.weight.detach().numpy())
    assert table.metadata["torch"]["mode"] == mode
    gathers = table.metadata["onnx"]["consumers"]
    if not dynamo:  # the legacy exporter puts the bag's Gather inside a Loop body
        assert all(c["graph"].endswith("/body") for c in gathers if c["role"] == "gather")
    out = _run_ort(store.path / "model.onnx", {"ids": ids.numpy(), "offsets": offsets.numpy()})[0]
    np.testing.assert_allclose(out, model(ids, offsets).detach().numpy(), rtol=1e-6, atol=1e-6)  # reduction


@pytest.mark.parametrize(("ids_shape", "bias", "layout"), [
    pytest.param((1, 4), False, "transposed", id="matmul-WT-copy"),
    pytest.param((4,), True, "shared", id="gemm-on-table"),
])
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_tied_lm_head(tmp_path: Path, dynamo: bool, ids_shape: tuple[int, ...], bias: bool, layout: str) -> None:
    """Both exporters: 3-D activations give MatMul on a separate W.T initializer (legacy ``onnx::MatMul_N``,
    dynamo ``val_N``); 2-D activations with a bias give Gemm(transB=1) on the table itself."""
    model = _seeded(TiedLM, bias)
    example = torch.arange(4).reshape(ids_shape)
    store = extract_torch(model, (example,), tmp_path / "out", dynamo=dynamo)
    assert list(store) == ["emb.weight"]  # stored once, named after the embedding
    table = store["emb.weight"]
    assert [s.weight for s in table.sources] == ["emb.weight", "head.weight"]
    assert [s.layer for s in table.sources] == ["emb", "head"]
    assert _bits(table.data) == _bits(model.emb.weight.detach().numpy())
    ids = np.arange(V)
    assert _bits(np.take(table.data, ids, axis=0)) == _bits(model.emb(torch.from_numpy(ids)))
    assert table.padding_id == 1
    (tie,) = table.metadata["ties"]
    assert tie["layout"] == layout
    assert [c["op_type"] for c in tie["consumers"]] == (["Gemm"] if layout == "shared" else ["MatMul"])
    assert (tie["initializer"] == table.initializer) is (layout == "shared")
    out = _run_ort(store.path / "model.onnx", {"ids": example.numpy()})[0]
    np.testing.assert_allclose(out, model(example).detach().numpy(), rtol=1e-5, atol=1e-6)  # MatMul arithmetic


def test_bfloat16_module_keeps_bfloat16_bits(tmp_path: Path) -> None:
    model = _seeded(TiedLM).to(torch.bfloat16)
    store = extract_torch(model, (torch.arange(4).reshape(1, 4),), tmp_path / "out")
    table = store["emb.weight"]
    assert table.dtype == np.dtype(ml_dtypes.bfloat16)
    assert _bits(table.data) == _bits(model.emb.weight)
    assert [t["layout"] for t in table.metadata["ties"]] == ["transposed"]
    assert _bits(to_torch_embedding(table)(torch.arange(V))) == _bits(model.emb(torch.arange(V)))


class Partly(nn.Module):
    """One embedding used, one unused, and a table computed in forward() (folded into a new constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Embedding(V, D)
        self.unused = nn.Embedding(V, D)
        self.raw = nn.Parameter(torch.randn(V, 2))

    def forward(self, ids):
        return self.used(ids), nn.functional.embedding(ids, self.raw * 2)


def test_warnings_for_unmapped_tables_and_unused_embeddings(tmp_path: Path) -> None:
    model = _seeded(Partly)
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    warns = store.manifest["provenance"]["warnings"]
    assert any("'unused.weight' has no table" in w for w in warns), warns
    unmapped = [name for name in store if not store[name].sources]
    assert len(unmapped) == 1 and store[unmapped[0]].shape == (V, 2)
    assert any("matches no state_dict entry" in w for w in warns), warns
    assert store["used.weight"].sources == (SourceRef("torch", "used", "used.weight"),)


def test_parity_passes_on_an_extracted_store(tmp_path: Path) -> None:
    model = _seeded(TiedLM)
    store = extract_torch(model, (torch.arange(4).reshape(1, 4),), tmp_path / "out")

    def module_lookup(ids: np.ndarray) -> np.ndarray:
        return model.emb(torch.from_numpy(np.asarray(ids, dtype=np.int64))).detach().numpy()

    report = store_parity(store, extra_references={"torch-module": {"emb.weight": module_lookup}})
    assert report, report.to_text()
    assert {c.backend for c in report.comparisons} >= {"numpy", "onnxruntime", "torch", "torch-module", "onnx-model"}
    reopened = open_store(tmp_path / "out")  # checksums verify
    assert reopened.manifest["files"]["model.onnx"]["bytes"] > 0


def test_extract_refuses_existing_output_before_exporting(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        extract_torch(_seeded(TokenModel), (torch.tensor([1]),), out)
    assert (out / "keep.txt").read_text() == "x"


class NoOnnx(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real  # no ONNX symbolic in the legacy exporter


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # torch.export cannot trace a data-dependent branch


@pytest.mark.parametrize(("module", "dynamo", "match"), [
    (NoOnnx(), False, "legacy .*fft"),
    (DataDependent(), True, "dynamo .*data-dependent"),
])
def test_exporter_failures_become_conversion_errors(tmp_path: Path, module, dynamo: bool, match: str) -> None:
    with pytest.raises(ConversionError, match=match) as info:
        export_onnx(module, (torch.ones(4),), tmp_path / "m.onnx", dynamo=dynamo)
    assert "\n" not in str(info.value)


def test_export_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nn.Module"):
        export_onnx(lambda x: x, (torch.ones(1),), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="example_inputs"):
        export_onnx(_seeded(TokenModel), (), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="does not exist"):
        export_onnx(_seeded(TokenModel), torch.tensor([1]), tmp_path / "nope" / "m.onnx")


def test_export_keeps_training_flag_and_dynamic_axes(tmp_path: Path) -> None:
    model = _seeded(TokenModel).train()
    path = export_onnx(model, (torch.tensor([[1, 2]]),), tmp_path / "m.onnx", input_names=["ids"],
                       output_names=["vectors", "logits"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    assert model.training
    batch = np.random.default_rng(0).integers(0, V, size=(3, 7))
    vectors = _run_ort(path, {"ids": batch})[0]
    assert _bits(vectors) == _bits(model.tok(torch.from_numpy(batch)))


# ----------------------------------------------------------------------------- Keras -> torch


@pytest.fixture(scope="module")
def keras():
    from converters.keras_env import import_keras

    return import_keras()[1]


def _layer(keras, **kwargs):
    keras.utils.set_random_seed(0)
    layer = keras.layers.Embedding(V, D, **kwargs)
    layer.build((None,))
    return layer


def _keras_out(layer, ids: np.ndarray) -> np.ndarray:
    return np.asarray(layer(ids))


def test_keras_mask_zero_layer(keras) -> None:
    layer = _layer(keras, mask_zero=True)
    emb, report = keras_to_torch(layer)
    assert emb.padding_idx is None  # mask_zero is a mask, not a padding row
    assert _bits(emb.weight) == _bits(np.asarray(layer.embeddings))
    ids = np.arange(V)
    assert _bits(emb(torch.from_numpy(ids))) == _bits(_keras_out(layer, ids))
    # Keras emits a mask, torch does not
    assert np.asarray(layer.compute_mask(np.array([0, 3, 0]))).tolist() == [False, True, False]
    assert report.codes == ("mask_zero", "negative_ids")
    assert "padding_idx" in report.get("mask_zero").torch and "mask = ids != 0" in report.get("mask_zero").action
    text = report.to_text()
    assert "mask_zero" in text and "negative_ids" in text and f"nn.Embedding({V}, {D})" in text
    assert json.loads(json.dumps(report.to_json()))["differences"][0]["code"] == "mask_zero"


def test_keras_wraps_negative_ids_torch_raises(keras) -> None:
    layer = _layer(keras)
    emb, report = keras_to_torch(layer)
    keras_row = _keras_out(layer, np.array([-1]))
    assert _bits(keras_row) == _bits(np.asarray(layer.embeddings)[V - 1 : V])  # Keras: -1 -> row V-1
    with pytest.raises(IndexError):
        emb(torch.tensor([-1]))  # torch: an error
    assert report.codes == ("negative_ids",)
    assert f"row {V - 1}" in report.get("negative_ids").keras


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_keras_quantized_layer_is_dequantized(keras, mode: str) -> None:
    layer = _layer(keras)
    layer.quantize(mode)
    emb, report = keras_to_torch(layer)
    assert "quantized" in report and emb.weight.dtype == torch.float32
    ids = np.arange(V)
    assert _bits(emb(torch.from_numpy(ids))) == _bits(_keras_out(layer, ids))


def test_keras_quantized_mixed_precision_layer_reports_no_cast(keras) -> None:
    """Its dequantized weight is already in the compute dtype: no 'cast the output' advice (it said float32)."""
    layer = _layer(keras, dtype="mixed_float16")
    layer.quantize("int4")  # Keras refuses int8 under a float16 compute dtype
    emb, report = keras_to_torch(layer)
    assert emb.weight.dtype == torch.float16 and "dtype_policy" not in report.codes
    ids = np.arange(V)
    assert _bits(emb(torch.from_numpy(ids))) == _bits(_keras_out(layer, ids))


def test_keras_mixed_precision(keras) -> None:
    layer = _layer(keras, dtype="mixed_float16")
    emb, report = keras_to_torch(layer)
    assert emb.weight.dtype == torch.float32  # the table is float32
    assert _bits(emb.weight) == _bits(np.asarray(layer.embeddings))
    ids = np.arange(V)
    keras_out = _keras_out(layer, ids)
    assert keras_out.dtype == np.float16
    assert _bits(emb(torch.from_numpy(ids)).to(torch.float16)) == _bits(keras_out)  # the cast Keras applies
    assert "dtype_policy" in report and "float16" in report.get("dtype_policy").action


def test_keras_bfloat16_layer(keras) -> None:
    layer = _layer(keras, dtype="bfloat16")
    emb, report = keras_to_torch(layer)
    assert emb.weight.dtype == torch.bfloat16
    ids = np.arange(V)
    assert _bits(emb(torch.from_numpy(ids))) == _bits(_keras_out(layer, ids))
    assert "dtype_policy" not in report


def test_keras_constraint_and_regularizer(keras) -> None:
    layer = _layer(keras, embeddings_regularizer="l2", embeddings_constraint="non_neg")
    emb, report = keras_to_torch(layer)
    assert report.codes == ("negative_ids", "constraint", "regularizer")
    assert "NonNeg" in report.get("constraint").keras and "L2" in report.get("regularizer").keras
    assert emb.weight.requires_grad  # trainable follows the Keras layer
    assert not keras_to_torch(layer, trainable=False)[0].weight.requires_grad


def test_keras_lora_is_folded(keras) -> None:
    layer = _layer(keras)
    layer.enable_lora(2)
    b = layer.lora_embeddings_b
    b.assign(np.random.default_rng(3).standard_normal(tuple(b.shape)).astype(np.float32))
    emb, report = keras_to_torch(layer)
    assert "lora" in report
    ids = np.arange(V)
    keras_out = _keras_out(layer, ids)
    assert _bits(keras_out) != _bits(np.asarray(layer._embeddings))  # the adapters changed the rows
    assert _bits(emb(torch.from_numpy(ids))) == _bits(keras_out)


def test_keras_table_from_a_store() -> None:
    table = _float_table("float32", sources=(SourceRef("keras", "tok_emb", "tok_emb/embeddings"),),
                         metadata={"mask_zero": True})
    emb, report = keras_to_torch(table)
    assert emb.padding_idx is None and not emb.weight.requires_grad
    assert report.codes == ("mask_zero", "negative_ids")
    assert _bits(emb.weight) == _bits(table.data)


def test_keras_to_torch_input_errors(keras) -> None:
    with pytest.raises(InputError, match="not built"):
        keras_to_torch(keras.layers.Embedding(V, D))
    with pytest.raises(InputError, match="Embedding"):
        keras_to_torch(keras.layers.Dense(3))
