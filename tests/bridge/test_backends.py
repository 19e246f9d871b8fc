"""Every backend against np.take, bit for bit, under every index policy; every test runs on all three."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import bridge.backends as backends
from bridge.backends.base import require
from bridge.errors import BackendError, IdError, InputError, VocabularyError
from bridge.policy import POLICIES
from bridge.table import EmbeddingTable
from bridge.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[2]
FRAMEWORK = {"numpy": None, "onnxruntime": "onnxruntime", "torch": "torch"}
ROWS, DIM, OOV = 50, 6, 2
TABLE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
ID_DTYPES = [np.int32, np.int64, np.uint8, np.uint64]
SHAPES = {"0d": (), "1d": (7,), "3d": (3, 5, 2), "empty": (0,), "empty_2d": (0, 3), "empty_inner": (4, 0)}


@pytest.fixture(params=list(FRAMEWORK))
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if FRAMEWORK[name]:
        pytest.importorskip(FRAMEWORK[name])
    return name


def make_data(dtype: np.dtype, rows: int = ROWS, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Random values plus the awkward ones a copy must keep: NaN, -0.0, +-inf."""
    rng = np.random.default_rng(seed)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=(rows, dim)).astype(dtype)
    data = (rng.standard_normal((rows, dim)) * 10).astype(dtype)
    data[3] = np.nan
    data[4, :3] = (-0.0, np.inf, -np.inf)
    return data


@functools.cache
def table(dtype_name: str) -> EmbeddingTable:
    data = make_data(np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name))
    data.setflags(write=False)  # like a store's read-only memory map
    vocab = Vocabulary([f"w{i}" for i in range(ROWS)])
    return EmbeddingTable(name=f"t_{dtype_name}", data=data, vocab=vocab, oov_id=OOV)


@functools.cache
def cached_lookup(backend: str, dtype_name: str, policy: str) -> backends.Lookup:
    return backends.lookup(table(dtype_name), backend, policy)


def expected_vectors(data: np.ndarray, policy: str, ids: np.ndarray) -> np.ndarray:
    """What each policy means, written per id with Python ints (independent of bridge.policy)."""
    rows = data.shape[0]

    def row(v: int) -> np.ndarray:
        if 0 <= v < rows:
            return data[v]
        if policy == "clip":
            return data[0 if v < 0 else rows - 1]
        if policy == "zero":
            return np.zeros(data.shape[1], data.dtype)
        if policy == "oov":
            return data[OOV]
        assert policy == "wrap" and -rows <= v < 0, "expected an error"
        return data[v + rows]

    flat = [row(int(v)) for v in ids.reshape(-1).tolist()]
    return np.array(flat, dtype=data.dtype).reshape(ids.shape + (data.shape[1],))


