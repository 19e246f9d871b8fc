"""bridge.scan: tables read with ``Slice`` (``W[:n]``, keras-hub position embeddings), checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bridge.extract import tables_from_onnx
from bridge.onnx_io import initializer_array
from bridge.scan import TableRef, Use, scan, scan_model, table_tensor

RNG = np.random.default_rng(7)


def _table(rows: int = 10, dim: int = 4) -> np.ndarray:
    return RNG.standard_normal((rows, dim)).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def slice_model(onnx_kit, table: np.ndarray, starts: np.ndarray, *, axes: np.ndarray | None = None,
                steps: np.ndarray | None = None, chain: tuple[str, ...] = ()) -> onnx.ModelProto:
    """``out = Slice(chain(W), starts, ends=[n, dim], axes, steps)`` with ``n`` computed from the input ``n``."""
    nodes, current = [], "W"
    for i, op in enumerate(chain):
        nodes.append(helper.make_node(op, [current], [f"link_{i}"], name=f"link_{i}"))
        current = f"link_{i}"
    inits = [onnx_kit.init("W", table), onnx_kit.init("starts", starts), onnx_kit.init("dim", _i64(table.shape[1]))]
    nodes.append(helper.make_node("Concat", ["n", "dim"], ["ends"], axis=0, name="ends"))
    inputs = [current, "starts", "ends"]
    if axes is not None:
        inits.append(onnx_kit.init("axes", axes))
        inputs.append("axes")
    if steps is not None:
        inits.append(onnx_kit.init("steps", steps))
        inputs += ([] if axes is not None else [""]) + ["steps"]
    nodes.append(helper.make_node("Slice", inputs, ["out"], name="slice"))
    return onnx_kit.model(nodes, [onnx_kit.ids("n", (1,))], [onnx_kit.value("out", shape=[None, table.shape[1]])],
                          inits)


def _run(onnx_kit, model: onnx.ModelProto, n: int) -> np.ndarray:
    (out,) = onnx_kit.run_ort(model, {"n": _i64(n)})
    return out


def test_slice_from_row_zero_is_a_table(onnx_kit) -> None:
    table = _table()
    model = slice_model(onnx_kit, table, _i64(0, 0))
    (ref,) = scan(model)
    assert ref == TableRef(initializer="W", shape=(10, 4), dtype="float32", graph="", gathers=(),
                           slices=(Use("slice", "Slice", "", 0, ()),))
    assert [c["role"] for c in ref.to_json()["consumers"]] == ["slice"]
    values = initializer_array(table_tensor(model, ref), None)
    assert values.tobytes() == table.tobytes()
    for n in (1, 6, 10):
        assert _run(onnx_kit, model, n).tobytes() == values[:n].tobytes()


def test_slice_with_axes_and_unit_steps_through_identity(onnx_kit) -> None:
    table = _table(rows=7, dim=3)
    model = slice_model(onnx_kit, table, _i64(0, 0), axes=_i64(0, -1), steps=_i64(1, 1), chain=("Identity",))
    (ref,) = scan(model)
    assert ref.slices == (Use("slice", "Slice", "", 0, ("Identity",)),)
    assert _run(onnx_kit, model, 5).tobytes() == table[:5].tobytes()


def test_slice_on_rows_only_is_a_table(onnx_kit) -> None:
    table = _table(rows=9, dim=2)
    nodes = [helper.make_node("Slice", ["W", "starts", "n", "axes"], ["out"], name="rows")]
    model = onnx_kit.model(nodes, [onnx_kit.ids("n", (1,))], [onnx_kit.value("out", shape=[None, 2])],
                           [onnx_kit.init("W", table), onnx_kit.init("starts", _i64(0)),
                            onnx_kit.init("axes", _i64(0))])
    (ref,) = scan(model)
    assert [u.node for u in ref.slices] == ["rows"]
    assert _run(onnx_kit, model, 4).tobytes() == table[:4].tobytes()


def test_slices_not_starting_at_row_zero_are_rejected_with_a_reason(onnx_kit) -> None:
    table = _table()
    cases = {
        "starts at [2, 0]": slice_model(onnx_kit, table, _i64(2, 0)),
        "columns only": slice_model(onnx_kit, table, _i64(0), axes=_i64(1)),
        "steps [2, 1]": slice_model(onnx_kit, table, _i64(0, 0), axes=_i64(0, 1), steps=_i64(2, 1)),
    }
    for reason, model in cases.items():
        result = scan_model(model)
        assert result.tables == (), reason
        (note,) = result.not_tables
        assert note.initializer == "W" and reason in note.reason, (reason, note.reason)


def test_slice_with_computed_start_is_rejected(onnx_kit) -> None:
    table = _table()
    nodes = [helper.make_node("Slice", ["W", "n", "n"], ["out"], name="moving")]
    model = onnx_kit.model(nodes, [onnx_kit.ids("n", (1,))], [onnx_kit.value("out", shape=[None, 4])],
                           [onnx_kit.init("W", table)])
    result = scan_model(model)
    assert result.tables == ()
    assert "computed row" in result.not_tables[0].reason


def test_slices_of_other_ranks_are_neither_tables_nor_reported(onnx_kit) -> None:
    shape_const = _i64(3, 8, 4)
    nodes = [helper.make_node("Slice", ["S", "zero", "n"], ["out"], name="shape_part")]
    model = onnx_kit.model(nodes, [onnx_kit.ids("n", (1,))], [onnx_kit.value("out", TensorProto.INT64, [None])],
                           [onnx_kit.init("S", shape_const), onnx_kit.init("zero", _i64(0))])
    result = scan_model(model)
    assert result.tables == () and result.not_tables == ()


def test_table_read_by_gather_and_slice_lists_both(onnx_kit) -> None:
    table = _table(rows=8, dim=3)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["rows"], name="lookup"),
             helper.make_node("Slice", ["W", "zero", "n", "axes"], ["first"], name="first_rows")]
    model = onnx_kit.model(
        nodes, [onnx_kit.ids(), onnx_kit.ids("n", (1,))],
        [onnx_kit.value("rows", shape=["k", 3]), onnx_kit.value("first", shape=[None, 3])],
        [onnx_kit.init("W", table), onnx_kit.init("zero", _i64(0)), onnx_kit.init("axes", _i64(0))])
    (ref,) = scan(model)
    assert [u.node for u in ref.gathers] == ["lookup"] and [u.node for u in ref.slices] == ["first_rows"]
    assert [c["role"] for c in ref.to_json()["consumers"]] == ["gather", "slice"]


def test_opset_9_slice_attributes_are_read(onnx_kit) -> None:
    table = _table(rows=6, dim=2)
    node = helper.make_node("Slice", ["W"], ["out"], starts=[0], ends=[3], axes=[0], name="old")
    model = onnx_kit.model([node], [], [onnx_kit.value("out", shape=[3, 2])], [onnx_kit.init("W", table)], opset=9)
    (ref,) = scan(model)
    assert [u.node for u in ref.slices] == ["old"]
    (out,) = onnx_kit.run_ort(model, {})
    assert out.tobytes() == table[:3].tobytes()


def test_slice_read_table_is_extracted_whole(onnx_kit) -> None:
    table = _table(rows=12, dim=5)
    model = slice_model(onnx_kit, table, _i64(0, 0))
    (extracted,) = tables_from_onnx(model, None)
    assert extracted.shape == (12, 5) and np.asarray(extracted.data).tobytes() == table.tobytes()
    assert extracted.metadata["onnx"]["consumers"][0]["role"] == "slice"
