"""Tiny Keras models for the converter tests, built by the session-scoped ``kmodels`` fixture.

Every builder seeds Keras, so weights are the same on every run; vocabularies and tables
have a handful of rows. ``kmodels.keras`` and ``kmodels.tf`` are the imported modules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


class KerasModels:
    """Builders of small models; each returns a fresh, seeded model."""

    def __init__(self) -> None:
        from converters.keras_env import import_keras

        self.tf, self.keras = import_keras()

    def seed(self, seed: int = 0) -> None:
        self.keras.utils.set_random_seed(seed)

    def functional(self, ids_dtype: str = "int32", length: int | None = None) -> Any:
        """ids -> Embedding(tok_emb) -> Dense(head); the Input may have a static length."""
        k = self.keras
        self.seed()
        ids = k.Input((length,), dtype=ids_dtype, name="ids")
        x = k.layers.Embedding(11, 4, name="tok_emb")(ids)
        return k.Model(ids, k.layers.Dense(3, name="head")(x), name="functional_model")

    def sequential(self) -> Any:
        """int64 ids -> Embedding(seq_emb): the output is the embedding itself."""
        k = self.keras
        self.seed(1)
        return k.Sequential([k.Input((None,), dtype="int64"), k.layers.Embedding(9, 5, name="seq_emb")], name="seq")

    def subclassed(self) -> Any:
        """A subclassed model holding a custom layer that holds the Embedding (path ``block/sub_emb``)."""
        k = self.keras
        self.seed(2)

        class Block(k.layers.Layer):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.emb = k.layers.Embedding(7, 3, name="sub_emb")

            def call(self, ids: Any) -> Any:
                return self.emb(ids)

        class Sub(k.Model):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.block = Block(name="block")
                self.head = k.layers.Dense(2, name="head")

            def call(self, ids: Any) -> Any:
                return self.head(self.block(ids))

        return Sub(name="sub")

    def nested(self) -> Any:
        """ids -> encoder(Functional: Embedding tok_emb) + Embedding(outer_emb) -> mean."""
        k = self.keras
        self.seed(3)
        inner = k.Input((None,), dtype="int32", name="inner_ids")
        encoder = k.Model(inner, k.layers.Embedding(6, 4, name="tok_emb")(inner), name="encoder")
        ids = k.Input((None,), dtype="int32", name="ids")
        x = k.layers.Add(name="add")([encoder(ids), k.layers.Embedding(6, 4, name="outer_emb")(ids)])
        return k.Model(ids, k.layers.GlobalAveragePooling1D(name="mean")(x), name="nested")

    def two_inputs(self) -> Any:
        """Named int32 and int64 inputs, two tables, two named outputs."""
        k = self.keras
        self.seed(4)
        words = k.Input((None,), dtype="int32", name="words")
        chars = k.Input((None,), dtype="int64", name="chars")
        a = k.layers.Embedding(10, 4, name="word_emb")(words)
        b = k.layers.Embedding(7, 4, name="char_emb")(chars)
        return k.Model({"words": words, "chars": chars}, {"word_vec": a, "char_vec": b}, name="two_inputs")

    def shared(self) -> Any:
        """One Embedding layer called twice: one table, one source."""
        k = self.keras
        self.seed(5)
        a = k.Input((None,), dtype="int64", name="left")
        b = k.Input((None,), dtype="int64", name="right")
        emb = k.layers.Embedding(8, 4, name="shared_emb")
        return k.Model([a, b], k.layers.Add(name="sum")([emb(a), emb(b)]), name="shared")

    def twins(self) -> Any:
        """Two Embedding layers with equal weights: tf2onnx merges them into one initializer."""
        k = self.keras
        self.seed(6)
        ids = k.Input((None,), dtype="int32", name="ids")
        first, second = k.layers.Embedding(8, 4, name="twin_a"), k.layers.Embedding(8, 4, name="twin_b")
        out = k.layers.Concatenate(name="both")([first(ids), second(ids)])
        model = k.Model(ids, out, name="twins")
        second.embeddings.assign(first.embeddings.numpy())
        return model

    def mask_zero(self) -> Any:
        """Embedding(mask_zero=True) whose output is the embedding itself."""
        k = self.keras
        self.seed(7)
        ids = k.Input((None,), dtype="int64", name="ids")
        return k.Model(ids, k.layers.Embedding(6, 3, mask_zero=True, name="masked_emb")(ids), name="masked")

    def string_lookup(self) -> Any:
        """tokens -> StringLookup -> Embedding(tok_emb) + encoder(Embedding inner_emb): both get the vocab."""
        k = self.keras
        self.seed(8)
        tokens = k.Input((None,), dtype="string", name="tokens")
        lookup = k.layers.StringLookup(vocabulary=["red", "green", "blue"], name="lookup")
        ids = lookup(tokens)
        inner = k.Input((None,), dtype="int64", name="inner_ids")
        encoder = k.Model(inner, k.layers.Embedding(4, 3, name="inner_emb")(inner), name="encoder")
        out = k.layers.Add(name="sum")([k.layers.Embedding(4, 3, name="tok_emb")(ids), encoder(ids)])
        return k.Model(tokens, out, name="strings")

    def string_lookup_concat(self) -> Any:
        """StringLookup -> two Embeddings -> Concatenate: tf2onnx 1.17 writes a Concat without axis."""
        k = self.keras
        self.seed(8)
        tokens = k.Input((None,), dtype="string", name="tokens")
        ids = k.layers.StringLookup(vocabulary=["red", "green"], name="lookup")(tokens)
        first, second = k.layers.Embedding(3, 2, name="emb_a")(ids), k.layers.Embedding(3, 2, name="emb_b")(ids)
        return k.Model(tokens, k.layers.Concatenate(name="both")([first, second]), name="strings_concat")

    def integer_lookup(self) -> Any:
        """codes -> IntegerLookup(mask 0) -> Embedding(code_emb)."""
        k = self.keras
        self.seed(9)
        codes = k.Input((None,), dtype="int64", name="codes")
        lookup = k.layers.IntegerLookup(vocabulary=[10, 20, 30], mask_token=0, name="codes_lookup")
        return k.Model(codes, k.layers.Embedding(5, 2, name="code_emb")(lookup(codes)), name="ints")

    def string_lookup_masked(self) -> Any:
        """StringLookup with a mask token: tf2onnx 1.17 fails on it (shape inference of SelectV2)."""
        k = self.keras
        tokens = k.Input((None,), dtype="string", name="tokens")
        lookup = k.layers.StringLookup(vocabulary=["a", "b"], mask_token="", name="lookup")
        return k.Model(tokens, k.layers.Embedding(4, 2, name="tok_emb")(lookup(tokens)), name="masked_strings")

    def positions(self, length: int = 8, max_len: int = 12) -> Any:
        """Token + position embeddings; the position table is a plain weight indexed by arange(seq)."""
        k = self.keras
        self.seed(10)

        class PositionEmbedding(k.layers.Layer):
            def build(self, input_shape: Any) -> None:
                self.positions = self.add_weight(shape=(max_len, 4), name="positions", initializer="uniform")

            def call(self, x: Any) -> Any:
                rows = k.ops.take(self.positions, k.ops.arange(k.ops.shape(x)[1]), axis=0)
                return x + k.ops.expand_dims(rows, 0)

        ids = k.Input((length,), dtype="int32", name="ids")
        tok = k.layers.Embedding(10, 4, name="tok_emb")(ids)
        return k.Model(ids, PositionEmbedding(name="pos_emb")(tok), name="positions")

    def constant_table(self) -> Any:
        """A layer gathering from a constant that is no weight: the table stays unmapped."""
        k = self.keras
        table = np.arange(24, dtype=np.float32).reshape(6, 4) / 7.0

        class ConstantLookup(k.layers.Layer):
            def call(self, ids: Any) -> Any:
                return k.ops.take(k.ops.convert_to_tensor(table), ids, axis=0)

        ids = k.Input((None,), dtype="int64", name="ids")
        return k.Model(ids, ConstantLookup(name="const_lookup")(ids), name="constant")

    def with_lambda(self) -> Any:
        """A Lambda layer: a saved .keras file then holds Python code."""
        k = self.keras
        self.seed(11)
        ids = k.Input((None,), dtype="int32", name="ids")
        x = k.layers.Embedding(6, 2, name="tok_emb")(ids)
        return k.Model(ids, k.layers.Lambda(lambda t: t * 2.0, name="double")(x), name="lam")


@pytest.fixture(scope="session")
def kmodels() -> KerasModels:
    """Model builders (imports TensorFlow and Keras once per session)."""
    return KerasModels()
