"""Write a file atomically: readers (and a crash, or Ctrl-C) see the old file or the complete
new one, never a part. The one copy of that routine, for the data layer and the runner."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["TMP_SUFFIX", "atomic_write", "remove_stale_tmp"]

#: Suffix of the temporary files :func:`atomic_write` writes before renaming them.
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only once fully written and synced.

    The data go to ``.<name>.<random>.tmp`` in the same directory (created with the user's
    umask, like any other file), which is fsync'ed and then moved over ``path`` with
    :func:`os.replace`: a crash or an exception leaves the old file intact, and the temporary
    file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete leftover ``.*.tmp`` files of :func:`atomic_write` (from a killed process)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(directory.glob(f".*{TMP_SUFFIX}"))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale
