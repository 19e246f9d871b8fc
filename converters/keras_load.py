"""Load what the Keras converter accepts: a keras.Model, a ``.keras`` file, a legacy ``.h5`` file,
or a TensorFlow SavedModel directory.

``.keras`` and ``.h5`` files load with ``safe_mode=True`` unless the caller opts out: Keras
then refuses to deserialize Python code (a ``Lambda`` layer). A SavedModel holds TensorFlow
graphs, not Python code; Keras 3 cannot load it as a Model, so its serving signature is
wrapped in a :class:`keras.layers.TFSMLayer` and its tables are mapped to the variables the
signature reads.

A damaged file is bad input (:class:`~bridge.errors.ModelFormatError`, one line naming the file and
what is wrong): a ``.keras`` file is checked before Keras opens it
(:func:`converters.keras_layout.check_archive`, the check the streamed path makes too; Keras itself
calls a truncated archive "File not found"), and what Keras or h5py still raise about a damaged
archive or legacy ``.h5`` file is worded by :func:`load_error`.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from bridge.errors import InputError, ModelFormatError, UnsupportedError
from bridge.npyio import file_sha256
from converters.keras_env import captured_logs, import_keras
from converters.keras_layout import archive_error, check_archive, weights_error
from converters.keras_signature import DICT, InputSpec, Signature

SUPPORTED_INPUTS = (
    "a keras.Model object, a .keras file, a legacy .h5/.hdf5 file, or a TensorFlow SavedModel directory"
)
SAVED_MODEL_ENDPOINT = "serving_default"


@dataclass
class LoadedModel:
    """A model ready to convert.

    ``model`` is what gets called: a keras.Model, or for a SavedModel a TFSMLayer.
    ``signature`` is set for a SavedModel (its serving signature); ``variables`` holds the
    SavedModel's ``(name, variable)`` pairs used to map tables back.
    """

    model: Any
    kind: str
    path: Path | None = None
    signature: Signature | None = None
    variables: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", "model"))

    def provenance(self) -> dict[str, Any]:
        """Source description: kind, path, sha256 of the file (of a SavedModel: of its files)."""
        info: dict[str, Any] = {"kind": self.kind, "model_name": self.name}
        if self.path is not None:
            info["path"] = str(self.path)
            info["sha256"] = directory_sha256(self.path) if self.path.is_dir() else file_sha256(self.path)
            if self.path.is_dir():
                info["sha256_of"] = "sorted relative file paths and contents of the directory"
        return info


def directory_sha256(root: Path) -> str:
    """sha256 over every file under ``root``: its relative path (``/``-separated), a NUL, its bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load(source: Any, *, safe_mode: bool = True) -> LoadedModel:
    """Load ``source`` (a model object or a path); see :data:`SUPPORTED_INPUTS`."""
    if isinstance(source, (str, os.PathLike)):
        return load_path(Path(source), safe_mode=safe_mode)
    _, keras = import_keras()
    if isinstance(source, keras.Model):
        return LoadedModel(model=source, kind="memory")
    raise InputError(f"cannot convert a {type(source).__module__}.{type(source).__name__}; expected {SUPPORTED_INPUTS}")


