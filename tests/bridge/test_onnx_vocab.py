"""bridge.onnx_vocab: vocabularies read from the ai.onnx.ml CategoryMapper feeding a table, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bridge.extract import tables_from_onnx
from bridge.onnx_vocab import attach_onnx_vocabularies, onnx_vocabularies

RNG = np.random.default_rng(3)
ML = "ai.onnx.ml"


def mapper(name: str, source: str, out: str, cats: list[str], ids: list[int], default: int) -> onnx.NodeProto:
    return helper.make_node("CategoryMapper", [source], [out], domain=ML, name=name,
                            cats_strings=[c.encode() for c in cats], cats_int64s=ids, default_int64=default)


def keras_wrap(ids: str, rows: int, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Keras's negative-id wrap as tf2onnx writes it: ``where(ids < 0, ids + rows, ids)``."""
    nodes = [
        helper.make_node("Less", [ids, "zero"], ["neg"], name="less"),
        helper.make_node("Add", [ids, "rows"], ["shifted"], name="shift"),
        helper.make_node("Where", ["neg", "shifted", ids], [out], name="wrap"),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("rows", TensorProto.INT64, [], [rows])]
    return nodes, inits


def lookup_model(onnx_kit, table: np.ndarray, cats: list[str], ids: list[int], default: int,
                 extra: list[onnx.NodeProto] = (), extra_inits: list[onnx.TensorProto] = (),
                 gather_ids: str = "wrapped") -> onnx.ModelProto:
    """tokens -> CategoryMapper -> wrap -> Gather(W)."""
    wrap, wrap_inits = keras_wrap("mapped", table.shape[0], "wrapped")
    nodes = [mapper("lookup", "tokens", "mapped", cats, ids, default), *wrap, *extra,
             helper.make_node("Gather", ["W", gather_ids], ["vectors"], name="gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["n", table.shape[1]])],
                              initializer=[onnx_kit.init("W", table), *wrap_inits, *extra_inits])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ML, 2)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=onnx_kit.IR_VERSION)
    onnx.checker.check_model(model)
    return model


def test_string_lookup_vocabulary_is_read_and_serves_the_same_rows(onnx_kit) -> None:
    table = RNG.standard_normal((4, 3)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["red", "green", "blue"], [1, 2, 3], 0)
    (found,) = onnx_vocabularies(model).values()
    assert found.vocabulary.tokens == ["[UNK]", "red", "green", "blue"]
    assert found.vocabulary.oov_id == 0 and found.vocabulary.reserved == {"oov": 0}
    assert found.metadata["node"] == "lookup" and found.metadata["default_int64"] == 0
    tokens = ["blue", "nope", "red", "", "green", "blue"]
    (got,) = onnx_kit.run_ort(model, {"tokens": np.array(tokens, dtype=object)})
    assert got.tobytes() == np.take(table, found.vocabulary.ids(tokens), axis=0).tobytes()


def test_ids_no_category_names_get_placeholders(onnx_kit) -> None:
    table = RNG.standard_normal((5, 2)).astype(np.float32)
    # StringLookup(mask_token="") as tf2onnx writes it: the mask (0) is tested elsewhere, OOV is 1
    model = lookup_model(onnx_kit, table, ["a", "b", "c"], [2, 3, 4], 1)
    (found,) = onnx_vocabularies(model).values()
    assert found.vocabulary.tokens == ["[unused0]", "[UNK]", "a", "b", "c"]
    assert found.vocabulary.oov_id == 1 and found.metadata["unnamed_ids"] == [0]


def test_category_named_unk_keeps_its_id(onnx_kit) -> None:
    table = RNG.standard_normal((3, 2)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["[UNK]", "x"], [1, 2], 0)
    (found,) = onnx_vocabularies(model).values()
    assert found.vocabulary.tokens == ["[unused0]", "[UNK]", "x"] and found.vocabulary.oov_id == 0


def test_a_mask_test_cast_to_bool_is_not_followed(onnx_kit) -> None:
    table = RNG.standard_normal((4, 2)).astype(np.float32)
    extra = [
        mapper("is_mask", "tokens", "mask_hit", [""], [1], 0),
        helper.make_node("Cast", ["mask_hit"], ["mask_bool"], to=TensorProto.BOOL, name="mask_bool"),
        helper.make_node("Not", ["mask_bool"], ["keep_bool"], name="keep"),
        helper.make_node("Cast", ["keep_bool"], ["keep_int"], to=TensorProto.INT64, name="keep_int"),
        helper.make_node("Mul", ["wrapped", "keep_int"], ["masked"], name="apply_mask"),
    ]
    model = lookup_model(onnx_kit, table, ["a", "b", "c"], [1, 2, 3], 0, extra=extra, gather_ids="masked")
    (found,) = onnx_vocabularies(model).values()
    assert found.metadata["node"] == "lookup" and found.vocabulary.tokens[1:] == ["a", "b", "c"]


def test_two_different_mappers_give_no_vocabulary(onnx_kit) -> None:
    table = RNG.standard_normal((6, 2)).astype(np.float32)
    extra = [mapper("other", "tokens", "other_ids", ["z"], [5], 0),
             helper.make_node("Add", ["wrapped", "other_ids"], ["both"], name="mix")]
    model = lookup_model(onnx_kit, table, ["a"], [1], 0, extra=extra, gather_ids="both")
    assert onnx_vocabularies(model) == {}


def test_table_without_mapper_gets_nothing(onnx_kit) -> None:
    model = onnx_kit.gather_model(RNG.standard_normal((5, 2)).astype(np.float32))
    assert onnx_vocabularies(model) == {}
    (table,) = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    assert table.vocab is None


def test_attach_sets_vocabulary_and_oov_row_on_extracted_tables(onnx_kit) -> None:
    table = RNG.standard_normal((4, 3)).astype(np.float32)
    model = lookup_model(onnx_kit, table, ["red", "green", "blue"], [1, 2, 3], 0)
    (extracted,) = attach_onnx_vocabularies(model, tables_from_onnx(model, None))
    assert extracted.vocab is not None and extracted.vocab.tokens[1:] == ["red", "green", "blue"]
    assert extracted.oov_id == 0
    assert extracted.metadata["vocabulary"]["source"] == "onnx CategoryMapper"
    assert extracted.metadata["onnx"]["initializer"] == "W"
