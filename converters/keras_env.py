"""Import TensorFlow, Keras and tf2onnx lazily and quietly; capture their log messages.

Nothing here runs at import time: ``converters.keras*`` modules call :func:`import_keras`
inside their functions, so ``import converters.keras`` stays cheap and ``import bridge`` never
loads TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from bridge.errors import UnsupportedError

#: Loggers whose messages a conversion captures instead of printing.
_QUIET_LOGGERS = ("tf2onnx", "tensorflow", "absl")
_FCT = re.compile(r" \(fct=<.*?>\)")
#: Notices TensorFlow's native code writes to stderr while it is imported, whatever TF_CPP_MIN_LOG_LEVEL
#: says (TensorFlow 2.21 logs through absl before absl is initialized).
_IMPORT_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cpu_feature_guard"
    r"|This TensorFlow binary is optimized|Unable to register cu(?:DNN|FFT|BLAS) factory"
    r"|computation placer already registered|TF-TRT Warning"
)


def legacy_keras_requested() -> bool:
    """True when ``TF_USE_LEGACY_KERAS`` asks for Keras 2 (tf_keras), as TensorFlow itself reads it."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


def import_keras() -> tuple[ModuleType, ModuleType]:
    """Return ``(tensorflow, keras)``, silencing TensorFlow's C++ logs before the first import.

    ``keras`` is Keras 3, or Keras 2 (the ``tf_keras`` package, what ``tf.keras`` then is) when
    ``TF_USE_LEGACY_KERAS=1`` was set before TensorFlow was imported. Raises
    :class:`UnsupportedError` when Keras runs on a backend other than TensorFlow (tf2onnx
    converts TensorFlow graphs only).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _first_import("tensorflow", "tf_keras" if legacy_keras_requested() else "keras"):
            import tensorflow as tf
            if legacy_keras_requested():
                import tf_keras as keras
            else:
                import keras
    except ImportError as exc:
        extra = " and tf_keras (TF_USE_LEGACY_KERAS is set)" if legacy_keras_requested() else ""
        raise UnsupportedError(
            f"the Keras converter needs tensorflow and keras{extra} ({exc}); install them with "
            "pip install 'embedding-bridge[keras]'"
        ) from exc
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UnsupportedError(
            f"Keras runs on the {backend!r} backend; tf2onnx converts TensorFlow graphs only. "
            "Set KERAS_BACKEND=tensorflow before Python imports keras."
        )
    return tf, keras


@contextlib.contextmanager
def native_notices_dropped() -> Iterator[None]:
    """Within the block, drop TensorFlow's start-up notices that native code writes to stderr.

    File descriptor 2 points at a temporary file during the block; afterwards every line that is not
    one of the known notices (:data:`_IMPORT_NOTICES`) is written to ``sys.stderr``, so errors and
    anything unexpected still show (after the block instead of during it).
    """
    saved = _duplicate_stderr()
    if saved is None:  # no file descriptor 2 to redirect (an embedded interpreter): leave it alone
        yield
        return
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
                capture.seek(0)
                _pass_on(capture.read().decode("utf-8", errors="replace"))
    finally:
        os.close(saved)


def _first_import(*modules: str) -> contextlib.AbstractContextManager[None]:
    """:func:`native_notices_dropped` while one of ``modules`` is still to be imported; a no-op afterwards
    (``import_keras`` runs on every ``to_numpy``: no file-descriptor juggling there)."""
    if all(name in sys.modules for name in modules):
        return contextlib.nullcontext()
    return native_notices_dropped()


def _duplicate_stderr() -> int | None:
    _flush_stderr()
    try:
        return os.dup(2)
    except OSError:
        return None


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):  # sys.stderr may be None (pythonw) or closed
        sys.stderr.flush()


def _pass_on(text: str) -> None:
    """Write the lines of ``text`` that are not known start-up notices to stderr."""
    kept = "".join(line for line in text.splitlines(keepends=True) if not _IMPORT_NOTICES.search(line))
    if not kept:
        return
    if sys.stderr is not None:
        sys.stderr.write(kept)
    else:
        os.write(2, kept.encode("utf-8", errors="replace"))


def to_numpy(value: Any) -> np.ndarray:
    """A Keras 3 or Keras 2 tensor or variable as a NumPy array (bfloat16 as ml_dtypes.bfloat16)."""
    _, keras = import_keras()
    ops = getattr(keras, "ops", None)
    if ops is not None:
        return np.asarray(ops.convert_to_numpy(value))
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def import_tf2onnx() -> ModuleType:
    """Return the ``tf2onnx`` module (after TensorFlow, so its import is quiet too)."""
    import_keras()
    try:
        with _first_import("tf2onnx"):
            import tf2onnx
    except ImportError as exc:
        raise UnsupportedError(f"the Keras converter needs tf2onnx ({exc}); pip install tf2onnx") from exc
    return tf2onnx


class _ListHandler(logging.Handler):
    """Collects one line per record: the first line of the message and the exception, if any."""

    def __init__(self, lines: list[str], level: int) -> None:
        super().__init__(level)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        except Exception:  # noqa: BLE001 - a broken log record must not break a conversion
            first = str(record.msg)
        first = _FCT.sub("", first)
        exc = record.exc_info[1] if record.exc_info else None
        line = f"{record.name}: {first}" + (f" ({type(exc).__name__}: {exc})" if exc is not None else "")
        if line not in self.lines:
            self.lines.append(line)


@contextlib.contextmanager
def captured_logs(level: int = logging.ERROR) -> Iterator[list[str]]:
    """Within the block, messages of tf2onnx/TensorFlow/absl at ``level`` or above go to the yielded list.

    Lower-level messages are dropped; nothing reaches stdout or stderr. Logger levels,
    handlers and propagation are restored on exit.
    """
    lines: list[str] = []
    handler = _ListHandler(lines, level)
    saved = []
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    try:
        yield lines
    finally:
        for logger, lvl, propagate, handlers in saved:
            logger.handlers = handlers
            logger.setLevel(lvl)
            logger.propagate = propagate
