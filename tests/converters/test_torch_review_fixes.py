"""extract_torch review fixes: tables named by their exact state_dict key, buffers restored after the
legacy exporter's own forward run, TorchScript modules mapped, non-tensor state_dict entries skipped,
and an ExportedProgram's module refused with a library error.

Real torch, torch.onnx (legacy and dynamo exporters); no mocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
nn = torch.nn

from test_torch import EXPORTERS, TiedLM, _bits, _seeded  # noqa: E402 - the helpers of test_torch.py
from test_torch_export_fixes import Emb, _state_bits  # noqa: E402

from bridge.errors import InputError  # noqa: E402
from bridge.store import open_store  # noqa: E402
from converters.torch import extract_torch  # noqa: E402
from converters.torch_export import torch_tables  # noqa: E402

V, D = 10, 4


class Keyed(nn.Module):
    """Embeddings under ModuleDict keys (torch allows '/', ':' and ',' in them) and one plain ``tok``."""

    def __init__(self, *keys: str) -> None:
        super().__init__()
        self.feats = nn.ModuleDict({key: nn.Embedding(V, D) for key in keys})
        self.tok = nn.Embedding(V, D)

    def forward(self, ids):
        return [self.feats[key](ids) for key in self.feats] + [self.tok(ids)]


def _sources(store) -> dict[str, list[str]]:
    return {name: [s.weight for s in store[name].sources] for name in store}


def _holds(store, name: str, weight) -> bool:
    return _bits(store[name].data) == _bits(weight)


# ----------------------------------------------------------------------------- 1. names


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_slash_in_a_module_dict_key_keeps_every_exact_key(tmp_path: Path, dynamo: bool) -> None:
    """'feats.user/tok.weight' was named 'tok.weight' (its part after the '/'), taking the real tok's name."""
    model = _seeded(Keyed, "user/tok")
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out", dynamo=dynamo)
    assert _sources(store) == {"feats.user/tok.weight": ["feats.user/tok.weight"], "tok.weight": ["tok.weight"]}
    assert _holds(store, "tok.weight", model.tok.weight)
    assert _holds(store, "feats.user/tok.weight", model.feats["user/tok"].weight)
    assert open_store(store.path)["tok.weight"].sources[0].weight == "tok.weight"
    assert store.manifest["provenance"]["warnings"] == []


def test_a_colon_key_does_not_collide_with_an_underscore_key(tmp_path: Path) -> None:
    """'ctx:1' was sanitized to 'ctx_1', the name of another embedding's exact key."""
    model = _seeded(Keyed, "ctx:1", "ctx_1")
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    assert set(store) == {"feats.ctx:1.weight", "feats.ctx_1.weight", "tok.weight"}
    assert all(sources == [name] for name, sources in _sources(store).items())
    assert _holds(store, "feats.ctx_1.weight", model.feats["ctx_1"].weight)
    assert _holds(store, "feats.ctx:1.weight", model.feats["ctx:1"].weight)


def test_an_altered_key_never_takes_an_exact_key(tmp_path: Path) -> None:
    """A comma cannot be in a table name (``--tables a,b``): 'a,b' becomes 'a_b', which another key owns."""
    model = _seeded(Keyed, "a,b", "a_b")
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    assert _sources(store) == {"feats.a_b.weight_2": ["feats.a,b.weight"], "feats.a_b.weight": ["feats.a_b.weight"],
                               "tok.weight": ["tok.weight"]}
    assert _holds(store, "feats.a_b.weight", model.feats["a_b"].weight)
    assert _holds(store, "feats.a_b.weight_2", model.feats["a,b"].weight)
    warns = store.manifest["provenance"]["warnings"]
    assert any("'feats.a_b.weight_2' holds state_dict key 'feats.a,b.weight'" in w for w in warns), warns


