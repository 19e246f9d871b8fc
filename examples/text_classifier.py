"""The bundled example: a tiny review classifier with a StringLookup vocabulary.

tokens (string [batch, seq]) -> StringLookup -> Embedding("tok_emb", mask_zero) -> mean -> Dense.
Trained for a few seconds, deterministically, on ``examples/data/reviews.tsv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CORPUS = Path(__file__).with_name("data") / "reviews.tsv"
EMBED_DIM = 16


def read_corpus(path: Path = CORPUS) -> tuple[list[list[str]], np.ndarray]:
    """Whitespace-tokenized texts and float32 labels from a ``label<TAB>text`` file."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.split("\t", 1) for line in lines if line.strip()]
    return [text.split() for _, text in pairs], np.array([float(label) for label, _ in pairs], np.float32)


def pad(texts: list[list[str]], length: int | None = None) -> np.ndarray:
    """A [batch, length] array of tokens padded with "" (an OOV token, masked by the model)."""
    length = length or max(map(len, texts))
    return np.array([t[:length] + [""] * (length - len(t[:length])) for t in texts], dtype=object)


def build_and_train(epochs: int = 15, seed: int = 0) -> Any:
    """Build and train the classifier; returns the keras.Model (same weights for the same seed)."""
    from converters.keras_env import import_keras  # TensorFlow and Keras, imported without start-up notices

    tf, keras = import_keras()

    keras.utils.set_random_seed(seed)
    texts, labels = read_corpus()
    vocab = sorted({w for t in texts for w in t})
    tokens = keras.Input(shape=(None,), dtype="string", name="tokens")
    ids = keras.layers.StringLookup(vocabulary=vocab, name="lookup")(tokens)
    vectors = keras.layers.Embedding(len(vocab) + 1, EMBED_DIM, mask_zero=True, name="tok_emb")(ids)
    pooled = keras.layers.GlobalAveragePooling1D(name="mean")(vectors)
    score = keras.layers.Dense(1, activation="sigmoid", name="head")(pooled)
    model = keras.Model(tokens, score, name="review_classifier")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(tf.constant(pad(texts).astype(str)), labels, epochs=epochs, batch_size=32, verbose=0)
    return model
