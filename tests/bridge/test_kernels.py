"""The optional C kernel (bridge/_kernels.c) against np.take, bit for bit, and the numpy backend with and without it."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bridge.backends as backends
import bridge.backends.numpy as numpy_backend
from bridge.errors import IdError
from bridge.policy import POLICIES
from bridge.table import EmbeddingTable

ROWS = 40
HAVE_COMPILER = bool(shutil.which("cc") or shutil.which("gcc")) and \
    (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
needs_kernel = pytest.mark.skipif(numpy_backend.KERNEL is None, reason="bridge._kernels was not built")


def test_kernel_is_built_where_a_compiler_is() -> None:
    """`pip install` compiles it wherever it can; a silent fallback would hide a broken build."""
    if not HAVE_COMPILER:
        pytest.skip("no C compiler or Python headers here: the numpy backend falls back to np.take")
    assert numpy_backend.KERNEL is not None, "bridge/_kernels.c was not built; reinstall with `make install`"


def random_table(dtype: np.dtype, dim: int, rows: int = ROWS) -> np.ndarray:
    rng = np.random.default_rng(dim)
    bits = rng.integers(0, 256, size=(rows, dim * dtype.itemsize), dtype=np.uint8)
    return bits.view(dtype)  # every bit pattern, NaN payloads included: a copy must keep them all


@needs_kernel
@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 8, 16, 24, 64, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int8, np.float64])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_take_rows_is_np_take(dim: int, dtype: type, id_dtype: type) -> None:
    data = random_table(np.dtype(dtype), dim)
    ids = np.random.default_rng(1).integers(0, ROWS, size=(3, 7)).astype(id_dtype)
    ids[0, :2] = (0, ROWS - 1)
    out = np.empty(ids.shape + (dim,), data.dtype)
    assert numpy_backend.KERNEL.take_rows(data, ids, out, ROWS, data.strides[0]) == -1
    assert out.tobytes() == np.take(data, ids, axis=0).tobytes()


@needs_kernel
@pytest.mark.parametrize(("bad", "id_dtype"), [
    (bad, id_dtype)
    for bad in (-1, -ROWS, ROWS, ROWS + 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63))
    for id_dtype in (np.int32, np.int64)
    if np.iinfo(id_dtype).min <= bad <= np.iinfo(id_dtype).max
])
def test_take_rows_stops_at_the_first_bad_id(bad: int, id_dtype: type) -> None:
    data = random_table(np.dtype(np.float32), 4)
    ids = np.array([5, 6, bad, 7, bad], dtype=id_dtype)
    out = np.zeros((5, 4), np.float32)
    assert numpy_backend.KERNEL.take_rows(data, ids, out, ROWS, 16) == 2
    assert out[:2].tobytes() == data[[5, 6]].tobytes()
    assert not out[2:].any()


@needs_kernel
def test_take_rows_refuses_what_it_cannot_gather_safely() -> None:
    take_rows = numpy_backend.KERNEL.take_rows
    data = random_table(np.dtype(np.float32), 4)
    ids, out = np.array([1, 2]), np.empty((2, 4), np.float32)
    with pytest.raises(TypeError, match="int32 or int64"):
        take_rows(data, ids.astype(np.uint64), out, ROWS, 16)
    with pytest.raises(TypeError, match="int32 or int64"):
        take_rows(data, ids.astype(np.int16), out, ROWS, 16)
    with pytest.raises(ValueError, match="out has 48 bytes, 2 ids of 16-byte rows need 32"):
        take_rows(data, ids, np.empty((3, 4), np.float32), ROWS, 16)
    with pytest.raises(ValueError, match="fewer than 41 rows"):
        take_rows(data, ids, out, ROWS + 1, 16)
    with pytest.raises(ValueError, match="row_bytes"):
        take_rows(data, ids, out, ROWS, 0)
    with pytest.raises(ValueError, match="not C-contiguous"):  # NumPy refuses the buffer request
        take_rows(data, ids, out.copy()[:, ::2], ROWS, 8)
    read_only = out.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        take_rows(data, ids, read_only, ROWS, 16)


@needs_kernel
@pytest.mark.parametrize("dim", [16, 64, 300])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_tables_beyond_the_cache_are_prefetched_and_still_exact(dim: int, id_dtype: type) -> None:
    """Over CACHED_BYTES the kernel prefetches the row 8 ids ahead: never past the last id or the table."""
    rows = numpy_backend.KERNEL.CACHED_BYTES // (dim * 4) + 7
    data = random_table(np.dtype(np.float32), dim, rows=rows)
    assert data.nbytes > numpy_backend.KERNEL.CACHED_BYTES
    take_rows = numpy_backend.KERNEL.take_rows
    for n in (1, 7, 8, 9, 1000):
        ids = np.random.default_rng(n).integers(0, rows, n).astype(id_dtype)
        ids[-1] = rows - 1
        out = np.empty((n, dim), np.float32)
        assert take_rows(data, ids, out, rows, dim * 4) == -1
        assert out.tobytes() == np.take(data, ids, axis=0).tobytes()
        ids[n // 2] = rows  # a bad id the prefetch reads 8 positions earlier: skipped there, refused here
        assert take_rows(data, ids, out, rows, dim * 4) == n // 2


@needs_kernel
@pytest.mark.parametrize(("dim", "rows", "used"), [
    (3, ROWS, False), (5, ROWS, False), (6, ROWS, False),  # odd rows under 64 bytes, a cached table: np.take
    (1, ROWS, True), (2, ROWS, True), (4, ROWS, True), (8, ROWS, True), (16, ROWS, True), (17, ROWS, True),
    (3, 100_000, True),  # the same odd rows from a table past the cache: prefetching pays
])
def test_the_kernel_serves_where_it_was_measured_faster(dim: int, rows: int, used: bool) -> None:
    data = np.zeros((rows, dim), np.float32)
    lookup = backends.lookup(EmbeddingTable(name="t", data=data), "numpy")
    assert (lookup._unchecked_from == 1) is used


def lookups(policy: str, data: np.ndarray) -> tuple[backends.Lookup, backends.Lookup]:
    """The numpy backend as built here, and the same one with the kernel path turned off."""
    table = EmbeddingTable(name="t", data=data)
    fast = backends.lookup(table, "numpy", policy=policy, oov_id=3 if policy == "oov" else None)
    plain = backends.lookup(table, "numpy", policy=policy, oov_id=3 if policy == "oov" else None)
    plain._unchecked_from = 0
    return fast, plain


@needs_kernel
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_lookup_with_the_kernel_is_lookup_without_it(policy: str, id_dtype: type) -> None:
    data = random_table(np.dtype(np.float32), 8)
    fast, plain = lookups(policy, data)
    assert fast._unchecked_from == 1 and fast._take_rows is numpy_backend.KERNEL.take_rows
    rng = np.random.default_rng(2)
    for ids in (rng.integers(0, ROWS, 5000), rng.integers(-ROWS, ROWS, 5000), rng.integers(0, ROWS, (50, 3)),
                rng.integers(0, ROWS, 100)[::3], np.array([ROWS]), np.array(7)):
        ids = ids.astype(id_dtype)
        try:
            want = plain(ids)
        except IdError as exc:
            with pytest.raises(IdError) as got:
                fast(ids)
            assert str(got.value) == str(exc)
            continue
        assert fast(ids).tobytes() == want.tobytes()
        out = np.empty_like(want)
        assert fast(ids, out=out) is out and out.tobytes() == want.tobytes()


@needs_kernel
def test_out_overlapping_the_table_takes_numpys_buffered_path() -> None:
    """Gathering into the table itself must read every row before any is overwritten (as np.take does)."""
    data = random_table(np.dtype(np.float32), 4, rows=64)
    want = np.take(data, np.arange(63, -1, -1), axis=0)
    lookup = backends.lookup(EmbeddingTable(name="t", data=data), "numpy")
    lookup(np.arange(63, -1, -1), out=data)
    assert data.tobytes() == want.tobytes()


def test_without_the_kernel_the_backend_falls_back_to_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numpy_backend, "KERNEL", None)
    data = random_table(np.dtype(np.float32), 6)
    lookup = backends.lookup(EmbeddingTable(name="t", data=data), "numpy")
    assert lookup._unchecked_from == 0
    ids = np.random.default_rng(3).integers(0, ROWS, 5000)
    assert lookup(ids).tobytes() == np.take(data, ids, axis=0).tobytes()
    with pytest.raises(IdError, match="-1"):
        lookup(np.array([1, -1] * 100))


def test_a_strided_table_is_served_without_the_kernel() -> None:
    data = random_table(np.dtype(np.float32), 8)[:, ::2]
    lookup = backends.lookup(EmbeddingTable(name="t", data=data), "numpy")
    assert lookup._unchecked_from == 0
    ids = np.arange(ROWS)[::-1]
    assert lookup(ids).tobytes() == np.take(data, ids, axis=0).tobytes()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("policy", ["error", "wrap"])
@pytest.mark.parametrize("bad_out", ["dtype", "shape", "fortran", "read-only", "list"])
def test_a_bad_id_is_reported_before_a_bad_out(backend: str, policy: str, bad_out: str) -> None:
    """The paths that gather before checking (the kernel, torch's index_select) keep the general path's order."""
    if backend == "torch":
        pytest.importorskip("torch")
    n = 600  # past torch's unchecked threshold (SMALL_BYTES of output)
    out: object = {
        "dtype": np.empty((n, 32), np.float64), "shape": np.empty((n, 31), np.float32),
        "fortran": np.asfortranarray(np.empty((n, 32), np.float32)), "read-only": np.empty((n, 32), np.float32),
        "list": [[0.0] * 32] * n,
    }[bad_out]
    if bad_out == "read-only":
        out.flags.writeable = False  # type: ignore[attr-defined]
    lookup = backends.lookup(EmbeddingTable(name="t", data=random_table(np.dtype(np.float32), 32)), backend,
                             policy=policy)
    assert lookup._unchecked_from
    ids = np.full(n, 1, np.int64)
    ids[-1] = ROWS
    with pytest.raises(IdError, match=f"id {ROWS} at position"):
        lookup(ids, out=out)


@needs_kernel
def test_the_kernel_serves_the_rows_bound_at_setup() -> None:
    """Like every other part of a lookup, the kernel's row count is the table's when the lookup was made."""
    table = EmbeddingTable(name="t", data=random_table(np.dtype(np.float32), 8))
    lookup = backends.lookup(table, "numpy", policy="clip")
    bound = table.data
    table.data = np.zeros((2 * ROWS, 8), np.float32)  # a mutable dataclass, reassigned after the fact
    ids = np.arange(0, 2 * ROWS, 3)
    assert lookup(ids).tobytes() == np.take(bound, ids, axis=0, mode="clip").tobytes()


@needs_kernel
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_unaligned_ids_are_copied_before_the_kernel_reads_them(id_dtype: type) -> None:
    size = np.dtype(id_dtype).itemsize
    raw = np.zeros(100 * size + 1, np.uint8)
    ids = raw[1:].view(id_dtype)  # contiguous, not aligned
    assert ids.flags.c_contiguous and not ids.flags.aligned
    ids[...] = np.arange(100) % ROWS
    data = random_table(np.dtype(np.float32), 8)
    lookup = backends.lookup(EmbeddingTable(name="t", data=data), "numpy")
    assert lookup(ids).tobytes() == np.take(data, ids.copy(), axis=0).tobytes()
