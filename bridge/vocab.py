"""Vocabularies: token <-> id, with reserved ids, stored as plain text (one token per line).

Text format (UTF-8, ``\\n`` line ends, line number = id, starting at 0). A token containing
a backslash, newline or carriage return is escaped as ``\\\\``, ``\\n``, ``\\r``; every other
character is written as is, so a reader that ignores escaping only misreads such tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import InputError, VocabularyError

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}
_OOV_NAME = re.compile(r"oov(_[0-9]+)?")  # reserved names of OOV ids: oov, oov_1, oov_2, ...


def escape_token(token: str) -> str:
    """Escape one token for the one-token-per-line text format."""
    if "\\" not in token and "\n" not in token and "\r" not in token:
        return token
    return "".join(_ESCAPES.get(ch, ch) for ch in token)


def unescape_token(text: str) -> str:
    """Inverse of :func:`escape_token`."""
    if "\\" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            if nxt not in _UNESCAPES:
                raise InputError(f"bad escape '\\{nxt}' in vocabulary line {text!r}; only \\\\, \\n, \\r are defined")
            out.append(_UNESCAPES[nxt])
        else:
            out.append(ch)
    return "".join(out)


@dataclass
class Vocabulary:
    """An ordered list of tokens; a token's id is its position.

    ``oov_id`` is the id unknown tokens map to when the source defines one (a Keras
    ``StringLookup`` maps OOV tokens to its OOV index); ``None`` means the source defines no
    OOV rule and the lookup's index policy decides. ``reserved`` names special ids, for
    example ``{"mask": 0, "oov": 1}``.

    Several OOV ids (Keras ``num_oov_indices=N > 1``) are reserved as ``oov``, ``oov_1``, ...,
    ``oov_{N-1}`` (:attr:`oov_buckets` counts them; the store saves ``reserved``). Keras then
    hashes each unknown token (its OOV token ``[UNK]`` too) into one of them, which this package
    does not reproduce, so :meth:`ids` refuses unknown tokens instead of guessing a bucket.
    """

    tokens: list[str]
    oov_id: int | None = None
    reserved: dict[str, int] = field(default_factory=dict)
    source: str | None = None
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for label, idx in [("oov_id", self.oov_id), *self.reserved.items()]:
            if idx is not None and (isinstance(idx, bool) or not isinstance(idx, (int, np.integer))):
                raise InputError(f"vocabulary {label} must be an integer id, got {idx!r}")
            if idx is not None and not 0 <= idx < n:
                raise InputError(f"vocabulary {label}={idx} is outside [0, {n})")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def index(self) -> dict[str, int]:
        """token -> id; the first occurrence wins when a token repeats (as in Keras).

        With several hashed OOV buckets the OOV ids are left out: Keras hashes the OOV token
        (``[UNK]``) like any unknown token.
        """
        if self._index is None:
            hashed = set(self._bucket_ids()) if self.oov_buckets > 1 else set()
            index: dict[str, int] = {}
            for i, tok in enumerate(self.tokens):
                if i not in hashed:
                    index.setdefault(tok, i)
            self._index = index
        return self._index

    @property
    def oov_buckets(self) -> int:
        """How many OOV ids ``reserved`` names (``oov``, ``oov_1``, ...): 0, 1, or N hashed buckets."""
        return len(self._bucket_ids())

    def _bucket_ids(self) -> list[int]:
        """The OOV ids ``reserved`` names, ascending."""
        return sorted(i for name, i in self.reserved.items() if _OOV_NAME.fullmatch(name))

    def ids(self, tokens: Iterable[str] | str, *, missing: int | None = None) -> np.ndarray:
        """Map tokens to an int64 array of ids (vectorized; about 0.05-0.1 us per token).

        Unknown tokens get ``missing`` if given, else ``oov_id``; if neither exists, or the
        vocabulary has several hashed OOV buckets (:attr:`oov_buckets`) and no ``missing`` is
        given, a :class:`VocabularyError` names the first unknown token.
        """
        if isinstance(tokens, str):
            return self.ids([tokens], missing=missing).reshape(())
        fallback = missing if missing is not None else self.oov_id
        if missing is None and self.oov_buckets > 1:
            fallback = None  # which bucket Keras hashes a token into is not known here
        sentinel = -1 if fallback is None else fallback
        try:
            seq = tokens if isinstance(tokens, Sequence) else list(tokens)
            out = np.fromiter(map(self.index.get, seq, repeat(sentinel)), dtype=np.int64, count=len(seq))
        except TypeError as exc:  # not iterable, or an unhashable item (a nested list)
            raise VocabularyError(f"tokens must be a string or a list of strings, got {_kind(tokens)}") from exc
        _check_missed_are_strings(seq, out, sentinel)
        if fallback is None and out.size and (out < 0).any():
            first = int(np.flatnonzero(out < 0)[0])
            raise VocabularyError(self._unknown_message(seq[first], first))
        return out

    def _unknown_message(self, token: str, position: int) -> str:
        """Why unknown ``token`` has no id, and what to do instead."""
        where = f"token {token!r} (position {position}) is not in the vocabulary"
        if self.oov_buckets <= 1:
            return f"{where} and the vocabulary has no OOV id; use a policy with an OOV row (policy='oov' or 'zero')"
        buckets = ", ".join(map(str, self._bucket_ids()))
        how = ("IntegerLookup: token % N by default" if self.source == "integer_lookup"
               else "FarmHash64, tf.strings.to_hash_bucket_fast, or SipHash64 with a salt")
        return (
            f"{where}; Keras hashes unknown tokens into {self.oov_buckets} OOV buckets (ids {buckets}; {how}), "
            "which the bridge does not reproduce, so it cannot tell which row Keras serves; look up the ids "
            "the Keras lookup layer computes (lookup(ids), embridge lookup --ids), or choose a row yourself with "
            "vocabulary.ids(tokens, missing=<id>) (missing=-1 with policy='zero' gives zero vectors)"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokens as UTF-8 text, one per line (see the module docstring)."""
        text = "".join(escape_token(t) + "\n" for t in self.tokens)
        Path(path).write_text(text, encoding="utf-8", newline="\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: object) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`; ``kwargs`` go to the constructor."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read vocabulary {str(path)!r}: {exc}") from exc
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls([unescape_token(line) for line in lines], **kwargs)  # type: ignore[arg-type]


def _kind(tokens: Any) -> str:
    """How an error message names what was passed as tokens."""
    if isinstance(tokens, (list, tuple)) and tokens:
        return f"a {type(tokens).__name__} holding {type(tokens[0]).__name__}"
    return type(tokens).__name__


def _check_missed_are_strings(seq: Sequence[Any], ids: np.ndarray, sentinel: int) -> None:
    """VocabularyError if a token that was not found is not a string (bytes, an int): it could never match.

    Only the misses are checked, so the common all-found call pays one comparison over the ids.
    """
    for position in np.flatnonzero(ids == sentinel).tolist():
        token = seq[position]
        if not isinstance(token, str):
            hint = "; decode bytes first, e.g. token.decode('utf-8')" if isinstance(token, bytes) else ""
            raise VocabularyError(
                f"token {token!r} (position {position}) has type {type(token).__name__}, not str{hint}"
            )
