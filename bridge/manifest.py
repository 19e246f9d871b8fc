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
          "oov_id": 1, "reserved": {"mask": 0, "oov": 1}, "source": "string_lookup"
      }],
      "files": {"model.onnx": {"sha256": "...", "bytes": 1234}}   # other files written with the store
    }
"""

from __future__ import annotations

import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from bridge.errors import StoreError

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
        raise StoreError(f"store {str(store_dir)!r} does not exist; create one with `embridge extract` or `convert`")
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{str(path)!r} has format {got!r}; this version reads {FORMAT!r}")
    for key in ("tables", "vocabularies"):
        if not isinstance(manifest.get(key, []), list):
            raise StoreError(f"{str(path)!r}: {key!r} must be a list")
    required = ("name", "file", "shape", "dtype", "sha256")
    for i, entry in enumerate(manifest.get("tables", [])):
        missing = [k for k in required if k not in entry]
        if missing:
            raise StoreError(f"{str(path)!r}: table #{i} lacks {', '.join(missing)}; re-create the store")
    names = [t["name"] for t in manifest.get("tables", [])]
    if len(set(names)) != len(names):
        raise StoreError(f"{str(path)!r}: duplicate table names {sorted(n for n in set(names) if names.count(n) > 1)}")


def write_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Serialize a manifest deterministically (sorted keys inside entries kept in insertion order)."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
