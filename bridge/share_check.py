"""Check a rewritten model against its original in onnxruntime, bit for bit, on sample inputs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bridge.errors import ParityError

#: Size given to a symbolic (``dim_param``) or unknown dimension in sample inputs.
SAMPLE_DIM = 3


@dataclass(frozen=True)
class CheckResult:
    """``verified`` is True (bitwise equal), or None with ``note`` saying why it could not be checked."""

    verified: bool | None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.verified, "note": self.note}


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Copies of the main graph's inputs that are not initializers (what a caller must feed)."""
    init = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name not in init:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(value)
            found.append(copy)
    return found


def sample_feeds(inputs: Sequence[onnx.ValueInfoProto], id_rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for ``inputs`` (see :func:`model_inputs`): integer inputs get ids in ``[0, id_rows)``.

    Raises :class:`ValueError` for an input type that cannot be sampled (strings, sequences, ...).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"input {value.name!r} is not a tensor")
        ttype = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else SAMPLE_DIM for d in ttype.shape.dim)
        feeds[value.name] = _sample(rng, dtype, shape, id_rows, value.name)
    return feeds


def _sample(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...], rows: int, name: str) -> np.ndarray:
    if dtype.kind in "iu":
        return rng.integers(0, max(rows, 1), size=shape).astype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise ValueError(f"input {name!r} has dtype {dtype}, which cannot be sampled")


def ort_session(path: str | os.PathLike[str]) -> Any:
    """A single-threaded CPU onnxruntime session for the model file at ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_rewrite(
    original: str | os.PathLike[str],
    inputs: Sequence[onnx.ValueInfoProto],
    run_rewritten: Callable[[Mapping[str, np.ndarray]], Sequence[Any]],
    id_rows: int,
) -> CheckResult:
    """Run the original model and ``run_rewritten`` on the same sample inputs; compare bitwise.

    Returns ``CheckResult(None, note)`` if the original cannot be run at all (unsupported ops or
    input types); raises :class:`ParityError` if the rewritten model fails or differs.
    """
    try:
        feeds = sample_feeds(inputs, id_rows)
        expected = ort_session(original).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any failure of the ORIGINAL only means "cannot check"
        return CheckResult(None, f"the original model does not run in onnxruntime on sample inputs ({_short(exc)})")
    try:
        got = run_rewritten(feeds)
    except Exception as exc:  # noqa: BLE001 - the rewrite must run wherever the original does
        raise ParityError(f"the rewritten model of {str(original)!r} fails in onnxruntime: {_short(exc)}") from exc
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if not bitwise_equal(want, have):
            raise ParityError(
                f"output #{i} of the rewritten model of {str(original)!r} differs from the original's; "
                "nothing was written (please report this as a bug)"
            )
    return CheckResult(True)


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same type, dtype, shape and bytes (NaNs with equal bits compare equal)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return bool(type(a) is type(b) and a == b)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
