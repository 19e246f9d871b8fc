"""CategoryMapper ids beyond the table: the vocabulary is bounded by the table's rows.

A mapper's ``default_int64`` or category ids are arbitrary int64s in the model file; ``2**62`` or
``3_000_000_000`` must not size a list (MemoryError, or ~24 GB). Ids ``>= rows`` name no row, so
such tokens are left out (noted in ``metadata["vocabulary"]["out_of_range"]``), a default beyond the
table gives no OOV id, and a vocabulary never has more entries than its table has rows. The
allocating calls run under an address-space cap (Linux) so that a regression fails at once instead
of exhausting the machine's memory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bridge import onnx_vocab, open_store
from bridge.extract import extract, tables_from_onnx
from bridge.onnx_vocab import attach_onnx_vocabularies, onnx_vocabularies
from bridge.table import EmbeddingTable

ML = "ai.onnx.ml"
RNG = np.random.default_rng(5)
HUGE = 3_000_000_000  # [None] * (HUGE + 1) would be ~24 GB of pointers


@contextmanager
def _memory_cap(extra: int = 1 << 30) -> Iterator[None]:
    """Limit this process's address space to its current size + ``extra`` while the block runs (Linux)."""
    status = Path("/proc/self/status")
    if not sys.platform.startswith("linux") or not status.exists():
        yield
        return
    import resource

    size = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapper(cats: list[str], ids: list[int], default: int) -> onnx.NodeProto:
    return helper.make_node("CategoryMapper", ["tokens"], ["mapped"], domain=ML, name="lookup",
                            cats_strings=[c.encode() for c in cats], cats_int64s=ids, default_int64=default)


def _model(onnx_kit, table: np.ndarray, cats: list[str], ids: list[int], default: int) -> onnx.ModelProto:
    """tokens -> CategoryMapper -> Gather(W)."""
    nodes = [_mapper(cats, ids, default), helper.make_node("Gather", ["W", "mapped"], ["vectors"], name="gather")]
    graph = onnx_kit.graph(nodes, [onnx_kit.value("tokens", TensorProto.STRING, ["n"])],
                           [onnx_kit.value("vectors", shape=["n", table.shape[1]])], [onnx_kit.init("W", table)])
    opsets = [helper.make_opsetid("", onnx_kit.OPSET), helper.make_opsetid(ML, 2)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=onnx_kit.IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _attached(model: onnx.ModelProto) -> EmbeddingTable:
    with _memory_cap():
        (table,) = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    return table


def test_default_far_beyond_the_table_extracts_without_an_oov_id(onnx_kit, tmp_path: Path) -> None:
    table = RNG.standard_normal((6, 3)).astype(np.float32)
    model = _model(onnx_kit, table, ["a", "b"], [1, 2], 2**62)
    onnx.save(model, tmp_path / "m.onnx")
    with _memory_cap():
        extract(tmp_path / "m.onnx", tmp_path / "out")
    stored = open_store(tmp_path / "out")["W"]
    assert stored.vocab is not None and stored.vocab.tokens == ["[unused0]", "a", "b"]
    assert stored.vocab.oov_id is None and stored.oov_id is None
    note = stored.metadata["vocabulary"]["out_of_range"]
    assert f"default_int64 {2**62}" in note and "no OOV id" in note and "token(s)" not in note
    (got,) = onnx_kit.run_ort(model, {"tokens": np.array(["b", "a"], dtype=object)})
    assert got.tobytes() == np.take(table, stored.vocab.ids(["b", "a"]), axis=0).tobytes()


def test_a_category_id_beyond_the_table_is_left_out(onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    extracted = _attached(_model(onnx_kit, table, ["a", "huge", "b"], [1, HUGE, 2], 0))
    assert extracted.vocab is not None and extracted.vocab.tokens == ["[UNK]", "a", "b"]
    assert extracted.oov_id == 0 and "huge" not in extracted.vocab.index
    meta = extracted.metadata["vocabulary"]
    assert meta["categories"] == 3 and meta["out_of_range"].startswith("1 token(s) map to an id >= 4")


def test_ids_at_the_last_row_are_kept_and_at_rows_are_dropped(onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    extracted = _attached(_model(onnx_kit, table, ["a", "b"], [2, 4], 3))
    assert extracted.vocab is not None and extracted.vocab.tokens == ["[unused0]", "[unused1]", "a", "[UNK]"]
    assert extracted.oov_id == 3 and len(extracted.vocab) == extracted.rows


def test_no_category_inside_the_table_gives_no_vocabulary(onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    model = _model(onnx_kit, table, ["a", "b"], [10, HUGE], 0)
    with _memory_cap():
        assert onnx_vocabularies(model) == {}
    assert _attached(model).vocab is None


def test_a_table_holding_no_values_gets_no_vocabulary(onnx_kit) -> None:
    """A ``[2**40, 0]`` table costs the model a few bytes; its rows must not size the vocabulary."""
    rows = 2**40
    nodes = [_mapper(["a", "z"], [1, rows - 1], rows - 2),
             helper.make_node("Gather", ["W", "mapped"], ["vectors"], name="gather")]
    graph = onnx_kit.graph(nodes, [onnx_kit.value("tokens", TensorProto.STRING, ["n"])],
                           [onnx_kit.value("vectors", shape=["n", 0])],
                           [helper.make_tensor("W", TensorProto.FLOAT, [rows, 0], [])])
    opsets = [helper.make_opsetid("", onnx_kit.OPSET), helper.make_opsetid(ML, 2)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=onnx_kit.IR_VERSION)
    with _memory_cap():
        assert onnx_vocabularies(model) == {}
    assert _attached(model).vocab is None


@pytest.mark.parametrize("rows", [1, 3, 50])
def test_mapper_vocabulary_never_exceeds_the_rows(rows: int) -> None:
    ids = [0, 2, 7, 49, HUGE, 2**62, 2**63 - 1]
    node = _mapper([f"t{i}" for i in range(len(ids))], ids, 2**63 - 1)
    with _memory_cap():
        found = onnx_vocab.mapper_vocabulary(node, rows=rows)
    assert found is not None and len(found.vocabulary) <= rows
    kept = [f"t{i}" for i, row in enumerate(ids) if row < rows]
    assert [t for t in found.vocabulary.tokens if not t.startswith("[")] == kept
    assert found.vocabulary.oov_id is None
