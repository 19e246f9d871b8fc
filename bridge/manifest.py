"""The store's manifest.json: its schema, and conversion to and from table metadata.

Schema ``embedding-bridge/1`` (all paths relative to the store directory, ``/``-separated)::

    {
      "format": "embedding-bridge/1",
      "generator": {"embedding_bridge": "0.1.0", "numpy": "2.4.6", ...},
      "provenance": {...},                       # free-form: source model path, sha256, tool versions
      "tables": [{
          "name": "tok_emb",                     # unique key; what lookups and the CLI use
          "file": "tables/tok_emb.npy",          # a .npy file, C order, little endian
          "shape": [rows, dim], "dtype": "float32",
          "storage_dtype": "float32",            # dtype in the .npy header ("uint16" holds bfloat16 bits)
          "data_offset": 128,                    # bytes before the data; a multiple of 64
          "nbytes": 12345, "sha256": "<hex of the whole .npy file>",
          "source": [{"framework": "keras", "layer": "tok_emb", "weight": "tok_emb/embeddings"}],
          "initializer": "<ONNX initializer name or null>",
          "vocab": "<vocabulary name or null>",
          "oov_id": null, "padding_id": null,
          "metadata": {},                         # e.g. {"mask_zero": true}, consumers, ties
          "quantization": null                    # or, for a quantized table (its .npy holds the integers):
          # {"scheme": "row_div" | "group_affine" | "affine" | "mul",    formulas: bridge/quantization.py
          #  "scale": {"file": "tables/tok_emb.scale.npy", "sha256": "...", "shape": [rows],
          #            "dtype": "float32", "data_offset": 128},
          #  "zero_point": {...same keys...} or null,
          #  "group_size": 32 or null, "axis": null | 0 | 1, "out_dtype": "float32"}
          # An entry without the key is not quantized (stores written before it existed).
      }],
      "vocabularies": [{
          "name": "tok_emb", "file": "vocab/tok_emb.txt", "size": 1000, "sha256": "...",
          "oov_id": 1, "reserved": {"mask": 0, "oov": 1}, "source": "string_lookup",
          "aliases": {"colour": 7},              # optional: more tokens for an id (ONNX CategoryMapper),
                                                 # escaped as vocabulary lines are (bridge.vocab)
          "unnamed": [0]                         # optional: ids whose line is a placeholder, not a token
      }],
      "files": {"model.onnx": {"sha256": "...", "bytes": 1234}}   # other files written with the store
    }
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from bridge import dtypes
from bridge.errors import BridgeError, InputError, StoreError
from bridge.quantization import OUT_DTYPES, SCHEMES

FORMAT = "embedding-bridge/1"
MANIFEST = "manifest.json"

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(name: str, taken: set[str]) -> str:
    """A file-system-safe, unique (case-insensitively) stem for ``name``; adds it to ``taken``."""
    stem = _SAFE.sub("_", name).strip("._") or "table"
    candidate, n = stem, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate.lower())
    return candidate


def generator_info() -> dict[str, str]:
    """Versions of the packages that shaped the store (only those installed)."""
    info: dict[str, str] = {}
    for dist in ("embedding-bridge", "numpy", "onnx", "onnxruntime", "torch", "tensorflow-cpu", "keras", "tf2onnx"):
        try:
            info[dist.replace("-", "_")] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return info


def read_manifest(store_dir: Path) -> dict[str, Any]:
    """Load and validate manifest.json of a store directory."""
    if not store_dir.exists():
        raise InputError(f"store {str(store_dir)!r} does not exist; check the path, or create one with "
                         "`embridge extract` or `convert`")
    path = store_dir / MANIFEST
    if not path.is_file():
        raise StoreError(f"{str(store_dir)!r} is not an embedding store: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{str(path)!r} is not valid JSON ({exc}); re-create the store") from exc
    _validate(manifest, path)
    return manifest


def _validate(manifest: Any, path: Path) -> None:
    """Raise :class:`StoreError` naming the entry and field unless ``manifest`` follows the schema above."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{str(path)!r} has format {got!r}; this version reads {FORMAT!r}")
    _check_fields(manifest, _Where(path), _TOP_REQUIRED, _TOP_OPTIONAL)
    vocab_names = [_check_vocabulary(v, _Where(path, f"vocabulary #{i}"))
                   for i, v in enumerate(manifest.get("vocabularies", []))]
    _check_unique("vocabulary", vocab_names, path)
    names = [_check_table(t, _Where(path, f"table #{i}"), set(vocab_names)) for i, t in enumerate(manifest["tables"])]
    _check_unique("table", names, path)
    for name, info in manifest.get("files", {}).items():
        at = _Where(path, f"file {name!r}")
        _check_fields(_as_object(info, at), at, _FILE_REQUIRED)


