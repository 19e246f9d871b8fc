"""The index policy on its own: id validation and what each policy does with bad ids."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.errors import BridgeError, IdError, InputError
from bridge.policy import POLICIES, IndexPolicy, as_ids

ROWS = 10


def policy(name: str, oov_id: int | None = 3) -> IndexPolicy:
    return IndexPolicy.create(name, ROWS, oov_id=oov_id, table="words")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("name", POLICIES)
def test_valid_ids_pass_unchanged_as_int32_or_int64(dtype: type, name: str) -> None:
    ids = np.array([[0, 9], [5, 1]], dtype=dtype)
    safe, zero = policy(name).apply(as_ids(ids))
    assert zero is None
    assert safe.dtype in (np.dtype(np.int32), np.dtype(np.int64))
    assert safe.shape == ids.shape
    assert safe.tolist() == ids.tolist()


def test_fast_path_returns_int64_and_int32_ids_without_copy() -> None:
    for dtype in (np.int64, np.int32):
        ids = np.arange(5, dtype=dtype)
        safe, _ = policy("error").apply(as_ids(ids))
        assert safe is ids


@pytest.mark.parametrize("size", [1, 16, 17, 1000])  # both sides of the small-array fast path
def test_range_check_finds_bad_id_at_any_size(size: int) -> None:
    for bad in (ROWS, -1):
        ids = np.zeros(size, np.int64)
        ids[-1] = bad
        with pytest.raises(IdError, match=rf"id {bad} at position \({size - 1},\)"):
            policy("error").apply(as_ids(ids))


@pytest.mark.parametrize(
    ("ids", "value", "position"),
    [
        (np.array(10), "10", r"\(\)"),
        (np.array([[1, 2], [3, 11]]), "11", r"\(1, 1\)"),
        (np.array([1, 2**63 + 5, 12], np.uint64), str(2**63 + 5), r"\(1,\)"),
        (np.array([2**64 - 1], np.uint64), str(2**64 - 1), r"\(0,\)"),
        (np.array([-1, 3], np.int8), "-1", r"\(0,\)"),
        (np.zeros((2, 3, 20), np.int32) - 11, "-11", r"\(0, 0, 0\)"),
    ],
)
def test_error_policy_names_first_bad_id_position_and_range(ids: np.ndarray, value: str, position: str) -> None:
    with pytest.raises(IdError, match=rf"id {value} at position {position}.*'words'.*0\.\.9") as info:
        policy("error").apply(as_ids(ids))
    assert isinstance(info.value, BridgeError) and isinstance(info.value, IndexError)


def test_clip() -> None:
    ids = np.array([0, 9, 10, -1, -11, 2**62], np.int64)
    safe, zero = policy("clip").apply(as_ids(ids))
    assert zero is None
    assert safe.tolist() == [0, 9, 9, 0, 0, 9]


def test_clip_uint64_beyond_int64() -> None:
    safe, _ = policy("clip").apply(as_ids(np.array([2**63 + 5, 2, 2**64 - 1], np.uint64)))
    assert safe.tolist() == [9, 2, 9]


def test_zero_marks_bad_positions() -> None:
    ids = np.array([[0, 10], [-1, 4]], np.int32)
    safe, zero = policy("zero").apply(as_ids(ids))
    assert zero is not None and zero.tolist() == [[False, True], [True, False]]
    assert safe.tolist() == [[0, 0], [0, 4]]


def test_oov_maps_bad_ids_to_oov_row() -> None:
    safe, zero = policy("oov", oov_id=7).apply(as_ids(np.array([1, 10, -1], np.int16)))
    assert zero is None and safe.tolist() == [1, 7, 7]
    safe, _ = policy("oov", oov_id=7).apply(as_ids(np.array([2**63 + 1, 4], np.uint64)))
    assert safe.tolist() == [7, 4]


def test_oov_without_row_fails_at_construction() -> None:
    with pytest.raises(InputError, match="oov_id"):
        IndexPolicy.create("oov", ROWS, oov_id=None)
    with pytest.raises(InputError, match=r"outside \[0, 10\)"):
        IndexPolicy.create("oov", ROWS, oov_id=10)


def test_wrap_negative_ids_like_keras_and_onnx() -> None:
    safe, zero = policy("wrap").apply(as_ids(np.array([-1, -10, 0, 9], np.int8)))
    assert zero is None and safe.tolist() == [9, 0, 0, 9]


@pytest.mark.parametrize(("bad", "dtype"), [(10, np.int64), (-11, np.int64), (2**63 + 5, np.uint64)])
def test_wrap_still_rejects_what_cannot_wrap(bad: int, dtype: type) -> None:
    with pytest.raises(IdError, match=rf"id {bad} at position \(1,\).*-10\.\.9"):
        policy("wrap").apply(as_ids(np.array([9, bad], dtype)))


def test_wrap_with_small_id_dtype_does_not_overflow() -> None:
    big = IndexPolicy.create("wrap", 1000)
    safe, _ = big.apply(as_ids(np.array([-1, -128], np.int8)))
    assert safe.tolist() == [999, 872]


def test_unknown_policy() -> None:
    with pytest.raises(InputError, match="error, clip, zero, oov, wrap"):
        IndexPolicy.create("nearest", ROWS)


def test_empty_table_rows() -> None:
    empty = IndexPolicy.create("zero", 0)
    safe, zero = empty.apply(as_ids(np.array([0, 5])))
    assert zero is not None and zero.all()
    with pytest.raises(IdError, match="no rows"):
        IndexPolicy.create("clip", 0).apply(as_ids(np.array([0])))


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (3, (np.int64, ())),
        ([1, 2], (np.int64, (2,))),
        ([[1], [2]], (np.int64, (2, 1))),
        ([], (np.int64, (0,))),
        ([2**63 + 5, 1], (np.uint64, (2,))),
        ([-1, 2**62], (np.int64, (2,))),
        (np.int16(4), (np.int16, ())),
        (np.array([1, 2], dtype=">i8"), (np.int64, (2,))),
    ],
)
def test_as_ids_accepts_python_ints_and_any_integer_array(ids: object, expected: tuple[type, tuple[int, ...]]) -> None:
    arr = as_ids(ids)
    assert (arr.dtype, arr.shape) == (np.dtype(expected[0]), expected[1])
    assert arr.dtype.isnative


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        (np.array([1.0, 2.0]), ["float64", "astype"]),
        (np.array([1.5], np.float16), ["float16", "astype"]),
        (np.array([True, False]), ["bool", "flatnonzero"]),
        ([True], ["bool", "flatnonzero"]),
        (np.array(["the", "cat"]), ["<U3", "tokens"]),
        ("the", ["<U3", "tokens"]),
        (np.array([1, 2], dtype=object), ["object", "int64"]),
        (None, ["object", "int64"]),
        ([1, 2.5], ["float64", "astype"]),
        ([2**70], ["does not fit in 64 bits"]),
        ([-(2**63) - 1, 2**63], ["does not fit in 64 bits"]),
    ],
)
def test_as_ids_refuses_non_integers_naming_dtype_and_fix(ids: object, words: list[str]) -> None:
    with pytest.raises(IdError) as info:
        as_ids(ids)
    for word in words:
        assert word in str(info.value)


# --- IndexPolicy.fits: the small-batch check the backends run before as_ids and apply ------------------------


class IdArray(np.ndarray):
    """An ndarray subclass: apply() accepts it, fits() leaves it to the general path."""


FITS = {
    "0d": np.array(3),
    "0d-int32": np.array(9, np.int32),
    "one": np.array([0]),
    "1x1": np.array([[9]]),
    "two": np.array([9, 0], np.int32),
    "sixteen": np.arange(16) % ROWS,
    "strided": (np.arange(8) % ROWS)[::-2],
}
DOES_NOT_FIT = {
    "seventeen": np.arange(17) % ROWS,
    "empty": np.array([], np.int64),
    "2-D": np.array([[1, 2]]),
    "uint64": np.array([3], np.uint64),
    "int16": np.array([3], np.int16),
    "big-endian": np.array([3], ">i8"),
    "float": np.array([3.0]),
    "bool": np.array([True]),
    "rows": np.array([ROWS]),
    "negative": np.array(-1, np.int32),
    "one bad of sixteen": np.append(np.arange(15) % ROWS, -1),
    "int64 min": np.array([-(2**63), 1]),
    "int64 max": np.array([2**63 - 1]),
    "subclass": np.array([3]).view(IdArray),
    "list": [3],
    "int": 3,
}


@pytest.mark.parametrize("ids", list(FITS.values()), ids=list(FITS))
@pytest.mark.parametrize("name", POLICIES)
def test_fits_only_what_apply_returns_unchanged(ids: np.ndarray, name: str) -> None:
    assert policy(name).fits(ids)
    safe, zero = policy(name).apply(as_ids(ids))
    assert safe is ids and zero is None


@pytest.mark.parametrize("ids", list(DOES_NOT_FIT.values()), ids=list(DOES_NOT_FIT))
@pytest.mark.parametrize("name", POLICIES)
def test_fits_sends_everything_else_to_the_general_path(ids: object, name: str) -> None:
    assert not policy(name).fits(ids)


def test_fits_agrees_with_apply_on_random_small_arrays() -> None:
    """fits() is exactly "native int32/int64, one id or 2-16 in 1-D, all valid"; then apply() keeps the ids."""
    rng = np.random.default_rng(7)
    dtypes = [np.dtype(d) for d in ("i1", "i2", "i4", "i8", "u1", "u8", ">i4", ">i8", "q", "i")]
    shapes = [(), (0,), (1,), (2,), (5,), (16,), (17,), (1, 1), (2, 2)]
    fitted = 0
    for _ in range(2000):
        dtype, shape = dtypes[rng.integers(len(dtypes))], shapes[rng.integers(len(shapes))]
        ids = rng.integers(0 if dtype.kind == "u" else -2, ROWS + 2, size=shape).astype(dtype)
        valid = all(0 <= v < ROWS for v in ids.reshape(-1).tolist())
        few = ids.size == 1 or (ids.ndim == 1 and 2 <= ids.size <= 16)
        expected = valid and few and dtype.isnative and dtype.char in "ilq"
        assert policy("error").fits(ids) == expected, ids
        if expected:
            fitted += 1
            safe, zero = policy("error").apply(as_ids(ids))
            assert safe is ids and zero is None
    assert fitted > 100
