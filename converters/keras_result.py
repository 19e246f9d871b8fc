"""What a Keras conversion hands back and records: the result, the ONNX file name, the provenance.

Shared by the ordinary path (:mod:`converters.keras`) and the large-table path
(:mod:`converters.keras_large`); :mod:`converters.keras` re-exports :data:`ONNX_FILE` and
:class:`ConversionResult` as its public names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from bridge.store import Store
from bridge.table import EmbeddingTable
from converters.keras_env import import_keras, import_tf2onnx
from converters.keras_load import LoadedModel
from converters.keras_onnx import OnnxConversion
from converters.keras_signature import Signature

#: The converted model's file name inside the output directory.
ONNX_FILE = "model.onnx"

__all__ = ["ONNX_FILE", "ConversionResult", "conversion_provenance"]


@dataclass
class ConversionResult:
    """What :func:`converters.keras.convert` wrote: ``onnx_path`` (``OUT/model.onnx``) and the store at ``store_path``.

    ``tables`` are the store's tables (memory-mapped, with sources, vocabularies, metadata);
    ``summary`` has one row per table; ``warnings`` lists what the user should know
    (unmapped tables, layers without a table, ops tf2onnx could not convert).
    """

    onnx_path: Path
    store_path: Path
    store: Store
    tables: list[EmbeddingTable]
    summary: list[dict[str, Any]]
    warnings: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    keras_model: Any = field(default=None, repr=False)


def conversion_provenance(loaded: LoadedModel, conv: OnnxConversion, signature: Signature) -> dict[str, Any]:
    """The store's provenance for a Keras conversion: the source, the signature, the ONNX model, tool versions."""
    tf, keras = import_keras()
    tf2onnx = import_tf2onnx()
    opsets = {o.domain or "ai.onnx": int(o.version) for o in conv.model.opset_import}
    return {
        "converter": "converters.keras",
        "source": loaded.provenance(),
        "signature": signature.to_json(),
        "onnx": {"file": ONNX_FILE, "ir_version": int(conv.model.ir_version), "opsets": opsets,
                 "outputs": conv.outputs},
        "tools": {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                  "onnx": onnx.__version__},
    }
