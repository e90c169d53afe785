"""Atomic file replacement: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o644,
    *,
    owner: tuple[int, int] | None = None,
    times: tuple[int, int] | None = None,
    overwrite: bool = True,
    check: Callable[[str], None] | None = None,
) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename.

    ``owner`` (uid, gid) and ``times`` (atime, mtime in ns) are set on the new
    file. With ``overwrite=False`` an existing ``path`` is never replaced
    (FileExistsError). ``check`` is called with the temp file's path before it
    takes the place of ``path``; if it raises, ``path`` is left as it was.
    """
    target = Path(path)
    directory = target.parent.resolve()
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)  # after chown, which clears set-id bits
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if times is not None:
            os.utime(tmp, ns=times)
        if check is not None:
            check(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails when the target exists, where a rename would replace it
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(directory)


def atomic_write(
    path: str, text: str, mode: int = 0o644, check: Callable[[str], None] | None = None
) -> None:
    """``write_atomic`` for UTF-8 text."""
    write_atomic(path, text.encode("utf-8"), mode, check=check)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