def assert_bitwise(got: np.ndarray, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


# --- the policy x dtype x id dtype x shape matrix ---------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
@pytest.mark.parametrize("policy", POLICIES)
def test_valid_ids_equal_np_take(backend: str, policy: str, dtype_name: str, id_dtype: type, shape: tuple) -> None:
    ids = np.array(np.random.default_rng(1).integers(0, ROWS, size=shape), dtype=id_dtype)
    got = cached_lookup(backend, dtype_name, policy)(ids)
    assert_bitwise(got, np.take(table(dtype_name).data, ids.astype(np.int64), axis=0))


BAD_IDS = [
    (ROWS, np.int32),
    (ROWS, np.uint8),
    (-1, np.int64),
    (-1, np.int32),
    (-ROWS - 1, np.int64),
    (2**63 + 5, np.uint64),
]
BAD_SHAPES = {"0d": ((), ()), "1d": ((7,), (4,)), "3d": ((3, 5, 2), (2, 1, 0))}


@pytest.mark.parametrize("where", list(BAD_SHAPES.values()), ids=list(BAD_SHAPES))
@pytest.mark.parametrize(("bad", "id_dtype"), BAD_IDS, ids=[f"{b}-{np.dtype(d).name}" for b, d in BAD_IDS])
@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
@pytest.mark.parametrize("policy", POLICIES)
def test_bad_ids_follow_policy(
    backend: str, policy: str, dtype_name: str, bad: int, id_dtype: type, where: tuple
) -> None:
    shape, position = where
    ids = np.array(np.random.default_rng(2).integers(0, ROWS, size=shape), dtype=id_dtype)
    ids[position] = bad
    lookup = cached_lookup(backend, dtype_name, policy)
    if policy == "error" or (policy == "wrap" and not -ROWS <= bad < 0):
        with pytest.raises(IdError, match=re.escape(f"id {bad} at position {position!r}")):
            lookup(ids)
        return
    assert_bitwise(lookup(ids), expected_vectors(table(dtype_name).data, policy, ids))


@pytest.mark.parametrize(
    "ids", [np.array([1.0]), np.array([True, False]), np.array(["w1"]), [0.5], "w1", None], ids=repr
)
def test_non_integer_ids_raise_id_error(backend: str, ids: object) -> None:
    with pytest.raises(IdError, match="dtype"):
        cached_lookup(backend, "float32", "clip")(ids)


def test_python_ints_and_lists(backend: str) -> None:
    lookup = cached_lookup(backend, "float32", "error")
    data = table("float32").data
    assert_bitwise(lookup(7), data[7])
    assert_bitwise(lookup([[1, 2], [3, 49]]), data[[[1, 2], [3, 49]]])
    assert_bitwise(lookup([]), np.empty((0, DIM), np.float32))


def test_strided_ids(backend: str) -> None:
    ids = np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::-3]  # non-contiguous, negative stride
    assert_bitwise(cached_lookup(backend, "float32", "error")(ids), table("float32").data[ids])


@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
def test_large_batches_and_wide_rows(backend: str, dtype_name: str) -> None:
    """Outputs beyond the small-batch staging size take each backend's direct path."""
    lookup = cached_lookup(backend, dtype_name, "wrap")
    ids = np.random.default_rng(5).integers(-ROWS, ROWS, size=(40, 500)).astype(np.int32)
    assert_bitwise(lookup(ids), expected_vectors(table(dtype_name).data, "wrap", ids))
    wide = make_data(TABLE_DTYPES[dtype_name], rows=6, dim=40_000)
    wide_lookup = backends.lookup(wide, backend)
    for ids in (np.array(3), np.array([[3, 0], [1, 1]], np.uint8)):
        assert_bitwise(wide_lookup(ids), np.take(wide, ids, axis=0))


LARGE_BAD = [(ROWS, 0), (-1, 9_999), (-ROWS - 1, 19_999), (2**30, 12_345)]


@pytest.mark.parametrize(("bad", "position"), LARGE_BAD, ids=[str(b) for b, _ in LARGE_BAD])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("policy", POLICIES)
def test_bad_ids_in_large_batches_follow_policy(backend: str, policy: str, id_dtype: type, bad: int,
                                                position: int) -> None:
    """Large int32/int64 batches: torch lets index_select find the bad id; results must not differ."""
    ids = np.random.default_rng(6).integers(0, ROWS, size=20_000).astype(id_dtype)  # 480 KB out: direct path
    ids[position] = bad
    lookup = cached_lookup(backend, "bfloat16", policy)
    out = np.empty(ids.shape + (DIM,), lookup.dtype)
    if policy == "error" or (policy == "wrap" and not -ROWS <= bad < 0):
        for target in (None, out):
            with pytest.raises(IdError, match=re.escape(f"id {bad} at position ({position},)")):
                lookup(ids, out=target)
        return
    want = expected_vectors(table("bfloat16").data, policy, ids)
    assert_bitwise(lookup(ids), want)
    out.view(np.uint8)[...] = 0xA5
    assert lookup(ids, out=out) is out
    assert_bitwise(out, want)
    ids[position] = 1  # the same buffers, now valid: the fast path again
    assert_bitwise(lookup(ids, out=out), expected_vectors(table("bfloat16").data, policy, ids))


