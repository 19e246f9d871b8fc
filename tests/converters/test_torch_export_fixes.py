"""extract_torch / export_onnx fixes: bfloat16 parity from external data, an untouched module under
max_norm, graph inputs named after forward() with working dynamic_axes, shared tables' padding_idx,
and bad example inputs reported as such.

Real torch, torch.onnx (legacy and dynamo exporters) and onnxruntime; no mocks.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
nn = torch.nn

from test_torch import EXPORTERS, _bits, _run_ort, _seeded  # noqa: E402 - the helpers of test_torch.py

from bridge.errors import InputError, ParityError, UnsupportedError  # noqa: E402
from bridge.onnx_reference import onnx_gather_reference  # noqa: E402
from bridge.scan import scan  # noqa: E402
from bridge.store_parity import store_parity  # noqa: E402
from converters.torch import export_onnx, extract_torch  # noqa: E402

V, D = 20, 4


class Emb(nn.Module):
    def __init__(self, options: dict | None = None, rows: int = V, dim: int = D) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim, **(options or {}))

    def forward(self, ids):
        return self.emb(ids)


class TokPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(8, D)

    def forward(self, tokens, positions):
        return self.tok(tokens), self.pos(positions)


class Shared(nn.Module):
    """Two embeddings on one weight; ``first`` is declared (and owns the state_dict key) first."""

    def __init__(self, first: dict, second: dict) -> None:
        super().__init__()
        self.a = nn.Embedding(V, D, **first)
        self.b = nn.Embedding(V, D, **second)
        self.b.weight = self.a.weight

    def forward(self, ids):
        return self.a(ids) + self.b(ids)


def _state_bits(module) -> dict[str, bytes]:
    return {key: _bits(value) for key, value in module.state_dict().items()}


# ----------------------------------------------------------------------------- 1. bfloat16 parity


def test_bfloat16_dynamo_store_passes_parity_with_the_onnx_model(tmp_path: Path) -> None:
    """The dynamo exporter keeps the table in model.onnx.data; the onnx-model reference reads it bitwise."""
    model = _seeded(Emb, None, 64, 16).to(torch.bfloat16)  # big enough for the exporter's external data
    store = extract_torch(model, (torch.tensor([[1, 2, 3]]),), tmp_path / "out", dynamo=True)
    assert "model.onnx.data" in store.manifest["files"]
    report = store_parity(store)
    assert report, report.to_text()
    assert "onnx-model" in {c.backend for c in report.comparisons}


def _external_gather_model(tmp_path: Path, data: np.ndarray) -> onnx.ModelProto:
    table = numpy_helper.from_array(data, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", table.data_type, None)], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return onnx.load(tmp_path / "m.onnx", load_external_data=False)


def test_onnx_reference_reads_external_bfloat16_bitwise(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((V, D)).astype(ml_dtypes.bfloat16)
    model = _external_gather_model(tmp_path, data)
    (ref,) = scan(model)
    ids = np.array([0, 7, V - 1, 7])
    out = onnx_gather_reference(model, ref, tmp_path)(ids)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16) and _bits(out) == _bits(data[ids])


def test_onnx_reference_failure_is_a_bridge_error(tmp_path: Path) -> None:
    """onnxruntime's CPU Gather has no float8 kernel: a ParityError naming the table, not a RuntimeError."""
    data = np.random.default_rng(0).standard_normal((V, D)).astype(ml_dtypes.float8_e4m3fn)
    model = _external_gather_model(tmp_path, data)
    (ref,) = scan(model)
    with pytest.raises(ParityError, match="'table'"):
        onnx_gather_reference(model, ref, tmp_path)


# ----------------------------------------------------------------------------- 2. max_norm


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_extract_leaves_a_max_norm_module_untouched(tmp_path: Path, dynamo: bool) -> None:
    model = _seeded(Emb, {"max_norm": 0.5})
    before = _state_bits(model)
    original = model.emb.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    assert bool((original[ids].norm(dim=-1) > 0.5).all())  # forward would renormalize these rows
    store = extract_torch(model, (ids,), tmp_path / "out", dynamo=dynamo)
    assert _state_bits(model) == before
    assert model.emb.max_norm == 0.5 and model.training
    table = store["emb.weight"]
    assert _bits(table.data) == _bits(original)  # stored as it was, mapped to its key
    assert table.sources[0].weight == "emb.weight"
    assert any("'emb' has nn.Embedding(max_norm=0.5)" in w for w in store.manifest["provenance"]["warnings"])


