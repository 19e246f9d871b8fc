"""Framework converters (Keras via tf2onnx, ...).

Each submodule imports its framework lazily; this package itself imports nothing.
"""
