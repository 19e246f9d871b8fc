"""bridge.onnx_io: loading models safely, confining paths, reading initializers exactly."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bridge.errors import InputError, ModelFormatError, UnsafePathError, UnsupportedError
from bridge.onnx_io import (
    ExternalData,
    external_data_info,
    initializer_array,
    iter_graphs,
    load_model,
    safe_child_path,
    tensor_dtype,
)

RNG = np.random.default_rng(0)


@pytest.fixture
def model_file(tmp_path: Path, onnx_kit) -> Path:
    table = RNG.standard_normal((64, 16)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(onnx_kit.gather_model(table), path)
    return path


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def _external_tensor(name: str, dtype: int, dims: list[int], location: str, offset: int = 0,
                     length: int | None = None) -> TensorProto:
    tensor = TensorProto(name=name, data_type=dtype, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


# ------------------------------------------------------------------------------ load_model


def test_load_model_reads_a_valid_model(model_file: Path) -> None:
    model = load_model(model_file)
    assert model.graph.initializer[0].name == "W"
    assert model.ir_version == 10


def test_load_model_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(InputError, match="nope.onnx") as info:
        load_model(missing)
    assert not isinstance(info.value, ModelFormatError)


def test_load_model_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", [
    pytest.param(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), id="random-bytes"),
    pytest.param(b"this is a text file, not a model\n" * 20, id="text"),
    pytest.param(b"ir_version: 10\ngraph { name: 'g' }\n", id="onnx-text-format"),
])
def test_load_model_rejects_files_that_are_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match="is not a valid ONNX model .*check the file"):
        load_model(path)


def test_load_model_rejects_truncated_model(tmp_path: Path, model_file: Path) -> None:
    data = model_file.read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="protobuf parse failed.*check the file is complete"):
        load_model(half)


def test_load_model_rejects_every_truncation_point(tmp_path: Path, onnx_kit) -> None:
    data = onnx_kit.gather_model(np.ones((2, 2), np.float32)).SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            load_model(path)


def test_load_model_rejects_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.touch()
    with pytest.raises(ModelFormatError, match="empty"):
        load_model(path)


def test_load_model_refuses_tf2onnx_large_model_zip(tmp_path: Path, model_file: Path) -> None:
    archive = tmp_path / "large.onnx"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("__MODEL_PROTO.onnx", model_file.read_bytes())
        z.writestr("weights_0", b"\0" * 64)
    with pytest.raises(UnsupportedError, match=r"large_model zip .*unzip it .*__MODEL_PROTO.onnx"):
        load_model(archive)


def test_load_model_refuses_other_zip(tmp_path: Path) -> None:
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UnsupportedError, match="zip archive, not an ONNX model"):
        load_model(archive)


def test_load_model_leaves_external_data_on_disk_unless_asked(tmp_path: Path, onnx_kit) -> None:
    table = RNG.standard_normal((8, 4)).astype(np.float32)
    path = tmp_path / "ext.onnx"
    _save_external(onnx_kit.gather_model(table), path)
    lazy = load_model(path)
    assert external_data_info(lazy.graph.initializer[0]) is not None
    assert not lazy.graph.initializer[0].raw_data

    eager = load_model(path, load_external_data=True)
    tensor = eager.graph.initializer[0]
    assert external_data_info(tensor) is None
    assert np.array_equal(numpy_helper.to_array(tensor), table)


def test_load_model_with_external_data_refuses_escaping_location(tmp_path: Path, onnx_kit) -> None:
    model = onnx_kit.gather_model(np.ones((2, 2), np.float32))
    model.graph.initializer[0].CopyFrom(_external_tensor("W", TensorProto.FLOAT, [2, 2], "../secret.bin"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert load_model(path).graph.initializer[0].name == "W"  # lazy: nothing is opened
    with pytest.raises(UnsafePathError):
        load_model(path, load_external_data=True)


# ------------------------------------------------------------------------------ safe_child_path


def test_safe_child_path_accepts_plain_and_nested_names(tmp_path: Path) -> None:
    assert safe_child_path(tmp_path, "w.bin") == tmp_path.resolve() / "w.bin"
    assert safe_child_path(tmp_path, "sub/dir/w.bin") == tmp_path.resolve() / "sub" / "dir" / "w.bin"
    assert safe_child_path(tmp_path, "./w.bin") == tmp_path.resolve() / "w.bin"


@pytest.mark.parametrize("location", ["../x", "a/../../x", "a/../b", "/etc/passwd", "\\abs", "C:\\x", "..\\x",
                                      "", ".", "a\x00b"])
def test_safe_child_path_refuses_escapes(tmp_path: Path, location: str) -> None:
    with pytest.raises(UnsafePathError, match="refusing path"):
        safe_child_path(tmp_path, location)


def test_safe_child_path_refuses_symlink_out_but_allows_symlink_in(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    base = tmp_path / "model"
    outside.mkdir()
    base.mkdir()
    (outside / "secret.bin").write_bytes(b"x")
    (base / "real.bin").write_bytes(b"x")
    (base / "out.bin").symlink_to(outside / "secret.bin")
    (base / "outdir").symlink_to(outside)
    (base / "in.bin").symlink_to(base / "real.bin")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_child_path(base, "out.bin")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_child_path(base, "outdir/secret.bin")
    assert safe_child_path(base, "in.bin") == (base / "real.bin").resolve()


# ------------------------------------------------------------------------------ dtypes


def test_tensor_dtype_maps_supported_types() -> None:
    assert tensor_dtype(TensorProto.FLOAT) == np.float32
    assert tensor_dtype(TensorProto.FLOAT16) == np.float16
    assert tensor_dtype(TensorProto.BFLOAT16) == np.dtype(ml_dtypes.bfloat16)
    assert tensor_dtype(TensorProto.INT8) == np.int8
    assert tensor_dtype(TensorProto.UINT8) == np.uint8
    assert tensor_dtype(TensorProto.FLOAT8E4M3FN) == np.dtype(ml_dtypes.float8_e4m3fn)
    assert tensor_dtype(numpy_helper.from_array(np.zeros(2, np.int64))) == np.int64


@pytest.mark.parametrize("elem", [TensorProto.INT4, TensorProto.UINT4, TensorProto.STRING, TensorProto.COMPLEX64,
                                  TensorProto.UNDEFINED, 999])
def test_tensor_dtype_refuses_packed_and_non_numeric_types(elem: int) -> None:
    with pytest.raises(UnsupportedError, match="cannot read"):
        tensor_dtype(elem)


# ------------------------------------------------------------------------------ initializer_array


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.uint8,
                                   np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.bool_,
                                   ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_initializer_array_raw_data_is_exact_and_read_only(dtype: type) -> None:
    bits = RNG.integers(0, 256, 7 * 5 * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = bits.view(dtype).reshape(7, 5) if dtype is not np.bool_ else (bits[:35] % 2).astype(bool).reshape(7, 5)
    tensor = numpy_helper.from_array(array, "t")
    assert tensor.HasField("raw_data")
    out = initializer_array(tensor, None)
    assert out.dtype == np.dtype(dtype) and out.shape == (7, 5)
    assert out.tobytes() == array.tobytes()
    assert not out.flags.writeable
    assert not out.flags.owndata and isinstance(out.base.base, bytes)  # a view of the protobuf's bytes


def _typed_tensor(dtype: int, bits: np.ndarray, dims: list[int]) -> TensorProto:
    """A tensor whose values sit in the typed field (``int32_data`` etc.), as older exporters write them."""
    tensor = TensorProto(name="t", data_type=dtype, dims=dims)
    field = helper.tensor_dtype_to_field(dtype)
    getattr(tensor, field).extend(bits.tolist())
    return tensor


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_initializer_array_16_bit_floats_in_int32_data_are_exact(dtype: type) -> None:
    bits = RNG.integers(0, 2**16, 24, dtype=np.uint16)  # every bit pattern, NaN payloads included
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor = _typed_tensor(elem, bits.astype(np.int32), [6, 4])
    out = initializer_array(tensor, None)
    assert out.dtype == np.dtype(dtype)
    assert np.array_equal(out.view(np.uint16), bits.reshape(6, 4))


@pytest.mark.parametrize(("dtype", "values"), [
    (np.int8, [-128, -1, 0, 1, 127, 5]),
    (np.uint8, [0, 1, 128, 255, 7, 9]),
    (np.float32, [0.5, -1.25, np.inf, 3e-38, 0.0, -0.0]),
    (np.float64, [0.1, -2.5, 1e300, 0.0, 7.0, 8.0]),
    (np.int64, [-(2**63), 2**63 - 1, 0, 1, -1, 5]),
    (np.uint32, [0, 2**32 - 1, 5, 6, 7, 8]),
    (np.uint64, [0, 2**64 - 1, 5, 6, 7, 8]),
    (np.bool_, [True, False, True, True, False, False]),
])
def test_initializer_array_typed_fields_match_numpy_helper(dtype: type, values: list) -> None:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor = helper.make_tensor("t", elem, [2, 3], vals=np.array(values, dtype=dtype), raw=False)
    assert not tensor.HasField("raw_data")
    out = initializer_array(tensor, None)
    expected = np.array(values, dtype=dtype).reshape(2, 3)
    assert out.dtype == expected.dtype and out.tobytes() == expected.tobytes()
    assert out.tobytes() == numpy_helper.to_array(tensor).tobytes()
    assert not out.flags.writeable


def test_initializer_array_rejects_wrong_value_count() -> None:
    tensor = TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[2, 3], float_data=[1.0, 2.0])
    with pytest.raises(ModelFormatError, match="2 values"):
        initializer_array(tensor, None)
    raw = numpy_helper.from_array(np.zeros((2, 3), np.float32), "r")
    raw.dims[0] = 3
    with pytest.raises(ModelFormatError, match="raw_data"):
        initializer_array(raw, None)


def test_initializer_array_refuses_int4(onnx_kit) -> None:
    tensor = helper.make_tensor("q", TensorProto.INT4, [2, 2], vals=[1, 2, 3, 4])
    with pytest.raises(UnsupportedError, match="INT4"):
        initializer_array(tensor, None)


def test_initializer_array_external_is_a_memmap_at_the_offset(tmp_path: Path) -> None:
    table = RNG.standard_normal((10, 6)).astype(np.float32)
    header = b"H" * 128
    (tmp_path / "w.bin").write_bytes(header + table.tobytes() + b"trailing")
    tensor = _external_tensor("W", TensorProto.FLOAT, [10, 6], "w.bin", offset=128, length=table.nbytes)
    assert external_data_info(tensor) == ExternalData("w.bin", 128, table.nbytes)
    out = initializer_array(tensor, tmp_path)
    assert isinstance(out, np.memmap) and out.mode == "r"
    assert not out.flags.writeable
    assert np.array_equal(out, table)


def test_initializer_array_from_onnx_save_external(tmp_path: Path, onnx_kit) -> None:
    table = RNG.standard_normal((33, 7)).astype(np.float32)
    path = tmp_path / "m.onnx"
    (tmp_path / "data").mkdir()  # onnx.save does not create it
    _save_external(onnx_kit.gather_model(table), path, location="data/weights.bin")
    tensor = load_model(path).graph.initializer[0]
    info = external_data_info(tensor)
    assert info is not None and info.location == "data/weights.bin" and info.length == table.nbytes
    out = initializer_array(tensor, tmp_path)
    assert isinstance(out, np.memmap)
    assert out.tobytes() == table.tobytes()


@pytest.mark.parametrize("location", ["../x.bin", "/etc/passwd", "link.bin"])
def test_initializer_array_refuses_unsafe_external_location(tmp_path: Path, location: str) -> None:
    base = tmp_path / "model"
    base.mkdir()
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    (base / "link.bin").symlink_to(tmp_path / "x.bin")
    tensor = _external_tensor("W", TensorProto.FLOAT, [2, 2], location)
    with pytest.raises(UnsafePathError):
        initializer_array(tensor, base)


def test_initializer_array_truncated_or_missing_external_file(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 60)
    tensor = _external_tensor("W", TensorProto.FLOAT, [4, 4], "w.bin")
    with pytest.raises(ModelFormatError, match="truncated"):
        initializer_array(tensor, tmp_path)
    shifted = _external_tensor("W", TensorProto.FLOAT, [3, 4], "w.bin", offset=16)
    with pytest.raises(ModelFormatError, match="truncated"):
        initializer_array(shifted, tmp_path)
    missing = _external_tensor("W", TensorProto.FLOAT, [2, 2], "gone.bin")
    with pytest.raises(ModelFormatError, match="missing"):
        initializer_array(missing, tmp_path)
    wrong_len = _external_tensor("W", TensorProto.FLOAT, [2, 2], "w.bin", length=12)
    with pytest.raises(ModelFormatError, match="length 12"):
        initializer_array(wrong_len, tmp_path)
    with pytest.raises(InputError, match="base_dir"):
        initializer_array(tensor, None)


def test_external_data_info_rejects_malformed_entries() -> None:
    assert external_data_info(numpy_helper.from_array(np.zeros(2, np.float32))) is None
    bad = _external_tensor("W", TensorProto.FLOAT, [2], "w.bin")
    bad.external_data[1].value = "twelve"
    with pytest.raises(ModelFormatError, match="non-integer"):
        external_data_info(bad)
    no_loc = _external_tensor("W", TensorProto.FLOAT, [2], "")
    with pytest.raises(ModelFormatError, match="location"):
        external_data_info(no_loc)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident set size")
def test_initializer_array_maps_a_4_gib_table_without_reading_it(tmp_path: Path) -> None:
    rows, dim = 4 * 1024 * 1024, 256  # 4 GiB of float32, as a sparse file: no disk space, no RAM
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(64 + rows * dim * 4)
    tensor = _external_tensor("W", TensorProto.FLOAT, [rows, dim], "big.bin", offset=64)
    before = _rss_bytes()
    out = initializer_array(tensor, tmp_path)
    row = np.array(out[rows - 1])
    grown = _rss_bytes() - before
    assert out.shape == (rows, dim) and not row.any()
    assert grown < 64 * 1024 * 1024, f"resident memory grew by {grown} bytes"


# ------------------------------------------------------------------------------ iter_graphs


def test_iter_graphs_walks_nested_subgraphs_in_order(onnx_kit) -> None:
    cond = onnx_kit.value("c", TensorProto.BOOL, [])
    leaf = onnx_kit.graph([helper.make_node("Identity", ["x"], ["y1"])], [], [onnx_kit.value("y1")], name="leaf")
    other = onnx_kit.graph([helper.make_node("Identity", ["x"], ["y2"])], [], [onnx_kit.value("y2")], name="o")
    inner_if = helper.make_node("If", ["c"], ["z"], then_branch=leaf, else_branch=other)  # unnamed
    outer_then = onnx_kit.graph([inner_if], [], [onnx_kit.value("z")], name="t")
    outer = helper.make_node("If", ["c"], ["out"], name="top_if", then_branch=outer_then, else_branch=other)
    model = onnx_kit.model([outer], [cond, onnx_kit.value("x", shape=[2])], [onnx_kit.value("out")], check=False)
    paths = [path for path, _ in iter_graphs(model)]
    # helper.make_node stores attributes sorted by name, so else_branch comes first
    assert paths == ["", "top_if/else_branch", "top_if/then_branch", "top_if/then_branch/If#0/else_branch",
                     "top_if/then_branch/If#0/then_branch"]
    assert [g.name for _, g in iter_graphs(model.graph)] == ["g", "o", "t", "o", "leaf"]


def _two_gathers(first: str, second: str) -> onnx.GraphProto:
    table = numpy_helper.from_array(np.ones((5, 3), np.float32), "W")
    return helper.make_graph(
        [helper.make_node("Gather", ["W", "ids"], ["a"], name=first),
         helper.make_node("Gather", ["W", "ids"], ["b"], name=second)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], [table],
    )


def _if_around(branch: onnx.GraphProto) -> onnx.GraphProto:
    cond = numpy_helper.from_array(np.array(True), "cond")
    return helper.make_graph(
        [helper.make_node("If", ["cond"], ["a", "b"], name="if", then_branch=branch, else_branch=branch)], "main",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], [cond],
    )


@pytest.mark.parametrize(("graph", "where"), [
    (_two_gathers("g", "g"), "the main graph"),
    (_if_around(_two_gathers("g", "g")), "subgraph 'if/(then|else)_branch'"),
], ids=["main", "subgraph"])
def test_repeated_node_names_are_refused(tmp_path: Path, graph: onnx.GraphProto, where: str) -> None:
    """onnxruntime refuses them too; this package names nodes and subgraphs by node name."""
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "m.onnx")
    with pytest.raises(ModelFormatError, match=f"two nodes of {where} are named 'g'; .*unique name"):
        load_model(tmp_path / "m.onnx")


def test_unnamed_nodes_and_names_repeated_across_graphs_load(tmp_path: Path) -> None:
    onnx.save(helper.make_model(_if_around(_two_gathers("", "")), opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=10), tmp_path / "m.onnx")
    assert len(load_model(tmp_path / "m.onnx").graph.node) == 1
