"""PyTorch converter: tables to ``nn.Embedding``, Keras layers to torch, torch modules to a store.

    from converters.torch import to_torch_embedding, keras_to_torch, extract_torch
    emb = to_torch_embedding(store["tok_emb"])                      # frozen, bit-exact weight
    emb, report = keras_to_torch(keras_layer)                        # + what does not carry over
    store = extract_torch(module, (ids,), "out/", dynamo=False)      # torch.onnx -> scan -> store

torch (and, for :func:`keras_to_torch`, TensorFlow) is imported when a function runs, never at
import time. The pieces live in :mod:`converters.torch_embedding`, :mod:`converters.torch_keras`,
:mod:`converters.torch_export`, :mod:`converters.torch_map` and :mod:`converters.semantics`.
"""

from __future__ import annotations

from converters.semantics import SemanticDifference, SemanticsReport
from converters.torch_embedding import to_torch_embedding, to_torch_embedding_bag
from converters.torch_export import ONNX_FILE, export_onnx, extract_torch
from converters.torch_keras import keras_to_torch

__all__ = [
    "ONNX_FILE",
    "SemanticDifference",
    "SemanticsReport",
    "export_onnx",
    "extract_torch",
    "keras_to_torch",
    "to_torch_embedding",
    "to_torch_embedding_bag",
]
