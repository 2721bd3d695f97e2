"""The lock of a run directory: one process writes a run at a time, and says who it is."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rbp.runner.progress import get_logger
from rbp.runner.results import RunExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "describe_holder", "lock_holder"]

#: Lock file inside a run directory: held (``flock``) by the run writing there.
LOCK_FILE = ".lock"


class RunLockedError(RunExistsError):
    """Another live process holds the output directory's lock."""



class RunLock:
    """An exclusive ``flock`` on ``<out>/.lock``, which holds the owner's pid, host and start.

    The kernel drops the lock when its process dies, so a lock file with content that nobody
    holds is *stale*: :attr:`stale` then describes the dead owner. Release empties the file.
    """

    def __init__(self, out: Path, command: Sequence[str] = ()) -> None:
        self.path = Path(out) / LOCK_FILE
        self.stale: dict[str, Any] | None = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunExistsError(f"cannot write in --out {out}: {exc.strerror or exc}; choose "
                                 "a writable directory") from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                get_logger("run").warning("cannot lock %s (%s); running without a lock",
                                          self.path, exc.strerror or exc)
                return
            info = self._read()
            os.close(self._fd)
            raise RunLockedError(
                f"another run ({describe_holder(info)}) is writing to {out}; wait for it to "
                "end or choose another --out") from None
        prev = self._read()
        if prev:
            self.stale = prev
        os.ftruncate(self._fd, 0)
        doc = {"pid": os.getpid(), "host": socket.gethostname(),
               "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": list(command)}
        os.pwrite(self._fd, (json.dumps(doc) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _read(self) -> dict[str, Any]:
        try:
            raw = os.pread(self._fd, 65536, 0).decode(errors="replace").strip()
            info = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started_at": "?"} if raw else {}
        return info if isinstance(info, dict) else {}

    def release(self) -> None:
        """Empty the lock file and release the lock (idempotent)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = -1


def lock_holder(out: Path) -> dict[str, Any] | None:
    """Who holds the lock of run directory ``out`` now (pid, host, start), or None when no
    live process does; creates nothing (``--dry-run``)."""
    path = Path(out) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return None
            try:
                info = json.loads(os.pread(fd, 65536, 0).decode(errors="replace") or "{}")
            except (OSError, ValueError):
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(info: dict[str, Any]) -> str:
    """``pid P on HOST, started T`` of a lock's owner (:func:`lock_holder`, a stale lock)."""
    pid, host, since = info.get("pid", "?"), info.get("host", "?"), info.get("started_at", "?")
    return f"pid {pid} on {host}, started {since}"
