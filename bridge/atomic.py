"""Atomic writes: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from bridge.errors import InputError, OutputExistsError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_permissions(root: Path) -> None:
    """Give a staged tree the modes a plain mkdir/open would have (mkdtemp/mkstemp use 0700/0600)."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def check_output_dir(
    out_dir: str | os.PathLike[str], force: bool, *, keep: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Return ``out_dir`` as an absolute Path, refusing an existing non-empty directory unless ``force``.

    An existing directory is replaced as a whole, so one that is or holds the current directory, or
    any of the paths in ``keep`` (the command's inputs), is refused even with ``force``.
    """
    out = Path(os.path.abspath(out_dir))  # lexically: "." and "a/.." get a real name and parent
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {str(out_dir)!r} exists and is not a directory; choose another path")
    if out.is_dir():
        _refuse_replacing(out, str(out_dir), keep)
        if any(out.iterdir()) and not force:
            raise OutputExistsError(
                f"output directory {str(out_dir)!r} exists and is not empty; pass --force (force=True) to replace it"
            )
    return out


def _refuse_replacing(out: Path, shown: str, keep: Iterable[str | os.PathLike[str]]) -> None:
    """InputError if replacing ``out`` would delete the current directory or a path of ``keep``."""
    target = out.resolve()
    for path, what in [(Path.cwd(), "the current directory"), *((Path(p), f"the input {str(p)!r}") for p in keep)]:
        resolved = path.resolve()
        if resolved == target or resolved.is_relative_to(target):
            raise InputError(f"output directory {shown!r} is or holds {what}, which replacing it would delete; "
                             "write to another directory")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces ``out_dir`` only if the block succeeds.

    The staging directory is a sibling of ``out_dir`` (same file system, so the final
    ``rename`` is atomic). On any exception, including ``KeyboardInterrupt``, it is removed
    and ``out_dir`` is left exactly as it was.
    """
    out = check_output_dir(out_dir, force)
    with _os_errors(f"cannot create output directory {str(out_dir)!r}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        _publish_permissions(staging)
        _fsync_dir(staging)
        with _os_errors(f"cannot put the output in place at {str(out_dir)!r}"):
            _replace_dir(staging, out)
    except BaseException:
        remove_tree(staging)
        raise


def remove_tree(path: Path) -> None:
    """``shutil.rmtree(path)``, ignoring errors, finished even if Ctrl-C lands while it runs (the
    interrupt is raised again once the tree is gone): a half-removed temporary tree is left behind otherwise."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """An OSError in the block (no permission, a file where a directory should be, ...) as an InputError."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"{what}: {exc.strerror or exc}; choose another path") from exc


def _replace_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and removed after (or put back)."""
    if not out.exists():
        os.rename(staging, out)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, old / "d")
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(old / "d", out)
                raise
        finally:
            remove_tree(old)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[object]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{str(path)!r} is a directory; give a file name")
    with _os_errors(f"cannot write {str(path)!r}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