def test_an_unmapped_table_never_takes_an_exact_key(tmp_path: Path) -> None:
    """A table matching no key comes first and its initializer is named like a key: the key keeps its name."""
    model = _seeded(Emb, None, V, D)
    weight = model.emb.weight.detach().numpy()
    other = np.random.default_rng(0).standard_normal((V, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", [table, "ids"], [out]) for table, out in (("emb.weight", "a"), ("w", "b"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, D]) for out in ("a", "b")],
        initializer=[numpy_helper.from_array(other, "emb.weight"), numpy_helper.from_array(weight, "w")])
    tables, warns = torch_tables(helper.make_model(graph), None, model)
    named = {t.name: t for t in tables}
    assert set(named) == {"emb.weight", "emb.weight_2"}
    assert named["emb.weight"].initializer == "w" and _bits(named["emb.weight"].data) == _bits(weight)
    assert named["emb.weight_2"].sources == () and _bits(named["emb.weight_2"].data) == _bits(other)


# ----------------------------------------------------------------------------- 2, 5. buffers


class Stateful(nn.Module):
    """A forward that updates buffers in place (a counter, a running mean) and replaces one with another shape
    (a growing cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(D))
        self.register_buffer("cache", torch.zeros(0, D))

    def forward(self, ids):
        h = self.emb(ids)
        self.calls += 1
        self.ema.mul_(0.9).add_(0.1 * h.mean(0))
        self.cache = torch.cat([self.cache, h])
        return h


def test_the_legacy_exporters_forward_run_leaves_buffers_as_they_were(tmp_path: Path) -> None:
    """The legacy exporter runs forward while tracing; counter, statistic and cache are all restored (the
    cache, replaced by one of another shape, made the ids check's restore raise a raw RuntimeError)."""
    model = _seeded(Stateful)
    before = _state_bits(model)
    tensors = {name: b for name, b in model.named_buffers()}
    store = extract_torch(model, (torch.tensor([1, 2]),), tmp_path / "out")
    assert _state_bits(model) == before
    assert {name: b for name, b in model.named_buffers()} == tensors  # the same tensor objects
    assert all(model.get_buffer(name) is b for name, b in tensors.items())
    assert tuple(model.cache.shape) == (0, D)
    assert _holds(store, "emb.weight", model.emb.weight)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, ids):
        self.calls += 1
        return self.emb(ids)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_counter_buffer_is_untouched_by_both_exporters(tmp_path: Path, dynamo: bool) -> None:
    model = _seeded(Counting)
    extract_torch(model, (torch.tensor([[1, 2]]),), tmp_path / "out", dynamo=dynamo)
    assert int(model.calls) == 0


# ----------------------------------------------------------------------------- 3. TorchScript



def test_a_scripted_module_keeps_its_padding_idx(tmp_path: Path) -> None:
    """get_submodule is not supported on ScriptModules: a raw RuntimeError after a successful export."""
    model = _seeded(TiedLM)
    store = extract_torch(torch.jit.script(model), (torch.tensor([[1, 2]]),), tmp_path / "out")
    assert list(store) == ["emb.weight"]
    table = store["emb.weight"]
    assert table.padding_id == 1 and _holds(store, "emb.weight", model.emb.weight)  # TiedLM's padding_idx
    assert table.metadata["torch"]["modules"] == {"emb": "Embedding", "head": "Linear"}
    assert store.manifest["provenance"]["warnings"] == []


def test_a_traced_module_warns_that_its_padding_idx_is_unknown(tmp_path: Path) -> None:
    """A traced embedding keeps no padding_idx: it was dropped silently."""
    model = _seeded(TiedLM)
    ids = torch.tensor([[1, 2]])
    store = extract_torch(torch.jit.trace(model, ids), (ids,), tmp_path / "out")
    table = store["emb.weight"]
    assert table.padding_id is None and _holds(store, "emb.weight", model.emb.weight)
    assert table.metadata["torch"]["modules"] == {"emb": "Embedding", "head": "Linear"}
    warns = store.manifest["provenance"]["warnings"]
    assert any("'emb' is a traced embedding (torch.jit.trace)" in w and "pass the nn.Module itself" in w
               for w in warns), warns


# ----------------------------------------------------------------------------- 4. extra state


class WithExtra(Emb):
    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state) -> None:
        pass


def test_a_non_tensor_state_dict_entry_is_skipped(tmp_path: Path) -> None:
    """get_extra_state puts a dict in the state_dict: a raw AttributeError ('dict' has no 'dim'). (The legacy
    exporter's tracer cannot take such a module itself: a ConversionError that says to try dynamo=True.)"""
    model = _seeded(WithExtra)
    assert not isinstance(model.state_dict()["_extra_state"], torch.Tensor)
    store = extract_torch(model, (torch.tensor([[1, 2, 3]]),), tmp_path / "out", dynamo=True)
    assert list(store) == ["emb.weight"] and _holds(store, "emb.weight", model.emb.weight)


# ----------------------------------------------------------------------------- 6. ExportedProgram


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_an_exported_programs_module_is_an_input_error(tmp_path: Path, dynamo: bool) -> None:
    """ep.module() cannot switch to eval mode: a raw NotImplementedError from module.eval()."""
    ids = torch.tensor([[1, 2]])
    module = torch.export.export(_seeded(Emb), (ids,)).module()
    with pytest.raises(InputError, match=r"torch.export ExportedProgram's .module\(\): pass the original nn.Module"):
        extract_torch(module, (ids,), tmp_path / "out", dynamo=dynamo)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