def test_torch_skips_the_policy_pass_only_for_large_valid_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from bridge.policy import IndexPolicy

    calls: list[int] = []
    in_range = IndexPolicy.in_range
    monkeypatch.setattr(IndexPolicy, "in_range", lambda self, ids: calls.append(ids.size) or in_range(self, ids))
    lookup = backends.lookup(table("float32"), "torch")  # 24-byte rows: direct path from 2,731 ids
    data = table("float32").data
    for size, checked in ((2_730, True), (2_731, False), (50_000, False)):
        ids = np.random.default_rng(size).integers(0, ROWS, size=size)
        calls.clear()
        assert_bitwise(lookup(ids), data[ids])
        assert calls == ([size] if checked else [])
    ids[7] = ROWS  # refused by index_select: the policy runs and names the id
    calls.clear()
    with pytest.raises(IdError, match=r"id 50 at position \(7,\)"):
        lookup(ids)
    assert calls == [50_000]


@pytest.mark.parametrize("policy", POLICIES)
def test_onnxruntime_skips_the_policy_pass_only_under_wrap(policy: str, monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Gather refuses ids outside [-rows, rows) and wraps negative ones: the wrap policy, and no other."""
    pytest.importorskip("onnxruntime")
    from bridge.policy import IndexPolicy

    calls: list[int] = []
    in_range = IndexPolicy.in_range
    monkeypatch.setattr(IndexPolicy, "in_range", lambda self, ids: calls.append(ids.size) or in_range(self, ids))
    lookup = backends.lookup(table("float32"), "onnxruntime", policy=policy, oov_id=OOV)  # direct from 2,731 ids
    data = table("float32").data
    for size, skipped in ((2_730, False), (2_731, policy == "wrap"), (50_000, policy == "wrap")):
        ids = np.random.default_rng(size).integers(-ROWS if policy == "wrap" else 0, ROWS, size=size)
        calls.clear()
        assert_bitwise(lookup(ids), expected_vectors(data, policy, ids))
        assert calls == ([] if skipped else [size])
    ids[7] = -ROWS - 1  # refused by Gather under wrap: the policy runs and names the id
    calls.clear()
    if policy in ("error", "wrap"):
        with pytest.raises(IdError, match=rf"id {-ROWS - 1} at position \(7,\)"):
            lookup(ids)
    else:
        assert_bitwise(lookup(ids), expected_vectors(data, policy, ids))
    assert calls == [50_000]
    assert "onnxruntime" not in capfd.readouterr().err  # the refusal is an IdError, not also a log line


def test_onnxruntime_failing_for_another_reason_under_wrap_raises_its_own_error() -> None:
    """A failed run is taken for a refused id; the general path then runs again and raises the real error."""
    pytest.importorskip("onnxruntime")
    lookup = backends.lookup(table("float32"), "onnxruntime", policy="wrap")
    runs: list[int] = []

    def broken(*args: Any) -> None:
        runs.append(1)
        raise RuntimeError("out of memory")

    lookup._run = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        lookup(np.zeros(5_000, np.int64))
    assert len(runs) == 2  # the unchecked attempt, then the general path's


@pytest.mark.parametrize("dtype", [np.float64, np.int8], ids=["float64", "int8"])
def test_float64_and_int8_tables(backend: str, dtype: type) -> None:
    data = make_data(np.dtype(dtype))
    ids = np.array([[0, 49], [3, 4]], np.int64)
    got = backends.lookup(EmbeddingTable("t", data), backend)(ids)
    assert_bitwise(got, np.take(data, ids, axis=0))


# --- out=, native(), tokens() ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
def test_out_is_filled_and_returned(backend: str, dtype_name: str) -> None:
    lookup = cached_lookup(backend, dtype_name, "zero")
    ids = np.array([[5, 60], [-1, 49]], np.int64)
    out = np.empty((2, 2, DIM), TABLE_DTYPES[dtype_name])
    out.view(np.uint8)[...] = 0xA5  # sentinel: a skipped write would show
    assert lookup(ids, out=out) is out
    assert_bitwise(out, expected_vectors(table(dtype_name).data, "zero", ids))


@pytest.mark.parametrize(
    "out",
    [
        np.empty((3, DIM), np.float32),
        np.empty((2, DIM), np.float64),
        np.empty((DIM, 2), np.float32).T,
        np.empty((2, DIM), np.float32).tolist(),
    ],
    ids=["shape", "dtype", "not-contiguous", "list"],
)
def test_bad_out_raises_input_error(backend: str, out: object) -> None:
    with pytest.raises(InputError, match="out="):
        cached_lookup(backend, "float32", "error")(np.array([1, 2]), out=out)  # type: ignore[arg-type]


def test_read_only_out_raises(backend: str) -> None:
    out = np.empty((2, DIM), np.float32)
    out.setflags(write=False)
    with pytest.raises(InputError, match="writable"):
        cached_lookup(backend, "float32", "error")(np.array([1, 2]), out=out)


@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
def test_native_type_shares_the_output_buffer(backend: str, dtype_name: str) -> None:
    lookup = cached_lookup(backend, dtype_name, "error")
    ids = np.array([[1, 2, 3]], np.int32)
    out = np.empty((1, 3, DIM), TABLE_DTYPES[dtype_name])
    value = lookup.native(ids, out=out)
    want = np.take(table(dtype_name).data, ids, axis=0)
    assert_bitwise(out, want)
    if backend == "numpy":
        assert value is out
    elif backend == "torch":
        import torch

        assert isinstance(value, torch.Tensor)
        assert value.dtype == getattr(torch, dtype_name) and tuple(value.shape) == want.shape
        assert value.data_ptr() == out.ctypes.data
        assert value.view(torch.int16 if dtype_name != "float32" else torch.int32).numpy().tobytes() == want.tobytes()
    else:
        import onnxruntime

        assert isinstance(value, onnxruntime.OrtValue)
        onnx_name = {"float32": "float", "float16": "float16", "bfloat16": "bfloat16"}[dtype_name]
        assert value.data_type() == f"tensor({onnx_name})" and value.shape() == [1, 3, DIM]
        assert value.data_ptr() == out.ctypes.data


def test_native_without_out(backend: str) -> None:
    value = cached_lookup(backend, "float32", "error").native(np.array([7]))
    assert np.asarray(value).tobytes() == table("float32").data[[7]].tobytes()


def with_vocab(vocab: Vocabulary | None, oov_id: int | None = OOV) -> EmbeddingTable:
    return EmbeddingTable("v", table("float32").data, vocab=vocab, oov_id=oov_id)


def test_tokens_with_vocabulary_oov_id(backend: str) -> None:
    vocab = Vocabulary(["[UNK]"] + [f"w{i}" for i in range(1, ROWS)], oov_id=0)
    for policy in POLICIES:
        lookup = backends.lookup(with_vocab(vocab), backend, policy)
        got = lookup.tokens(["w5", "nope", "w49"])
        assert_bitwise(got, table("float32").data[[5, 0, 49]])


@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_without_vocabulary_oov_follow_policy(backend: str, policy: str) -> None:
    vocab = Vocabulary([f"w{i}" for i in range(ROWS)])
    lookup = backends.lookup(with_vocab(vocab), backend, policy)
    data = table("float32").data
    assert_bitwise(lookup.tokens("w9"), data[9])
    if policy in ("error", "clip", "wrap"):
        with pytest.raises(VocabularyError, match="'nope'"):
            lookup.tokens(["w1", "nope"])
        return
    want = np.stack([data[1], np.zeros(DIM, np.float32) if policy == "zero" else data[OOV]])
    assert_bitwise(lookup.tokens(["w1", "nope"]), want)


def test_tokens_need_a_vocabulary(backend: str) -> None:
    with pytest.raises(VocabularyError, match="no vocabulary"):
        backends.lookup(with_vocab(None), backend).tokens(["w1"])


# --- construction, registry, framework specifics -----------------------------------------------------------


def test_attributes_and_threads(backend: str) -> None:
    lookup = backends.lookup(table("float32"), backend, "oov", oov_id=7, threads=2)
    assert (lookup.backend, lookup.policy, lookup.oov_id, lookup.threads) == (backend, "oov", 7, 2)
    assert lookup.table is table("float32")
    assert_bitwise(lookup(np.array([60, 1])), table("float32").data[[7, 1]])
    with pytest.raises(InputError, match="threads"):
        backends.lookup(table("float32"), backend, threads=0)


def test_oov_policy_needs_a_row(backend: str) -> None:
    with pytest.raises(InputError, match="oov_id"):
        backends.lookup(with_vocab(None, oov_id=None), backend, "oov")


def test_bare_array_table(backend: str) -> None:
    data = make_data(np.dtype(np.float32), rows=5)
    assert_bitwise(backends.lookup(data, backend)(np.array([4, 0])), data[[4, 0]])


def test_read_only_table_gives_no_warning(backend: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lookup = backends.lookup(table("float16"), backend)
    assert not table("float16").data.flags.writeable
    assert_bitwise(lookup(np.array([2])), table("float16").data[[2]])


def test_non_contiguous_table_is_served_correctly(backend: str) -> None:
    data = make_data(np.dtype(np.float32), rows=8, dim=12)[:, ::2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        lookup = backends.lookup(EmbeddingTable("strided", data), backend)
    assert_bitwise(lookup(np.array([7, 0])), data[[7, 0]])


def test_empty_table(backend: str) -> None:
    empty = EmbeddingTable("empty", np.zeros((0, DIM), np.float32))
    assert backends.lookup(empty, backend)(np.array([], np.int64)).shape == (0, DIM)
    assert_bitwise(backends.lookup(empty, backend, "zero")(np.array([3])), np.zeros((1, DIM), np.float32))
    with pytest.raises(IdError):
        backends.lookup(empty, backend)(np.array([0]))


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(BackendError, match="numpy, onnxruntime, torch"):
        backends.lookup(table("float32"), "tensorflow")
    assert set(backends.available_backends()) <= set(backends.BACKENDS)


def test_missing_framework_says_what_to_install(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if FRAMEWORK[backend] is None:
        with pytest.raises(BackendError, match=r"pip install 'embedding-bridge\[extra\]'"):
            require("embedding_bridge_no_such_module", backend="x", extra="extra")
        return
    monkeypatch.setitem(sys.modules, FRAMEWORK[backend], None)  # makes `import <framework>` fail
    fix = r"pip install 'embedding-bridge\[torch\]'" if backend == "torch" else "pip install onnxruntime"
    with pytest.raises(BackendError, match=rf"backend '{backend}' needs .*{fix}"):
        backends.lookup(table("float32"), backend)


def test_thread_safety(backend: str) -> None:
    lookup = cached_lookup(backend, "bfloat16", "zero")
    batches = [np.random.default_rng(s).integers(-5, ROWS + 5, size=(s % 7 + 1, 3)) for s in range(64)]
    serial = [lookup(ids).tobytes() for ids in batches]
    results: dict[int, list[bytes]] = {}

    def work(k: int) -> None:
        results[k] = [lookup(ids).tobytes() for ids in batches[k:] + batches[:k]]

    for _ in range(3):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in range(8):
            assert results[k] == serial[k:] + serial[:k]


NO_COPY_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime, torch  # frameworks load first: their own memory is not the table's
from bridge.backends import lookup
from bridge.table import EmbeddingTable

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

data = np.load(sys.argv[1], mmap_mode="r", allow_pickle=False)
table = EmbeddingTable("big", data)
before = rss()
lookups = [lookup(table, name) for name in ("numpy", "onnxruntime", "torch")]
created = rss()
ids = np.array([0, data.shape[0] - 1, 12345])
same = all(lk(ids).tobytes() == np.asarray(data[ids]).tobytes() for lk in lookups)
print(json.dumps({"table": data.nbytes, "created": created - before, "used": rss() - before, "same": same}))
"""


def test_no_copy_of_a_memory_mapped_table(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "big.npy"
    rows, dim = 300_000, 256  # 307 MB of float32
    big = np.zeros((rows, dim), np.float32)
    big[::1000] = np.arange(dim, dtype=np.float32)
    np.save(path, big)
    del big
    proc = subprocess.run(
        [sys.executable, "-c", NO_COPY_SCRIPT, str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["same"]
    assert report["created"] < 0.25 * report["table"], report
    assert report["used"] < 0.25 * report["table"], report


# --- the small-batch fast path (IndexPolicy.fits, Lookup._fresh) gives what the general path gives ----------

SMALL_SHAPES = {"0d": (), "1": (1,), "1x1": (1, 1), "2": (2,), "16": (16,), "17": (17,)}
EDGE_IDS = [0, ROWS - 1, ROWS, -1, -ROWS, -ROWS - 1]


@pytest.mark.parametrize("value", EDGE_IDS)
@pytest.mark.parametrize("shape", list(SMALL_SHAPES.values()), ids=list(SMALL_SHAPES))
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("policy", POLICIES)
def test_small_batches_follow_policy_at_the_edges(
    backend: str, policy: str, id_dtype: type, shape: tuple, value: int
) -> None:
    """One id, or a few with ``value`` last, as int32/int64 arrays, a list and int16: all alike, per policy."""
    ids = np.full(shape, 7, id_dtype)
    ids.reshape(-1)[-1] = value
    lookup = cached_lookup(backend, "bfloat16", policy)
    if (policy == "error" and not 0 <= value < ROWS) or (policy == "wrap" and not -ROWS <= value < ROWS):
        position = tuple(int(i) for i in np.unravel_index(ids.size - 1, shape))
        for form in (ids, ids.tolist(), ids.astype(np.int16)):
            with pytest.raises(IdError, match=re.escape(f"id {value} at position {position!r}")):
                lookup(form)
        return
    want = expected_vectors(table("bfloat16").data, policy, ids)
    for form in (ids, ids.tolist(), ids.astype(np.int16)):
        assert_bitwise(lookup(form), want)
    out = np.empty(want.shape, want.dtype)
    out.view(np.uint8)[...] = 0xA5
    assert lookup(ids, out=out) is out
    assert_bitwise(out, want)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int8, np.uint8, np.int16, np.int32, np.int64]
)
def test_one_id_in_any_shape_on_every_table_dtype(backend: str, dtype: type) -> None:
    """One id is the serving call, with a path of its own (torch copies the row with narrow_copy)."""
    data = make_data(np.dtype(dtype))
    lookup = backends.lookup(EmbeddingTable("t", data), backend)
    for ids in (np.array(ROWS - 1), np.array([0]), np.array([[ROWS - 1]], np.int32), np.array([5], np.uint8)):
        want = np.take(data, ids.astype(np.int64), axis=0)
        assert_bitwise(lookup(ids), want)
        out = np.empty(want.shape, want.dtype)
        assert lookup(ids, out=out) is out
        assert_bitwise(out, want)


@pytest.mark.parametrize(
    "ids",
    [np.array(1.0), np.array([1.0], np.float32), np.array(True), np.array([True]), np.array([1], object)],
    ids=["0d-float", "float32", "0d-bool", "bool", "object"],
)
def test_small_non_integer_arrays_raise_id_error(backend: str, ids: np.ndarray) -> None:
    with pytest.raises(IdError, match="dtype"):
        cached_lookup(backend, "float32", "clip")(ids)


@pytest.mark.parametrize("policy", POLICIES)
def test_small_uint64_beyond_int64_and_big_endian_ids(backend: str, policy: str) -> None:
    """Ids the fast path leaves alone: 2**64 - 1 must not wrap to the last row; big-endian ids are read right."""
    lookup = cached_lookup(backend, "float32", policy)
    data = table("float32").data
    huge = np.array([2**64 - 1], np.uint64)
    if policy in ("error", "wrap"):
        with pytest.raises(IdError, match=re.escape(f"id {2**64 - 1} at position (0,)")):
            lookup(huge)
    else:
        assert_bitwise(lookup(huge), expected_vectors(data, policy, np.array([ROWS + 1])))
    assert_bitwise(lookup(np.array([3], ">i8")), data[[3]])
    assert_bitwise(lookup(np.array(ROWS - 1, ">i4")), data[ROWS - 1])


@pytest.mark.parametrize("dtype_name", list(TABLE_DTYPES))
def test_small_results_are_new_arrays(backend: str, dtype_name: str) -> None:
    """Small batches go through reused per-thread buffers: each result must still be its own array."""
    lookup = cached_lookup(backend, dtype_name, "error")
    data = table(dtype_name).data
    first, second = lookup(np.array([1])), lookup(np.array([2]))
    assert_bitwise(first, data[[1]])
    assert_bitwise(second, data[[2]])
    assert not np.shares_memory(first, second)
    first[...] = second  # a writable result of its own; the next call is unaffected
    assert_bitwise(lookup(np.array([1])), data[[1]])
    assert first.flags.c_contiguous and first.flags.writeable


def test_memory_mapped_table_gives_plain_arrays(backend: str, tmp_path: Path) -> None:
    data = make_data(np.dtype(np.float32))
    np.save(tmp_path / "t.npy", data)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r", allow_pickle=False)
    lookup = backends.lookup(EmbeddingTable("mapped", mapped), backend)
    for ids in (np.array(4), np.array([4, 0]), np.arange(ROWS).reshape(2, -1), np.zeros(5000, np.int64)):
        got = lookup(ids)
        assert type(got) is np.ndarray
        assert_bitwise(got, np.take(data, ids, axis=0))


def test_thread_safety_small_batches(backend: str) -> None:
    lookup = cached_lookup(backend, "float16", "error")
    batches = [np.random.default_rng(s).integers(0, ROWS, size=() if s % 3 == 0 else (s % 5 + 1,)) for s in range(48)]
    serial = [lookup(ids).tobytes() for ids in batches]
    results: dict[int, list[bytes]] = {}

    def work(k: int) -> None:
        results[k] = [lookup(ids).tobytes() for _ in range(20) for ids in batches[k:] + batches[:k]]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(6):
        assert results[k] == (serial[k:] + serial[:k]) * 20


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_session_uses_the_thread_count(threads: int) -> None:
    pytest.importorskip("onnxruntime")
    lookup = backends.lookup(table("float32"), "onnxruntime", threads=threads)
    options = lookup.session.get_session_options()  # type: ignore[attr-defined]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    assert_bitwise(lookup(np.arange(ROWS)), table("float32").data)


def test_onnxruntime_start_up_probe_checks_both_paths() -> None:
    """The probe that guards the direct ``_sess.run_with_ortvaluevector`` binding fails a path that writes
    nothing into its output, also for a table whose row 0 is all zeros (the staging buffers start non-zero)."""
    pytest.importorskip("onnxruntime")
    from bridge.backends.onnxruntime import OnnxruntimeLookup

    class SmallWritesNothing(OnnxruntimeLookup):
        def _stage(self, ids: np.ndarray) -> np.ndarray:
            return self._staging.get(ids.shape)[1]  # the staging output, not run

    class LargeWritesNothing(OnnxruntimeLookup):
        def _gather_direct(self, ids: np.ndarray, out: np.ndarray) -> None:
            pass

    class SmallWritesOtherValues(OnnxruntimeLookup):
        def _stage(self, ids: np.ndarray) -> np.ndarray:
            return super()._stage(ids) + 1

    zeros = np.zeros((ROWS, DIM), np.float32)
    for broken in (SmallWritesNothing, LargeWritesNothing):
        with pytest.raises(BackendError, match="did not write row 0"):
            broken(zeros)
    with pytest.raises(BackendError, match="wrote a row 0 that differs from NumPy's"):
        SmallWritesOtherValues(zeros)
    assert_bitwise(OnnxruntimeLookup(zeros)(np.array([3])), zeros[[3]])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_unsupported_table_dtype_names_the_supported_ones(backend: str) -> None:
    table = np.zeros((4, 2), dtype=np.complex64)
    message = rf"complex64, which the {backend} backend does not serve; supported: .*float32"
    with pytest.raises(BackendError, match=message):
        backends.lookup(table, backend)


@pytest.mark.parametrize("batch", [2_000, 20])  # 128 KB of output (the direct path) and 1.3 KB (staging)
def test_out_overlapping_the_table_gives_np_take(backend: str, batch: int) -> None:
    """Large batches gather straight into ``out=``; where it aliases the table, through a new array."""
    data = np.arange(20_000 * 16, dtype=np.float32).reshape(20_000, 16)
    ids = np.arange(batch)[::-1].copy()
    want = np.take(data, ids, axis=0)
    assert_bitwise(backends.lookup(data, backend)(ids, out=data[:batch]), want)


def test_only_a_read_only_memory_map_is_taken_to_be_safe_from_out_overlap(tmp_path: Path) -> None:
    """The overlap check is skipped only where no writable array can share the table's memory."""
    from bridge.backends.base import read_only_map

    path = tmp_path / "t.npy"
    np.save(path, np.arange(64, dtype=np.float32).reshape(16, 4))
    mapped = np.load(path, mmap_mode="r")
    assert read_only_map(mapped) and read_only_map(mapped[2:]) and read_only_map(np.asarray(mapped))
    with pytest.raises(ValueError, match="WRITEABLE"):  # why it is safe: no view of it can be made writable
        np.asarray(mapped)[:4].setflags(write=True)
    big = np.arange(20_000 * 16, dtype=np.float32).reshape(20_000, 16)
    table_view = big.view()
    table_view.setflags(write=False)  # read-only, but big[:2_000] is a writable alias of it
    for data in (big, table_view, np.load(path, mmap_mode="r+"), np.load(path, mmap_mode="c")):
        assert not read_only_map(data)
    ids = np.arange(2_000)[::-1].copy()  # 128 KB of output: gathered straight into out=, which aliases the table
    want = np.take(big, ids, axis=0)
    for backend in ("numpy", "onnxruntime"):
        big[:] = np.arange(big.size, dtype=np.float32).reshape(big.shape)
        assert_bitwise(backends.lookup(table_view, backend)(ids, out=big[:2_000]), want)


@pytest.mark.parametrize(("tokens", "message"), [
    (None, "tokens must be a string or a list of strings, got NoneType"),
    ([["w1"]], "tokens must be a string or a list of strings, got a list holding list"),
    ([b"w1"], r"token b'w1' \(position 0\) has type bytes, not str; decode bytes first"),
    (["w1", 3], r"token 3 \(position 1\) has type int, not str"),
], ids=["None", "nested", "bytes", "int"])
def test_tokens_that_are_not_strings_are_refused(backend: str, tokens: Any, message: str) -> None:
    """Even with an OOV row (OOV = 2 here): a bytes or int token could never match, so it is an error."""
    with pytest.raises(VocabularyError, match=message):
        cached_lookup(backend, "float32", "error").tokens(tokens)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ndarray_subclasses_as_ids(backend: str) -> None:
    lookup = cached_lookup(backend, "float32", "error")
    data = table("float32").data
    assert_bitwise(lookup(np.matrix([[1, 2]])), data[[[1, 2]]])
    with pytest.raises(IdError, match=r"masked array.*ids.compressed\(\)"):
        lookup(np.ma.masked_array([1, 2], [0, 1]))


@pytest.mark.parametrize("oov_id", [3.5, True, "3"], ids=repr)
def test_oov_id_must_be_an_integer(oov_id: Any) -> None:
    with pytest.raises(InputError, match=f"oov_id must be an integer row number, got {re.escape(repr(oov_id))}"):
        backends.lookup(table("float32"), "numpy", "oov", oov_id=oov_id)
    with pytest.raises(InputError, match="oov_id must be an integer row number"):
        EmbeddingTable("t", np.zeros((4, 2), np.float32), oov_id=oov_id)
    assert backends.lookup(table("float32"), "numpy", "oov", oov_id=np.int64(4)).oov_id == 4


@pytest.mark.parametrize("threads", [0, 2**31, True, 1.0], ids=repr)
def test_threads_out_of_range_is_an_input_error(backend: str, threads: Any) -> None:
    with pytest.raises(InputError, match="threads must be an integer from 1 to 1024"):
        backends.lookup(table("float32"), backend, threads=threads)


@pytest.mark.parametrize("backend_name", ["onnxruntime", "torch"])
def test_big_endian_table_names_the_byte_order(backend_name: str) -> None:
    pytest.importorskip(backend_name)
    with pytest.raises(BackendError, match=r"non-native byte order \(>f4\); convert it once"):
        backends.lookup(np.ones((3, 2), ">f4"), backend_name)
