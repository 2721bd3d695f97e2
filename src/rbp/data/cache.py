"""Where the data loaders look for data a user names, and keep downloads and derived caches."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

__all__ = ["user_cache_dir", "user_data_dir"]


def user_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """The folder ``data_dir`` names, ``~`` / ``~user`` expanded; DataError if that home
    cannot be found (instead of the RuntimeError ``Path.expanduser`` raises). An empty
    string is refused: it would read the working folder, which no one means by it."""
    if not str(data_dir).strip():
        raise DataError("the data directory is an empty string; give a folder (\".\" for the "
                        "working folder), or leave it unset for the copies that ship with rbp")
    try:
        return Path(data_dir).expanduser()
    except RuntimeError as exc:
        raise DataError(f"data directory {str(data_dir)!r}: {exc} ({str(data_dir).split('/')[0]!r} "
                        "names no home folder here); give the folder's full path") from None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rbp`` when that variable is set to an absolute path, else
    ``~/.cache/rbp`` (the XDG base-directory rule). Not created here."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "rbp"