@dataclass(frozen=True)
class _Where:
    """The manifest and the entry in it (``"table #0 ('emb')"``) that a problem is reported against."""

    path: Path
    entry: str = ""

    def fail(self, problem: str) -> NoReturn:
        where = f"{self.entry}: " if self.entry else ""
        raise StoreError(f"{str(self.path)!r}: {where}{problem}; re-create the store")

    def bad(self, field: str, what: str, value: Any) -> NoReturn:
        self.fail(f"{field!r} must be {what}, got {_got(value)}")


def _got(value: Any) -> str:
    """``value`` as an error message shows it: a short repr, with its type unless it is None."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if value is None else f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    """True for a JSON integer (``bool`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    """True for a non-negative JSON integer."""
    return _is_int(value) and value >= 0


def _parse_dtype(value: Any) -> np.dtype[Any] | None:
    """The dtype a manifest name stands for, or None if :func:`bridge.dtypes.from_name` refuses it."""
    if not isinstance(value, str):
        return None
    try:
        return dtypes.from_name(value)
    except (BridgeError, TypeError, ValueError):
        return None


_Rule = tuple[str, Callable[[Any], bool]]  # (what the value must be, test)
_HEX64 = re.compile(r"[0-9a-f]{64}")

_STR: _Rule = ("a string", lambda v: isinstance(v, str))
_NAME: _Rule = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
_OPT_STR: _Rule = ("a string or null", lambda v: v is None or isinstance(v, str))
_COUNT: _Rule = ("a non-negative integer", _is_count)
_OPT_INT: _Rule = ("an integer or null", lambda v: v is None or _is_int(v))
_LIST: _Rule = ("a list", lambda v: isinstance(v, list))
_OBJECT: _Rule = ("an object", lambda v: isinstance(v, dict))
_OPT_OBJECT: _Rule = ("an object or null", lambda v: v is None or isinstance(v, dict))
_DTYPE: _Rule = ("a dtype name such as 'float32'", lambda v: _parse_dtype(v) is not None)
_SHA256: _Rule = ("64 lowercase hexadecimal digits", lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None)
_SHAPE2: _Rule = ("a list of two non-negative integers",
                  lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_count, v)))
_SHAPE: _Rule = ("a list of non-negative integers", lambda v: isinstance(v, list) and all(map(_is_count, v)))
_SCHEME: _Rule = (f"one of {', '.join(map(repr, SCHEMES))}", lambda v: isinstance(v, str) and v in SCHEMES)
_OUT_DTYPE: _Rule = (f"one of {', '.join(map(repr, OUT_DTYPES))}",
                     lambda v: getattr(_parse_dtype(v), "name", None) in OUT_DTYPES)
_GROUP_SIZE: _Rule = ("a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0))
_AXIS: _Rule = ("null, 0 or 1", lambda v: v is None or (_is_int(v) and v in (0, 1)))
_RESERVED: _Rule = ("an object mapping names to integer ids, or null",
                    lambda v: v is None or (isinstance(v, dict) and all(map(_is_int, v.values()))))

_TOP_REQUIRED = {"tables": _LIST}
_TOP_OPTIONAL = {"vocabularies": _LIST, "files": _OBJECT, "generator": _OBJECT, "provenance": _OBJECT}
# data_offset and nbytes: every store this format names has them, and sharing and serving read them
_TABLE_REQUIRED = {"name": _NAME, "file": _NAME, "shape": _SHAPE2, "dtype": _DTYPE, "sha256": _SHA256,
                   "data_offset": _COUNT, "nbytes": _COUNT}
_TABLE_OPTIONAL = {
    "storage_dtype": _STR, "source": _LIST, "initializer": _OPT_STR,
    "vocab": _OPT_STR, "oov_id": _OPT_INT, "padding_id": _OPT_INT, "metadata": _OPT_OBJECT,
    "quantization": _OPT_OBJECT,
}
_SOURCE_REQUIRED = {"framework": _STR, "layer": _STR}
_SOURCE_OPTIONAL = {"weight": _OPT_STR}
_QUANT_REQUIRED = {"scheme": _SCHEME, "scale": _OBJECT}
_QUANT_OPTIONAL = {"zero_point": _OPT_OBJECT, "group_size": _GROUP_SIZE, "axis": _AXIS, "out_dtype": _OUT_DTYPE}
_PARAM_REQUIRED = {"file": _NAME, "sha256": _SHA256, "shape": _SHAPE, "dtype": _DTYPE}
_PARAM_OPTIONAL = {"data_offset": _COUNT}
_VOCAB_REQUIRED = {"name": _NAME, "file": _NAME, "sha256": _SHA256}
_ALIASES: _Rule = ("an object mapping tokens to integer ids",
                   lambda v: isinstance(v, dict) and all(map(_is_int, v.values())))
_IDS: _Rule = ("a list of integer ids", lambda v: isinstance(v, list) and all(map(_is_int, v)))
_VOCAB_OPTIONAL = {"size": _COUNT, "oov_id": _OPT_INT, "reserved": _RESERVED, "source": _OPT_STR,
                   "aliases": _ALIASES, "unnamed": _IDS}
_FILE_REQUIRED = {"sha256": _SHA256, "bytes": _COUNT}


def _check_fields(obj: dict[str, Any], at: _Where, required: Mapping[str, _Rule],
                  optional: Mapping[str, _Rule] | None = None, prefix: str = "") -> None:
    """Every ``required`` key is present and every present key of either mapping passes its rule."""
    missing = [repr(prefix + key) for key in required if key not in obj]
    if missing:
        at.fail(f"lacks {', '.join(missing)}")
    for key, (what, ok) in [*required.items(), *(optional or {}).items()]:
        if key in obj and not ok(obj[key]):
            at.bad(prefix + key, what, obj[key])


def _as_object(value: Any, at: _Where, field: str = "") -> dict[str, Any]:
    """``value`` if it is a JSON object; else fail (``field`` empty: the entry itself)."""
    if not isinstance(value, dict):
        if field:
            at.bad(field, "an object", value)
        at.fail(f"must be an object, got {_got(value)}")
    return value


def _check_ids(pairs: Iterable[tuple[str, Any]], limit: int, at: _Where) -> None:
    """Each id that is not None is in ``[0, limit)``."""
    for field, idx in pairs:
        if idx is not None and not 0 <= idx < limit:
            at.bad(field, f"null or an id in [0, {limit})", idx)


def _check_table(entry: Any, at: _Where, vocabularies: set[str]) -> str:
    """Check one ``tables`` entry; return its name."""
    entry = _as_object(entry, at)
    if isinstance(entry.get("name"), str):
        at = _Where(at.path, f"{at.entry} ({entry['name']!r})")
    _check_fields(entry, at, _TABLE_REQUIRED, _TABLE_OPTIONAL)
    _check_ids([(k, entry.get(k)) for k in ("oov_id", "padding_id")], entry["shape"][0], at)
    vocab = entry.get("vocab")
    if vocab is not None and vocab not in vocabularies:
        at.fail(f"'vocab' names vocabulary {vocab!r}, which the manifest does not list")
    for j, source in enumerate(entry.get("source", [])):
        _check_fields(_as_object(source, at, f"source[{j}]"), at, _SOURCE_REQUIRED, _SOURCE_OPTIONAL, f"source[{j}].")
    if entry.get("quantization") is not None:
        _check_quantization(entry["quantization"], at)
    return str(entry["name"])


def _check_quantization(info: dict[str, Any], at: _Where) -> None:
    """Check a table's ``quantization`` object and its ``scale`` / ``zero_point`` file entries."""
    _check_fields(info, at, _QUANT_REQUIRED, _QUANT_OPTIONAL, "quantization.")
    for key in ("scale", "zero_point"):
        if info.get(key) is not None:
            _check_fields(info[key], at, _PARAM_REQUIRED, _PARAM_OPTIONAL, f"quantization.{key}.")


def _check_vocabulary(entry: Any, at: _Where) -> str:
    """Check one ``vocabularies`` entry; return its name."""
    entry = _as_object(entry, at)
    if isinstance(entry.get("name"), str):
        at = _Where(at.path, f"{at.entry} ({entry['name']!r})")
    _check_fields(entry, at, _VOCAB_REQUIRED, _VOCAB_OPTIONAL)
    if "size" in entry:
        reserved = [(f"reserved.{k}", v) for k, v in (entry.get("reserved") or {}).items()]
        aliases = [(f"aliases.{k}", v) for k, v in entry.get("aliases", {}).items()]
        unnamed = [(f"unnamed[{j}]", v) for j, v in enumerate(entry.get("unnamed", []))]
        _check_ids([("oov_id", entry.get("oov_id")), *reserved, *aliases, *unnamed], entry["size"], at)
    return str(entry["name"])


def _check_unique(kind: str, names: list[str], path: Path) -> None:
    """Refuse repeated table (or vocabulary) names."""
    if len(set(names)) != len(names):
        dupes = sorted(n for n in set(names) if names.count(n) > 1)
        raise StoreError(f"{str(path)!r}: duplicate {kind} names {dupes}; re-create the store")


def write_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Serialize a manifest deterministically (sorted keys inside entries kept in insertion order)."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate in a name, an initializer or metadata
        bad = text[max(0, exc.start - 40):exc.end + 10].strip()
        raise InputError(f"the manifest would hold a string that is not valid Unicode (a lone surrogate near "
                         f"{bad!r}); rename what holds it (table, initializer or metadata)") from exc
