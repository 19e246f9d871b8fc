"""The large-table path: tf2onnx converts a skeleton with small tables, the model reads the real ones from
the store's .npy files as ONNX external data.

Small tables (5000 x 16) with the path forced (``large=True`` or a low ``large_threshold``). Table
data is compared bitwise (a copy); whole-model outputs too where the output is the lookup itself,
and within atol=1e-6, rtol=1e-5 where pooling and a Dense layer follow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.errors import ChecksumError, ConversionError, UnsupportedError
from bridge.onnx_io import external_data_info, load_model
from bridge.store import open_store
from bridge.store_parity import store_parity
from converters.keras import ConversionResult, convert
from converters.keras_large import SKELETON_ROWS, patch_row_count
from converters.keras_parity import conversion_parity

ATOL, RTOL = 1e-6, 1e-5
ROWS, DIM = 5000, 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keras() -> Any:
    from converters.keras_env import import_keras

    return import_keras()[1]


def two_tables(keras: Any, ids_dtype: str = "int64") -> Any:
    """ids -> tok (5000 x 16) and small (6 x 16, stays inline) -> [Dense head over the sum, tok vectors].

    The outputs are listed in name order: keras_parity pairs Keras's output list with the ONNX
    outputs by position, and tf2onnx writes them sorted by name.
    """
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype=ids_dtype, name="ids")
    tok = keras.layers.Embedding(ROWS, DIM, name="tok")(ids)
    small = keras.layers.Embedding(6, DIM, name="small")(keras.ops.mod(ids, 6))
    pooled = keras.layers.GlobalAveragePooling1D(name="mean")(keras.layers.Add(name="sum")([tok, small]))
    return keras.Model(ids, [keras.layers.Dense(3, name="head")(pooled), tok], name="two_tables")


@pytest.fixture(scope="module")
def converted(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ConversionResult]:
    model = two_tables(keras)
    return model, convert(model, tmp_path_factory.mktemp("large") / "store", large=True)


def run_onnx(path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: ids}), strict=True))


def external_of(model_path: Path, initializer: str) -> Any:
    model = load_model(model_path)
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    return tensor, external_data_info(tensor)


# ----------------------------------------------------------------------------- the converted model


def test_model_reads_the_store_file_at_its_data_offset(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    entry = result.store.entry("tok")
    tensor, ext = external_of(result.onnx_path, entry["initializer"])
    assert ext is not None and ext.location == entry["file"] == "tables/tok.npy"
    assert (ext.offset, ext.length) == (entry["data_offset"], entry["nbytes"])
    assert ext.offset % 64 == 0 and list(tensor.dims) == [ROWS, DIM]
    raw = (result.store_path / entry["file"]).read_bytes()[ext.offset : ext.offset + ext.length]
    assert raw == np.asarray(result.keras_model.get_layer("tok").embeddings).tobytes()
    assert entry["metadata"]["onnx"]["external"] == {"location": "tables/tok.npy", "offset": ext.offset,
                                                     "length": ext.length}
    assert entry["metadata"]["onnx"]["shape"] == [ROWS, DIM]


def test_table_is_on_disk_once(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    table_bytes = ROWS * DIM * 4
    assert result.onnx_path.stat().st_size < table_bytes // 10
    files = [p for p in result.store_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size >= table_bytes for p in files) == 1


def test_small_table_stays_inline_and_is_stored(converted: tuple[Any, ConversionResult]) -> None:
    model, result = converted
    entry = result.store.entry("small")
    tensor, ext = external_of(result.onnx_path, entry["initializer"])
    assert ext is None and list(tensor.dims) == [6, DIM]
    assert np.array_equal(result.store["small"].data, np.asarray(model.get_layer("small").embeddings))
    assert [s.layer for s in result.store["small"].sources] == ["small"]


def test_tables_name_their_layers_and_provenance_records_the_path(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    assert {t.name: [s.layer for s in t.sources] for t in result.tables} == {"tok": ["tok"], "small": ["small"]}
    info = result.provenance["large_tables"]
    assert info["reason"] == "requested (large=True)"
    assert info["tables"]["tok"] == {"layers": ["tok"], "skeleton_rows": SKELETON_ROWS, "rows": ROWS,
                                     "wrap_constants_patched": 1}
    assert result.warnings == []


def test_onnxruntime_equals_keras_negative_ids_included(converted: tuple[Any, ConversionResult]) -> None:
    model, result = converted
    ids = np.array([[0, 1, ROWS - 1, -1, -ROWS, 17, 18, -17], [2500, -2, 4999, 3, -4999, 16, 0, 7]], np.int64)
    got = run_onnx(result.onnx_path, ids)
    head, vectors = (np.asarray(t) for t in model(ids))
    assert got["tok"].tobytes() == vectors.tobytes()
    np.testing.assert_allclose(got["head"], head, atol=ATOL, rtol=RTOL)
    table = np.asarray(model.get_layer("tok").embeddings)
    assert np.array_equal(got["tok"], table[ids % ROWS]), "negative ids wrap around the real row count"


def test_ids_past_the_table_fail_like_keras(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    with pytest.raises(Exception, match="out of data bounds|out of bounds|indices"):
        run_onnx(result.onnx_path, np.array([[ROWS]], np.int64))


def test_parity_of_every_backend_the_onnx_gather_and_keras(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    report = conversion_parity(result)
    assert report, report.to_text()
    names = {(c.table, c.backend) for c in report.comparisons}
    assert {("tok", "onnx-model"), ("tok", "keras"), ("tok", "numpy"), ("tok", "onnxruntime"),
            ("tok", "torch")} <= names


def test_wrap_policy_parity_on_the_external_table(converted: tuple[Any, ConversionResult]) -> None:
    _, result = converted
    report = store_parity(result.store_path, policy="wrap", onnx_model=result.onnx_path)
    assert report, report.to_text()
    assert any(c.backend == "onnx-model" for c in report.comparisons)


def test_manifest_sha256_verifies_and_detects_a_change(converted: tuple[Any, ConversionResult],
                                                       tmp_path: Path) -> None:
    _, result = converted
    open_store(result.store_path, verify=True)
    manifest = json.loads((result.store_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in result.store_path.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(result.store_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    data = bytearray((copy / "tables/tok.npy").read_bytes())
    data[-1] ^= 1
    (copy / "tables/tok.npy").write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        open_store(copy, verify=True)


# ----------------------------------------------------------------------------- choosing the path


def test_threshold_picks_the_path(keras: Any, tmp_path: Path) -> None:
    model = two_tables(keras, "int32")
    ordinary = convert(model, tmp_path / "ordinary")
    assert "large_tables" not in ordinary.provenance
    tensor, ext = external_of(ordinary.onnx_path, ordinary.store.entry("tok")["initializer"])
    assert ext is None and list(tensor.dims) == [ROWS, DIM]
    large = convert(model, tmp_path / "large", large_threshold=ROWS * DIM * 4)
    assert "threshold" in large.provenance["large_tables"]["reason"]
    ids = np.array([[3, -1, 4999, -5000]], np.int32)
    a, b = run_onnx(ordinary.onnx_path, ids), run_onnx(large.onnx_path, ids)
    assert a["tok"].tobytes() == b["tok"].tobytes()
    np.testing.assert_allclose(a["head"], b["head"], atol=ATOL, rtol=RTOL)


def test_large_false_keeps_the_ordinary_path(keras: Any, tmp_path: Path) -> None:
    result = convert(two_tables(keras), tmp_path / "s", large=False, large_threshold=1)
    assert "large_tables" not in result.provenance


def test_subclassed_model_is_refused_when_forced_and_converted_otherwise(keras: Any, tmp_path: Path) -> None:
    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="sub")
            self.emb = keras.layers.Embedding(100, 4, name="emb")

        def call(self, ids: Any) -> Any:
            return self.emb(ids)

    model = Sub()
    model(np.zeros((1, 2), np.int64))
    with pytest.raises(UnsupportedError, match="subclassed.*Functional or Sequential"):
        convert(model, tmp_path / "forced", large=True, input_signature={"ids": "int64"})
    assert not (tmp_path / "forced").exists()
    result = convert(model, tmp_path / "auto", large_threshold=1, input_signature={"ids": "int64"})
    assert "large_tables" not in result.provenance


# ----------------------------------------------------------------------------- model shapes


def test_nested_shared_and_twin_layers(keras: Any, tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    inner = keras.Input((None,), dtype="int64", name="inner_ids")
    encoder = keras.Model(inner, keras.layers.Embedding(300, 4, name="enc_emb")(inner), name="encoder")
    left = keras.Input((None,), dtype="int64", name="left")
    right = keras.Input((None,), dtype="int64", name="right")
    shared = keras.layers.Embedding(200, 4, name="shared_emb")
    twin_a, twin_b = keras.layers.Embedding(50, 4, name="twin_a"), keras.layers.Embedding(50, 4, name="twin_b")
    out = keras.layers.Concatenate(name="cat")([encoder(left), shared(left), shared(right), twin_a(left),
                                                twin_b(right)])
    model = keras.Model([left, right], out, name="shapes")
    twin_b.embeddings.assign(np.asarray(twin_a.embeddings))
    result = convert(model, tmp_path / "s", large=True)
    sources = {t.name: [s.layer for s in t.sources] for t in result.tables}
    assert sources == {"enc_emb": ["encoder/enc_emb"], "shared_emb": ["shared_emb"], "twin_a": ["twin_a", "twin_b"]}
    for table in result.tables:
        assert external_of(result.onnx_path, table.initializer)[1] is not None
    feed = [np.array([[0, -1, 49, -50]], np.int64), np.array([[-49, 2, 1, 48]], np.int64)]
    got = run_onnx_feed(result.onnx_path, feed)
    assert got.tobytes() == np.asarray(model(feed)).tobytes()
    assert conversion_parity(result)


def run_onnx_feed(path: Path, feed: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feed, strict=True)})[0]


def test_sequential_mask_zero_and_string_lookup_vocabulary(keras: Any, tmp_path: Path) -> None:
    keras.utils.set_random_seed(4)
    seq = keras.Sequential([keras.Input((None,), dtype="int64"),
                            keras.layers.Embedding(40, 3, mask_zero=True, name="seq_emb")], name="seq")
    result = convert(seq, tmp_path / "seq", large=True)
    assert result.store["seq_emb"].metadata["mask_zero"] is True
    ids = np.array([[0, 39, -40, -1]], np.int64)
    (got,) = run_onnx(result.onnx_path, ids).values()
    assert got.tobytes() == np.asarray(seq(ids)).tobytes()

    words = [f"w{i}" for i in range(30)]
    tokens = keras.Input((None,), dtype="string", name="tokens")
    lookup = keras.layers.StringLookup(vocabulary=words, name="lookup")
    model = keras.Model(tokens, keras.layers.Embedding(31, 3, name="tok_emb")(lookup(tokens)), name="strings")
    result = convert(model, tmp_path / "str", large=True)
    vocab = result.store["tok_emb"].vocab
    assert vocab is not None and len(vocab) == 31 and vocab.tokens[1:] == words
    feed = np.array([["w0", "nope", "w29"]], object)
    (got,) = run_onnx(result.onnx_path, feed.astype(str)).values()
    assert got.tobytes() == np.asarray(model(keras.ops.convert_to_tensor(feed.astype(str)))).tobytes()


# ----------------------------------------------------------------------------- refusals write nothing


def _tied(keras: Any) -> Any:
    class TiedEmbedding(keras.layers.Embedding):
        def call(self, inputs: Any) -> Any:
            return keras.ops.matmul(super().call(inputs), keras.ops.transpose(self.embeddings))

    ids = keras.Input((None,), dtype="int64", name="ids")
    return keras.Model(ids, TiedEmbedding(100, 4, name="tied")(ids), name="tied_model")


def test_table_used_beyond_lookups_is_refused_and_nothing_written(keras: Any, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="copied rows of Embedding 'tied'|other than by a row lookup"):
        convert(_tied(keras), tmp_path / "out", large=True)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(keras: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.keras_large as kl

    def broken(*args: Any, **kwargs: Any) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(kl, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(two_tables(keras), tmp_path / "out", large=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- patching the row count


def _wrap_graph(extra: list[onnx.NodeProto], k: int = 17) -> onnx.GraphProto:
    """ids -> (ids < 0 ? ids + k : ids) -> Gather(table); ``extra`` nodes read the same constant ``k``."""
    nodes = [
        helper.make_node("Add", ["ids", "k"], ["shifted"]),
        helper.make_node("Less", ["ids", "zero"], ["neg"]),
        helper.make_node("Where", ["neg", "shifted", "ids"], ["idx"]),
        helper.make_node("Gather", ["table", "idx"], ["out"], name="gather"),
        *extra,
    ]
    inits = [numpy_helper.from_array(np.array(k, np.int64), "k"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.zeros((k, 2), np.float32), "table")]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in (nodes[3], *extra)]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)], outputs,
                             initializer=inits)


def test_patch_row_count_repoints_only_the_wrap() -> None:
    graph = _wrap_graph([helper.make_node("Cast", ["k"], ["k_float"], to=TensorProto.FLOAT)])
    assert patch_row_count(graph, graph.node[3], 17, 5000) == 1
    add = graph.node[0]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert add.input[1] != "k" and int(inits[add.input[1]]) == 5000
    assert int(inits["k"]) == 17 and graph.node[4].input[0] == "k", "another reader keeps the skeleton constant"


def test_patch_row_count_drops_the_unread_constant() -> None:
    graph = _wrap_graph([])
    patch_row_count(graph, graph.node[3], 17, 5000)
    assert "k" not in {t.name for t in graph.initializer}


def test_patch_row_count_refuses_a_derived_leftover() -> None:
    graph = _wrap_graph([])
    graph.initializer.append(numpy_helper.from_array(np.array(16, np.int64), "k_minus_1"))
    graph.node.insert(0, helper.make_node("Min", ["ids_raw", "k_minus_1"], ["ids"]))
    graph.input[0].name = "ids_raw"
    with pytest.raises(ConversionError, match="skeleton's row count 17"):
        patch_row_count(graph, graph.node[4], 17, 5000)


# ----------------------------------------------------------------------------- memory (slow)


@pytest.mark.slow
def test_peak_rss_of_a_300_mb_conversion(tmp_path: Path) -> None:
    """75,000 x 1024 float32 (293 MiB): converting must not copy the table (measured: +35 MB over the model).

    The child builds the model (its variable assigned whole, as loading a file does), resets VmHWM and
    converts; peak - RSS before = what the conversion added. A copy of the table would add 293 MiB.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "EMBRIDGE_NO_PROGRESS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "convert_large.py"), "--child", "memory", "--rows", "75000",
           "--dim", "1024", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    table = 75_000 * 1024 * 4
    assert r["large_path"] and r["peak_reset"]
    assert r["vectors_bitwise_equal"] and r["head_within_tolerance"]
    assert r["peak_rss_bytes"] - r["rss_before_bytes"] < 0.5 * table, r
    assert r["onnx_file_bytes"] < 1 * 2**20 and r["store_bytes"] < table + 2**20


def test_table_also_read_by_a_custom_layer_converts_with_a_warning(keras: Any, tmp_path: Path) -> None:
    class TiedHead(keras.layers.Layer):
        def __init__(self, emb: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.emb = emb

        def call(self, x: Any) -> Any:
            return keras.ops.matmul(x, keras.ops.transpose(self.emb.embeddings))

    keras.utils.set_random_seed(5)
    ids = keras.Input((None,), dtype="int64", name="ids")
    emb = keras.layers.Embedding(40, 3, name="tok")
    model = keras.Model(ids, TiedHead(emb, name="logits")(emb(ids)), name="tied_head")
    result = convert(model, tmp_path / "s", large=True)
    assert any("also read by another layer" in w for w in result.warnings)
    ids_in = np.array([[0, 39, -1, -40]], np.int64)
    (got,) = run_onnx(result.onnx_path, ids_in).values()
    np.testing.assert_allclose(got, np.asarray(model(ids_in)), atol=ATOL, rtol=RTOL)
