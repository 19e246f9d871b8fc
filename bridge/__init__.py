"""embedding-bridge: move embedding tables between Keras, ONNX, PyTorch and NumPy, bit for bit.

The core imports numpy, ml_dtypes and tqdm only; onnxruntime and torch load inside their adapters, and
tensorflow only inside :mod:`converters`.

    import bridge
    store = bridge.open_store("out/")                       # verifies checksums, memory-maps tables
    lookup = bridge.lookup(store["tok_emb"], backend="onnxruntime", policy="error")
    vectors = lookup([[1, 2, 3]])
"""

from __future__ import annotations

from bridge.backends import BACKENDS, Lookup, available_backends, lookup
from bridge.errors import BridgeError
from bridge.parity import Comparison, ParityReport, compare, parity_ids, table_parity
from bridge.policy import POLICIES, IndexPolicy
from bridge.quantization import Quantization, dense
from bridge.store import Store, open_store, write_store
from bridge.table import EmbeddingTable, SourceRef
from bridge.vocab import Vocabulary

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "POLICIES",
    "BridgeError",
    "Comparison",
    "IndexPolicy",
    "Lookup",
    "ParityReport",
    "Quantization",
    "EmbeddingTable",
    "SourceRef",
    "Store",
    "Vocabulary",
    "available_backends",
    "compare",
    "dense",
    "lookup",
    "open_store",
    "parity_ids",
    "table_parity",
    "write_store",
    "__version__",
]
