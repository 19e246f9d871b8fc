"""Confine relative paths (ONNX external data, manifest entries) to their base directory."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from bridge.errors import InputError, UnsafePathError


def safe_child_path(base_dir: str | os.PathLike[str], relative: str, *, must_exist: bool = True) -> Path:
    """Return ``base_dir / relative`` if it stays inside ``base_dir``, else raise :class:`UnsafePathError`.

    Refused: absolute paths (POSIX or Windows), any ``..`` component, and symlinks (at any
    level) that resolve outside ``base_dir``. With ``must_exist`` a missing file is an
    :class:`InputError`.
    """
    base = Path(base_dir)
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"empty or invalid relative path {relative!r} under {str(base)!r}")
    posix, win = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise UnsafePathError(
            f"path {relative!r} is absolute or contains '..'; files must stay inside {str(base)!r}"
        )
    candidate = base / posix
    resolved_base = base.resolve()
    resolved = candidate.resolve()
    if resolved != resolved_base and resolved_base not in resolved.parents:
        raise UnsafePathError(
            f"path {relative!r} resolves to {str(resolved)!r}, outside {str(resolved_base)!r} "
            "(a symlink leads out); copy the file into the directory instead"
        )
    if must_exist and not candidate.exists():
        raise InputError(f"file {str(candidate)!r} (listed as {relative!r}) does not exist")
    return candidate
