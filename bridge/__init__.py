"""embedding-bridge: move embedding tables between Keras, ONNX, PyTorch and NumPy, bit for bit.

The core imports numpy and onnx only; onnxruntime and torch load inside their adapters, and
tensorflow only inside :mod:`converters`.

    import bridge
    store = bridge.open_store("out/")                       # verifies checksums, memory-maps tables
    lookup = bridge.lookup(store["tok_emb"], backend="onnxruntime", policy="error")
    vectors = lookup([[1, 2, 3]])
"""

from __future__ import annotations

from bridge.errors import BridgeError
from bridge.store import Store, open_store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.vocab import Vocabulary

__version__ = "0.1.0"

__all__ = [
    "BridgeError",
    "EmbeddingTable",
    "SourceRef",
    "Store",
    "Vocabulary",
    "open_store",
    "write_store",
    "__version__",
]
