"""Download a file, check its digest, and write it atomically: the one copy of that routine.

:func:`fetch_verified` tries a list of URLs in order and keeps the first payload whose digest
matches; :func:`write_atomically` writes bytes through a temporary file in the target folder,
``fsync`` and ``os.replace``, so a reader (or a crash, or Ctrl-C) sees either the old file or
the complete new one, never a part. Files get the user's umask, like any ``open()``.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from .atomic import atomic_write
from .errors import DataError

__all__ = [
    "digest_of",
    "download_verified",
    "fetch_bytes",
    "fetch_verified",
    "write_atomically",
]

DOWNLOAD_TIMEOUT_S = 60.0


def fetch_bytes(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Fetch ``url`` and return its body (network errors propagate unchanged)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def digest_of(payload: bytes, algorithm: str = "sha256") -> str:
    """Hex digest of ``payload`` (``algorithm``: any :mod:`hashlib` name, e.g. ``md5``)."""
    return hashlib.new(algorithm, payload).hexdigest()


_ALGORITHM_NAMES = {"sha256": "SHA-256", "sha1": "SHA-1", "md5": "md5"}


def fetch_verified(
    urls: Sequence[str],
    expected: str,
    algorithm: str = "sha256",
    fetch: Callable[[str], bytes] | None = None,
    hint: str = "Put a verified copy into the data directory (--data-dir) by hand.",
) -> bytes:
    """The body of the first of ``urls`` whose ``algorithm`` digest equals ``expected``.

    Raises :class:`DataError` listing every URL tried, ending with ``hint`` (what the user can
    do): a digest mismatch (nothing is kept), HTTP errors, or no network. ``fetch`` replaces
    the network (tests); it defaults to :func:`fetch_bytes`.
    """
    if not urls:
        raise DataError("no URL to download from")
    get = fetch if fetch is not None else fetch_bytes
    label = _ALGORITHM_NAMES.get(algorithm, algorithm)
    http_errors: list[str] = []
    network: list[str] = []
    bad: list[str] = []
    for url in urls:
        try:
            payload = get(url)
        except urllib.error.HTTPError as exc:
            http_errors.append(f"{url}: the server answered HTTP {exc.code}")
            continue
        except (OSError, http.client.HTTPException) as exc:
            network.append(f"{url}: {exc}")
            continue
        digest = digest_of(payload, algorithm)
        if digest == expected:
            return payload
        bad.append(f"{url}: {label} {digest}")
    name = urls[0].rsplit("/", 1)[-1]
    if bad:
        raise DataError(
            f"downloaded {name} but its {label} does not match the expected {expected} "
            f"({'; '.join(bad)}); nothing was saved. The download was damaged or the source "
            f"changed: try again later. {hint}"
        )
    if http_errors:
        raise DataError(f"downloading {name} failed ({'; '.join(http_errors + network)}). {hint}")
    raise DataError(
        f"could not download {name} ({'; '.join(network)}); this machine appears to be "
        f"offline. {hint}"
    )


def write_atomically(path: Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` through :func:`rbp.data.atomic.atomic_write`.

    An interrupt or a crash leaves the previous ``path`` (if any) untouched and no temporary
    file behind. Raises :class:`DataError` naming the folder when it cannot be written.
    """
    path = Path(path)
    try:
        with atomic_write(path) as handle:
            handle.write(payload)
    except OSError as exc:
        raise DataError(
            f"could not save {path.name} into {path.parent}: {exc}. Pass a writable data "
            "directory (--data-dir)."
        ) from exc
    return path


def download_verified(
    urls: Sequence[str],
    path: Path,
    expected: str,
    algorithm: str = "sha256",
    fetch: Callable[[str], bytes] | None = None,
    hint: str = "Put a verified copy into the data directory (--data-dir) by hand.",
) -> Path:
    """:func:`fetch_verified` then :func:`write_atomically` to ``path``; returns ``path``."""
    return write_atomically(path, fetch_verified(urls, expected, algorithm, fetch, hint))