def test_both_exporters_store_the_same_max_norm_table(tmp_path: Path) -> None:
    ids = (torch.tensor([1, 2, 3, 9]),)
    legacy = extract_torch(_seeded(Emb, {"max_norm": 1.0}), ids, tmp_path / "legacy")
    dynamo = extract_torch(_seeded(Emb, {"max_norm": 1.0}), ids, tmp_path / "dynamo", dynamo=True)
    assert list(legacy) == list(dynamo) == ["emb.weight"]
    assert _bits(legacy["emb.weight"].data) == _bits(dynamo["emb.weight"].data)
    assert legacy["emb.weight"].metadata["torch"] == dynamo["emb.weight"].metadata["torch"]


# ----------------------------------------------------------------------------- 3. input names, dynamic_axes


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_axes_by_forward_parameter_name(tmp_path: Path, dynamo: bool) -> None:
    model = _seeded(Emb)
    store = extract_torch(model, (torch.tensor([[1, 2, 3]]),), tmp_path / "out", dynamo=dynamo,
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    graph = onnx.load(store.path / "model.onnx", load_external_data=False).graph
    assert [i.name for i in graph.input] == ["ids"]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    batch = np.random.default_rng(0).integers(0, V, size=(3, 7))
    assert _bits(_run_ort(store.path / "model.onnx", {"ids": batch})[0]) == _bits(model(torch.from_numpy(batch)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_axes_on_the_second_input_only(tmp_path: Path, dynamo: bool) -> None:
    """The dynamo exporter matches axes to inputs by position: they must reach the second input, not the first."""
    model = _seeded(TokPos)
    example = (torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]))
    path = export_onnx(model, example, tmp_path / "m.onnx", dynamo=dynamo, input_names=["tok_ids", "pos_ids"],
                       dynamic_axes={"pos_ids": {0: "b", 1: "s"}})
    inputs = onnx.load(path, load_external_data=False).graph.input
    assert [i.name for i in inputs] == ["tok_ids", "pos_ids"]
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs] == [[1, 3], ["b", "s"]]
    tokens, positions = np.array([[4, 0, V - 1]]), np.tile(np.arange(5), (2, 1))
    vectors, rows = _run_ort(path, {"tok_ids": tokens, "pos_ids": positions})
    assert _bits(rows) == _bits(model.pos(torch.from_numpy(positions)))
    assert _bits(vectors) == _bits(model.tok(torch.from_numpy(tokens)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_unknown_dynamic_axes_key_is_an_input_error(tmp_path: Path, dynamo: bool) -> None:
    with pytest.raises(InputError, match=r"\['input'\].*\['ids'\]"):
        extract_torch(_seeded(Emb), (torch.tensor([[1, 2]]),), tmp_path / "out", dynamo=dynamo,
                      dynamic_axes={"input": {0: "batch"}})


def test_input_names_must_name_every_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input_names"):
        export_onnx(_seeded(TokPos), (torch.tensor([1]), torch.tensor([0])), tmp_path / "m.onnx",
                    input_names=["tokens"])


# ----------------------------------------------------------------------------- 4. shared tables


@pytest.mark.parametrize(("first", "second"), [
    pytest.param({}, {"padding_idx": 0}, id="plain-first"),
    pytest.param({"padding_idx": 0}, {}, id="padded-first"),
])
def test_shared_table_with_disagreeing_padding_idx(tmp_path: Path, first: dict, second: dict) -> None:
    model = _seeded(Shared, first, second)
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    (name,) = list(store)
    assert store[name].padding_id is None
    assert [s.layer for s in store[name].sources] == ["a", "b"]
    (warning,) = [w for w in store.manifest["provenance"]["warnings"] if "padding_idx" in w]
    assert "'a' padding_idx=" in warning and "'b' padding_idx=" in warning


def test_shared_table_with_agreeing_padding_idx_and_max_norm_warnings(tmp_path: Path) -> None:
    model = _seeded(Shared, {"padding_idx": 2}, {"padding_idx": 2, "max_norm": 1.0})
    before = _state_bits(model)
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    assert _state_bits(model) == before
    assert store["a.weight"].padding_id == 2
    warns = store.manifest["provenance"]["warnings"]
    (warn,) = [w for w in warns if "max_norm" in w]
    assert warn.startswith("table 'a.weight': 'b' has nn.Embedding(max_norm=1.0), which renormalizes looked-up "
                           "rows in place on every forward; the store holds the weight as it was before export")
    assert "model.onnx renormalize" in warn
    assert not any("disagree" in w for w in warns)


# ----------------------------------------------------------------------------- 5. bad example inputs


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize(("ids", "match"), [
    pytest.param(torch.tensor([1.0, 2.0]), r"'emb' \(20 rows\) gets ids of dtype torch.float32", id="float"),
    pytest.param(torch.tensor([3, V]), r"'emb' \(20 rows\) gets ids from 3 to 20; they must be in \[0, 20\)",
                 id="too-large"),
    pytest.param(torch.tensor([-1, 2]), r"ids from -1 to 2", id="negative"),
    pytest.param(np.array([1, 2]), r"example input 0 is of type numpy.ndarray.*torch.from_numpy",
                 id="numpy"),
])
def test_bad_example_inputs_are_input_errors(tmp_path: Path, dynamo: bool, ids, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        extract_torch(_seeded(Emb), (ids,), tmp_path / "out", dynamo=dynamo)
    assert "dynamo=" not in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_ids_of_an_embedding_bag(tmp_path: Path) -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(V, D, mode="sum")

        def forward(self, ids, offsets):
            return self.bag(ids, offsets)

    with pytest.raises(InputError, match=r"EmbeddingBag 'bag' \(20 rows\) gets ids from 1 to 25"):
        export_onnx(Bag(), (torch.tensor([1, 25]), torch.tensor([0])), tmp_path / "m.onnx")


class _Counting(nn.Module):
    """An embedding whose forward updates a buffer, and takes keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(V, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        out = self.a(ids)
        return out if extra is None else out + extra


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_nested_example_inputs_and_buffers(tmp_path: Path, dynamo: bool) -> None:
    """A trailing dict of keyword arguments is accepted (torch.onnx's convention), and neither the ids check's
    own forward run nor the legacy exporter's trace changes the buffers."""
    module = _seeded(_Counting)
    before = module.calls.clone()
    ids = torch.tensor([[1, 2, 3]])
    extract_torch(module, (ids, {"extra": torch.ones(1, 3, 4)}), tmp_path / "out", dynamo=dynamo)
    assert _bits(module.calls) == _bits(before)


# ----------------------------------------------------------------------------- to_torch_embedding over a store


def test_a_shared_weight_over_a_store_is_copy_on_write(tmp_path: Path) -> None:
    """torch has no read-only tensors: a write through a weight over the read-only map crashed the process.
    The map is opened again copy-on-write: the same bits, the write stays in this process, the store verifies."""
    import ml_dtypes

    from bridge import EmbeddingTable, open_store, write_store
    from converters.torch_embedding import to_torch_embedding

    tables = [EmbeddingTable("a", np.arange(48, dtype=np.float32).reshape(12, 4)),
              EmbeddingTable("b", np.arange(40, dtype=np.float32).reshape(10, 4).astype(ml_dtypes.bfloat16))]
    write_store(tmp_path / "s", tables)
    store = open_store(tmp_path / "s")
    for name, bits in (("a", torch.int32), ("b", torch.int16)):
        table = store[name]
        emb = to_torch_embedding(table, copy=False)
        assert emb.weight.detach().view(bits).numpy().tobytes() == np.asarray(table.data).tobytes()
        with torch.no_grad():
            emb.weight[0].fill_(7)
        assert emb.weight[0, 0].item() == 7 and np.asarray(table.data[0, 0]).astype(np.float32) == 0
    open_store(tmp_path / "s")  # verifies every sha256: the files are untouched


def test_to_torch_embedding_refuses_what_it_cannot_share_or_serve() -> None:
    from bridge import EmbeddingTable
    from bridge.quantization import Quantization
    from converters.torch_embedding import to_torch_embedding

    with pytest.raises(InputError, match="expected an EmbeddingTable, got ndarray"):
        to_torch_embedding(np.ones((3, 2), np.float32))  # type: ignore[arg-type]
    read_only = np.ones((3, 2), np.float32)
    read_only.setflags(write=False)
    with pytest.raises(InputError, match="read-only and not a file mapping"):
        to_torch_embedding(EmbeddingTable("t", read_only), copy=False)
    quantized = EmbeddingTable("q", np.ones((3, 2), np.int8), quantization=Quantization("row_div", np.ones(3, "f4")))
    with pytest.raises(UnsupportedError, match=r"bridge.quantization.dense\(table\)"):
        to_torch_embedding(quantized)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_axes_with_nested_inputs_is_an_input_error(tmp_path: Path, dynamo: bool) -> None:
    """The exporters ignore them (legacy) or fail obscurely (dynamo) there: refused, saying what to do."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="dynamic_axes needs one tensor per example input"):
        extract_torch(_seeded(_Counting), (ids, {"extra": torch.ones(1, 3, 4)}), tmp_path / "out", dynamo=dynamo,
                      dynamic_axes={"ids": {0: "b"}})


def test_a_table_whose_store_was_replaced_is_not_served_from_the_new_file(tmp_path: Path) -> None:
    from bridge import EmbeddingTable, open_store, write_store
    from converters.torch_embedding import to_torch_embedding

    write_store(tmp_path / "s", [EmbeddingTable("t", np.ones((4, 2), np.float32))])
    table = open_store(tmp_path / "s")["t"]
    write_store(tmp_path / "s", [EmbeddingTable("t", np.full((4, 2), 7, np.float32))], force=True)
    with pytest.raises(InputError, match="changed since this table was opened"):
        to_torch_embedding(table, copy=False)
