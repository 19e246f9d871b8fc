"""Vocabularies: token <-> id, with reserved ids, stored as plain text (one token per line).

Text format (UTF-8, ``\\n`` line ends, line number = id, starting at 0). A token containing
a backslash, newline or carriage return is escaped as ``\\\\``, ``\\n``, ``\\r``, and a lone
surrogate (a byte that was not UTF-8, decoded with ``surrogateescape``) as ``\\uDCxx``; every
other character is written as is, so a reader that ignores escaping only misreads such tokens.

Two things the text cannot say are kept in the store's manifest (see :class:`Vocabulary`):
``aliases``, tokens that map to an id besides the one written on its line (an ONNX
``CategoryMapper`` may give several tokens one id), and ``unnamed``, ids whose line holds a
placeholder that no token maps to.
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
_SURROGATE = re.compile("[\ud800-\udfff]")
_OOV_NAME = re.compile(r"oov(_[0-9]+)?")  # reserved names of OOV ids: oov, oov_1, oov_2, ...


def escape_token(token: str) -> str:
    """Escape one token for the one-token-per-line text format."""
    return _escape_surrogates(_escape_lines(token))


def _escape_lines(token: str) -> str:
    """``token`` with backslash, newline and carriage return escaped (not its lone surrogates)."""
    if "\\" in token or "\n" in token or "\r" in token:
        return "".join(_ESCAPES.get(ch, ch) for ch in token)
    return token


def _escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (which UTF-8 cannot hold) written as ``\\uXXXX``."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04X}", text)


def unescape_token(text: str) -> str:
    """Inverse of :func:`escape_token`."""
    if "\\" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            if nxt == "u":
                out.append(_surrogate(text, "".join(next(chars, "") for _ in range(4))))
                continue
            if nxt not in _UNESCAPES:
                raise InputError(f"bad escape '\\{nxt}' in vocabulary line {text!r}; "
                                 "only \\\\, \\n, \\r and \\uD800-\\uDFFF are defined")
            out.append(_UNESCAPES[nxt])
        else:
            out.append(ch)
    return "".join(out)


def _surrogate(text: str, digits: str) -> str:
    """The lone surrogate ``\\u<digits>`` names (the only characters written that way)."""
    code = int(digits, 16) if len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits) else -1
    if not 0xD800 <= code <= 0xDFFF:
        raise InputError(f"bad escape '\\u{digits}' in vocabulary line {text!r}; "
                         "\\u escapes only name lone surrogates, \\uD800-\\uDFFF")
    return chr(code)


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

    ``aliases`` maps further tokens to ids (an ONNX ``CategoryMapper`` may give several tokens
    one id, while the text has one token per id); an alias wins over a token's position.
    ``unnamed`` lists ids no token names: their entries in ``tokens`` are placeholders (the text
    format needs a line for each id), which :meth:`ids` treats as unknown tokens.
    """

    tokens: list[str]
    oov_id: int | None = None
    reserved: dict[str, int] = field(default_factory=dict)
    source: str | None = None
    aliases: dict[str, int] = field(default_factory=dict)
    unnamed: tuple[int, ...] = ()
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        aliases = ((f"alias {token!r}", i) for token, i in self.aliases.items())
        ids = [("oov_id", self.oov_id), *self.reserved.items(), *aliases, *(("unnamed id", i) for i in self.unnamed)]
        for label, idx in ids:
            if idx is not None and (isinstance(idx, bool) or not isinstance(idx, (int, np.integer))):
                raise InputError(f"vocabulary {label} must be an integer id, got {idx!r}")
            if idx is not None and not 0 <= idx < n:
                raise InputError(f"vocabulary {label}={idx} is outside [0, {n})")
        bad = next((t for t in self.aliases if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(f"vocabulary alias {bad!r} is a {type(bad).__name__}; aliases are tokens (str)")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def index(self) -> dict[str, int]:
        """token -> id; the first occurrence wins when a token repeats (as in Keras), and
        :attr:`aliases` win over positions.

        Unnamed ids are left out, and so are the OOV ids when there are several hashed OOV
        buckets: Keras hashes the OOV token (``[UNK]``) like any unknown token.
        """
        if self._index is None:
            skip = set(self.unnamed) | (set(self._bucket_ids()) if self.oov_buckets > 1 else set())
            index: dict[str, int] = {}
            for i, tok in enumerate(self.tokens):
                if i not in skip:
                    index.setdefault(tok, i)
            index.update((token, int(i)) for token, i in self.aliases.items())
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
        """Write the tokens as UTF-8 text, one per line (see the module docstring); the aliases and
        unnamed ids are the caller's to keep (the store writes them into its manifest)."""
        bad = next((t for t in self.tokens if not isinstance(t, str)), None)
        if bad is not None:
            position = next(i for i, t in enumerate(self.tokens) if t is bad)
            hint = "; decode bytes first, e.g. token.decode('utf-8')" if isinstance(bad, bytes) else ""
            raise VocabularyError(f"vocabulary token {bad!r} (id {position}) is a {type(bad).__name__}, "
                                  f"not str; tokens must be strings{hint}")
        text = "".join(_escape_lines(t) + "\n" for t in self.tokens)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # rare: lone surrogates, escaped only then (a search per token costs 2x)
            data = _escape_surrogates(text).encode("utf-8")
        Path(path).write_bytes(data)

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
