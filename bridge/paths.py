"""Confine relative paths (ONNX external data, manifest entries) to their base directory."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.errors import UnsafePathError


def safe_child_path(base_dir: str | os.PathLike[str], relative: str) -> Path:
    """Resolve ``relative`` inside ``base_dir``, refusing anything that could escape it.

    Raises :class:`UnsafePathError` for an empty or absolute path (POSIX or Windows), a
    ``..`` component, a NUL byte, the directory itself, or a path that resolves outside
    ``base_dir`` (through a symlink at any level). Returns the resolved path; the file need
    not exist.
    """
    text = str(relative)
    parts = text.replace("\\", "/").split("/")
    reason = None
    if not text or "\x00" in text:
        reason = "it is empty or contains a NUL byte"
    elif os.path.isabs(text) or text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":"):
        reason = "it is absolute"
    elif ".." in parts:
        reason = "it contains a '..' component"
    if reason is None:
        base = Path(base_dir).resolve()
        target = (base / text).resolve()
        if target == base:
            reason = "it names the directory itself, not a file in it"
        elif not target.is_relative_to(base):
            reason = f"it resolves to {str(target)!r}, outside {str(base)!r} (through a symlink)"
        else:
            return target
    raise UnsafePathError(
        f"refusing path {text!r} inside {str(base_dir)!r}: {reason}; "
        "keep data files in the model's directory and refer to them by a relative name"
    )
