"""Streaming a .keras file into the large-table path: the layout map, values equal to
``keras.saving.load_model``'s (bitwise: they are copies), safe_mode still refusing a Lambda, and
the fallback to the ordinary load for a layout it does not understand.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridge.errors import InputError
from converters.keras import convert
from converters.keras_parity import conversion_parity
from converters.keras_stream import LayoutError, open_streamed, stream_large


@pytest.fixture(scope="module")
def keras() -> Any:
    from converters.keras_env import import_keras

    return import_keras()[1]


def nested_model(keras: Any) -> Any:
    """ids -> tok (3000 x 8) + a nested encoder (its own Embedding) -> Dense; a tiny table stays inline."""
    keras.utils.set_random_seed(7)
    inner_in = keras.Input((None,), dtype="int64")
    encoder = keras.Model(inner_in, keras.layers.Embedding(40, 8, name="enc_emb")(inner_in), name="encoder")
    ids = keras.Input((None,), dtype="int64", name="ids")
    tok = keras.layers.Embedding(3000, 8, name="tok")(ids)
    small = keras.layers.Embedding(5, 8, name="small")(keras.ops.mod(ids, 5))
    summed = keras.layers.Add(name="sum")([tok, encoder(keras.ops.mod(ids, 40)), small])
    head = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D(name="mean")(summed))
    return keras.Model(ids, [head, tok], name="nested")


@pytest.fixture(scope="module")
def saved(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "nested.keras"
    nested_model(keras).save(path)
    return path


def test_layout_maps_every_weight_and_finds_the_big_tables(saved: Path) -> None:
    streamed = open_streamed(saved)
    try:
        paths = {layer.layer_path: layer.var_shapes for layer in streamed.layers}
        assert paths["tok"] == [(3000, 8)] and paths["encoder/enc_emb"] == [(40, 8)]
        assert paths["head"] == [(8, 3), (3,)]
        assert [t.layer_paths for t in streamed.tables] == [["tok"], ["encoder/enc_emb"]]
        assert streamed.h5_span is not None, "Keras stores model.weights.h5 uncompressed: read in place"
    finally:
        streamed.close()


def test_table_maps_equal_what_load_model_gives(keras: Any, saved: Path) -> None:
    reference = keras.saving.load_model(saved)
    streamed = open_streamed(saved)
    try:
        for table in streamed.tables:
            layer = reference.get_layer(table.layer_paths[0].split("/")[0])
            for name in table.layer_paths[0].split("/")[1:]:
                layer = layer.get_layer(name)
            assert streamed.table_array(table).tobytes() == np.asarray(layer.embeddings).tobytes()
        full = streamed.full_model()
        assert [w.path for w in full.weights] == [w.path for w in reference.weights]
        for got, want in zip(full.weights, reference.weights, strict=True):
            assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), want.path
    finally:
        streamed.close()


def test_convert_streams_the_file_and_matches_load_model(keras: Any, saved: Path, tmp_path: Path) -> None:
    reference = keras.saving.load_model(saved)
    result = convert(saved, tmp_path / "out", large=True)
    assert result.provenance["large_tables"].get("streamed")
    assert result.store["tok"].data.tobytes() == np.asarray(reference.get_layer("tok").embeddings).tobytes()
    ids = np.array([[0, 2999, -1, -3000, 17, 5]], np.int64)
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"ids": ids}), strict=True))
    head, tok = (np.asarray(t) for t in reference(ids))
    assert got[reference.output_names[1]].tobytes() == tok.tobytes()
    np.testing.assert_allclose(got[reference.output_names[0]], head, atol=1e-6, rtol=1e-5)
    assert conversion_parity(result)


def test_threshold_decides_like_the_in_memory_path(saved: Path) -> None:
    assert stream_large(saved, safe_mode=True, large=None, threshold=None, skeleton_rows=17) is None
    assert stream_large(saved, safe_mode=True, large=False, threshold=1, skeleton_rows=17) is None
    opened = stream_large(saved, safe_mode=True, large=None, threshold=1000, skeleton_rows=17)
    assert opened is not None and "threshold" in opened[1]
    opened[0].close()


def test_lambda_is_still_refused_under_safe_mode(keras: Any, tmp_path: Path) -> None:
    ids = keras.Input((None,), dtype="int64", name="ids")
    emb = keras.layers.Embedding(100, 4, name="tok")(ids)
    model = keras.Model(ids, keras.layers.Lambda(lambda x: x * 2.0, name="double")(emb), name="with_lambda")
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(InputError, match="safe_mode"):
        convert(path, tmp_path / "out", large=True)
    assert not (tmp_path / "out").exists()


def test_unknown_layout_falls_back_with_a_warning(saved: Path, tmp_path: Path) -> None:
    """A weights file with an extra group (as a custom layer with sub-layers writes) takes the ordinary load."""
    import h5py

    odd = tmp_path / "odd.keras"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(odd, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.weights.h5":
                weights = tmp_path / "w.h5"
                weights.write_bytes(data)
                with h5py.File(weights, "a") as h5:
                    h5.create_group("layers/dense/extra")
                data = weights.read_bytes()
            dst.writestr(info, data)
    with pytest.raises(LayoutError, match="extra"):
        open_streamed(odd)
    with pytest.warns(UserWarning, match="cannot stream"):
        assert stream_large(odd, safe_mode=True, large=True, threshold=None, skeleton_rows=17) is None


def test_compressed_weights_entry_is_extracted(saved: Path, tmp_path: Path, keras: Any) -> None:
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    streamed = open_streamed(deflated)
    try:
        assert streamed.h5_span is None
        reference = keras.saving.load_model(saved)
        tok = next(t for t in streamed.tables if t.layer_paths == ["tok"])
        assert streamed.table_array(tok).tobytes() == np.asarray(reference.get_layer("tok").embeddings).tobytes()
    finally:
        streamed.close()
