"""Where the data loaders keep downloads and derived caches."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_cache_dir"]


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rbp`` when that variable is set to an absolute path, else
    ``~/.cache/rbp`` (the XDG base-directory rule). Not created here."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "rbp"
