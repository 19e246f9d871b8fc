"""Text -> token ids as a Keras ``TextVectorization`` layer computes them, without TensorFlow.

onnxruntime cannot run TextVectorization's string ops (regex replace, split), so a converted model
takes ids and the text pipeline runs here. What is reproduced, from Keras 3.15's
``TextVectorization._preprocess`` / ``call`` (TensorFlow backend):

* ``standardize``: ``"lower"`` lower-cases ASCII letters only (``tf.strings.lower`` with its default
  empty encoding leaves ``"Ä"`` and ``"İ"`` alone); ``"strip_punctuation"`` deletes every match of
  :data:`KERAS_PUNCTUATION`, the regex Keras passes to ``tf.strings.regex_replace`` (ASCII characters
  only, so Python's ``re`` and RE2 match the same characters); ``"lower_and_strip_punctuation"`` does
  both, lower-casing first; ``None`` leaves the text as is.
* ``split``: ``"whitespace"`` splits on runs of the six ASCII whitespace characters and drops empty
  tokens (``tf.strings.split``; a no-break space or ``\\x1c`` does not split, unlike ``str.split()``);
  ``"character"`` splits into Unicode code points (``tf.strings.unicode_split``); ``None`` keeps the
  whole standardized text as one token.
* lookup: the vocabulary (mask ``""`` at 0, OOV ``"[UNK]"`` at 1); an unknown token gets the OOV id.
* ``output_sequence_length``: ids are cut or padded with 0 to that length; without it a batch is
  padded with 0 to its longest text.

Anything else (a custom callable, ``ngrams``, several OOV ids, a non-``"int"`` output mode) is
refused with :class:`UnsupportedError` when the settings are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bridge.errors import InputError, UnsupportedError
from bridge.vocab import Vocabulary

#: The punctuation regex of Keras's TextVectorization (``standardize="strip_punctuation"``), verbatim.
KERAS_PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
_PUNCTUATION = re.compile(KERAS_PUNCTUATION)
_ASCII_WHITESPACE = re.compile(r"[ \t\n\v\f\r]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

STANDARDIZE = (None, "lower", "strip_punctuation", "lower_and_strip_punctuation")
SPLIT = (None, "whitespace", "character")


@dataclass(frozen=True)
class TextSettings:
    """The settings of a text pipeline (see the module docstring); validated on creation."""

    standardize: str | None = "lower_and_strip_punctuation"
    split: str | None = "whitespace"
    output_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.standardize not in STANDARDIZE:
            raise UnsupportedError(f"text standardize={self.standardize!r} cannot be reproduced; supported: "
                                   f"{', '.join(map(repr, STANDARDIZE))}")
        if self.split not in SPLIT:
            raise UnsupportedError(f"text split={self.split!r} cannot be reproduced; supported: "
                                   f"{', '.join(map(repr, SPLIT))}")
        length = self.output_sequence_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise InputError(f"output_sequence_length must be a positive int or None, got {length!r}")

    def to_json(self) -> dict[str, Any]:
        return {"standardize": self.standardize, "split": self.split,
                "output_sequence_length": self.output_sequence_length}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TextSettings:
        unknown = sorted(set(obj) - {"standardize", "split", "output_sequence_length"})
        if unknown:
            raise UnsupportedError(f"unknown text pipeline settings {unknown}; this version reproduces "
                                   "standardize, split and output_sequence_length only")
        return cls(standardize=obj.get("standardize"), split=obj.get("split"),
                   output_sequence_length=obj.get("output_sequence_length"))


def standardize(text: str, settings: TextSettings) -> str:
    """``text`` after the ``standardize`` step."""
    if settings.standardize in ("lower", "lower_and_strip_punctuation"):
        text = text.translate(_ASCII_LOWER)
    if settings.standardize in ("strip_punctuation", "lower_and_strip_punctuation"):
        text = _PUNCTUATION.sub("", text)
    return text


def split(text: str, settings: TextSettings) -> list[str]:
    """The tokens of an already standardized ``text``."""
    if settings.split == "whitespace":
        return [t for t in _ASCII_WHITESPACE.split(text) if t]
    if settings.split == "character":
        return list(text)
    return [text]


def tokens(text: str, settings: TextSettings) -> list[str]:
    """Standardize and split ``text``."""
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    return split(standardize(text, settings), settings)


def tokenize(text: str, settings: TextSettings, vocabulary: Vocabulary) -> np.ndarray:
    """The int64 ids Keras gives ``text`` (1-D; cut or padded to ``output_sequence_length`` if set)."""
    ids = vocabulary.ids(tokens(text, settings))
    length = settings.output_sequence_length
    if length is None:
        return ids
    out = np.zeros(length, np.int64)
    out[: min(length, ids.size)] = ids[:length]
    return out


def tokenize_batch(texts: Sequence[str], settings: TextSettings, vocabulary: Vocabulary) -> np.ndarray:
    """``[batch, length]`` int64 ids padded with 0, as Keras returns a batch."""
    rows = [tokenize(t, settings, vocabulary) for t in texts]
    width = settings.output_sequence_length or max((r.size for r in rows), default=0)
    out = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return out


@dataclass(frozen=True)
class TextPipeline:
    """Settings and vocabulary together: ``pipeline("some text")`` gives Keras's ids."""

    settings: TextSettings
    vocabulary: Vocabulary

    def __call__(self, text: str) -> np.ndarray:
        return tokenize(text, self.settings, self.vocabulary)

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        return tokenize_batch(texts, self.settings, self.vocabulary)

    @classmethod
    def from_table(cls, table: Any) -> TextPipeline:
        """The pipeline recorded on a store table (``metadata["vocabulary"]["text_pipeline"]`` and its vocab).

        Raises :class:`UnsupportedError` when the table's TextVectorization settings cannot be reproduced,
        :class:`InputError` when the table has no text pipeline at all.
        """
        vocab_meta = table.metadata.get("vocabulary") or {}
        meta = vocab_meta.get("text_pipeline")
        if meta is None and vocab_meta.get("text_pipeline_unsupported"):
            raise UnsupportedError(f"table {table.name!r}: its text pipeline cannot be reproduced: "
                                   f"{vocab_meta['text_pipeline_unsupported']}")
        if meta is None or table.vocab is None:
            raise InputError(f"table {table.name!r} has no text pipeline; only tables fed by a Keras "
                             "TextVectorization layer have one")
        return cls(TextSettings.from_json(meta), table.vocab)