def load_path(path: Path, *, safe_mode: bool = True) -> LoadedModel:
    """Load a ``.keras``/``.h5`` file or a SavedModel directory."""
    if not path.exists():
        raise InputError(f"model path {str(path)!r} does not exist; expected {SUPPORTED_INPUTS}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return load_saved_model(path)
        raise InputError(
            f"directory {str(path)!r} is not a SavedModel (no saved_model.pb); expected {SUPPORTED_INPUTS}"
        )
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        kind = "keras" if suffix == ".keras" else "h5"
        return LoadedModel(model=_load_keras_file(path, safe_mode), kind=kind, path=path)
    hint = "; an ONNX model goes to bridge.extract.extract / `embridge extract`" if suffix == ".onnx" else ""
    raise InputError(
        f"unsupported model file {str(path)!r} (suffix {suffix or 'none'!r}); expected {SUPPORTED_INPUTS}{hint}"
    )


def _load_keras_file(path: Path, safe_mode: bool) -> Any:
    if path.suffix.lower() == ".keras":
        check_archive(path)
    _, keras = import_keras()
    try:
        with captured_logs():
            model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, TypeError, OSError, ...
        raise load_error(path, exc) from exc
    if not isinstance(model, keras.Model):
        raise ModelFormatError(f"{str(path)!r} holds a {type(model).__name__}, not a keras.Model")
    return model


def load_error(path: Path, exc: Exception) -> Exception:
    """The library error for a Keras load failure: unsafe code, unknown custom classes, a damaged file, or else."""
    text = str(exc)
    if isinstance(exc, zipfile.BadZipFile) or (isinstance(exc, OSError) and exc.errno is None):
        return _damaged_file_error(path, exc)  # zipfile or h5py (no errno: not the OS) on a damaged file
    if "safe_mode" in text:
        return InputError(
            f"{str(path)!r} contains arbitrary code (a Lambda layer or other Python function) that Keras "
            f"will not load with safe_mode=True; if you trust this file, pass safe_mode=False (CLI: --unsafe)"
        )
    if "Could not locate" in text or "Unknown layer" in text or "custom_object" in text:
        legacy = (" A legacy .h5 file may also hold TensorFlow op layers (NotEqual, ...) that Keras 3 cannot "
                  "rebuild: load it where it was made and re-save it as .keras.") if path.suffix != ".keras" else ""
        return ModelFormatError(
            f"Keras could not rebuild {str(path)!r}: {_first_line(text)}; import the module that defines "
            f"its custom classes (registered with keras.saving.register_keras_serializable) before converting.{legacy}"
        )
    return ModelFormatError(f"Keras could not load {str(path)!r}: {type(exc).__name__}: {_first_line(text)}")


def _damaged_file_error(path: Path, exc: Exception) -> ModelFormatError:
    """A ``.keras`` archive or legacy ``.h5`` file that zipfile or h5py cannot read."""
    if path.suffix.lower() == ".keras":
        zipped = isinstance(exc, zipfile.BadZipFile)
        return archive_error(path, f"it is damaged ({_first_line(str(exc))})") if zipped else weights_error(path, exc)
    what = "the file is empty" if path.is_file() and path.stat().st_size == 0 else _first_line(str(exc))
    return ModelFormatError(f"could not load {str(path)!r}: not a valid HDF5 model file: {what}; re-save the model")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no message"


@cache
def _signature_layer_class() -> type:
    """A TFSMLayer that calls a signature (keyword arguments only) with a dict of inputs."""
    _, keras = import_keras()

    class SignatureLayer(keras.layers.TFSMLayer):  # type: ignore[misc, name-defined]
        def call(self, inputs: Any, training: bool = False, **kwargs: Any) -> Any:
            return self.call_endpoint_fn(**inputs)

    return SignatureLayer


def load_saved_model(path: Path) -> LoadedModel:
    """Wrap the SavedModel's ``serving_default`` signature as a layer; collect the variables it reads."""
    try:
        with captured_logs():
            layer = _signature_layer_class()(str(path), call_endpoint=SAVED_MODEL_ENDPOINT)
    except ValueError as exc:
        raise InputError(
            f"SavedModel {str(path)!r} has no {SAVED_MODEL_ENDPOINT!r} signature ({_first_line(str(exc))}); "
            "export it with model.export(path) or tf.saved_model.save(model, path, signatures=...)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises many types for a bad SavedModel
        raise ModelFormatError(f"TensorFlow could not load SavedModel {str(path)!r}: {_first_line(str(exc))}") from exc
    fn = layer.call_endpoint_fn
    args, kwargs = fn.structured_input_signature
    if args or not kwargs:
        raise UnsupportedError(f"SavedModel {str(path)!r}: its serving signature takes positional inputs; "
                               "only keyword (named) inputs are supported")
    specs = tuple(InputSpec(str(k), tuple(s.shape.as_list()), s.dtype.name) for k, s in kwargs.items())
    variables = [(str(v.name).removesuffix(":0"), v) for v in fn.variables]
    return LoadedModel(model=layer, kind="saved_model", path=path, signature=Signature(specs, DICT),
                       variables=variables)
