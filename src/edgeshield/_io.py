"""File helpers shared by every concern: atomic writes and friendly reads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edgeshield.errors import EmptyFileError, NotAFileError, OutputExistsError, PathNotFoundError


def check_readable_file(path: str | os.PathLike[str], *, what: str = "file", allow_empty: bool = False) -> Path:
    """Return ``path`` as a Path if it is an existing regular file, else raise a typed error naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise PathNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise NotAFileError(f"{what} is not a regular file: {p}")
    if not allow_empty and p.stat().st_size == 0:
        raise EmptyFileError(f"{what} is empty: {p}")
    return p


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = 0o644, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Write to a temp file in the target directory, fsync, then rename over ``path``.

    Nothing appears at ``path`` unless the block completes: on any exception the temp file is removed and an
    existing file at ``path`` is left untouched. The file is created with ``mode`` from the start (0600 for keys),
    never widened afterwards.
    """
    target = Path(path)
    if target.exists() and target.is_dir():
        raise NotAFileError(f"output path is a directory: {target}")
    if not overwrite and target.exists():
        raise OutputExistsError(f"refusing to overwrite existing file: {target}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise PathNotFoundError(f"output directory not found: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_writer(path, mode=mode, overwrite=overwrite) as fh:
        fh.write(data)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new entry in it is durable."""
    # Make the rename itself durable; some filesystems refuse fsync on directories, which is harmless.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a multi-GB bundle is never held in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
