"""Tests of ``rbp.data.download``: verified downloads and atomic writes (no network used)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import pytest

from rbp.data import DataError
from rbp.data import download as dl

PAYLOAD = b"the real bytes\n" * 100
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _server(answers: dict[str, bytes | BaseException]):
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        answer = answers[url]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return fetch, calls


def test_first_intact_mirror_wins(tmp_path: Path) -> None:
    fetch, calls = _server({"http://a/f.bin": b"damaged", "http://b/f.bin": PAYLOAD,
                            "http://c/f.bin": PAYLOAD})
    path = dl.download_verified(["http://a/f.bin", "http://b/f.bin", "http://c/f.bin"],
                                tmp_path / "sub" / "f.bin", SHA, fetch=fetch)
    assert path.read_bytes() == PAYLOAD
    assert calls == ["http://a/f.bin", "http://b/f.bin"]  # stops at the first good copy
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # no temporary left


def test_checksum_mismatch_saves_nothing(tmp_path: Path) -> None:
    fetch, _ = _server({"http://a/f.bin": b"junk"})
    with pytest.raises(DataError, match=r"f\.bin.*SHA-256 does not match.*nothing was saved"):
        dl.download_verified(["http://a/f.bin"], tmp_path / "f.bin", SHA, fetch=fetch)
    assert not (tmp_path / "f.bin").exists()
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    fetch, _ = _server({"http://a/f.bin": b"junk"})
    with pytest.raises(DataError, match="md5"):
        dl.fetch_verified(["http://a/f.bin"], md5, algorithm="md5", fetch=fetch)
    fetch, _ = _server({"http://a/f.bin": PAYLOAD})
    assert dl.fetch_verified(["http://a/f.bin"], md5, algorithm="md5", fetch=fetch) == PAYLOAD


def test_offline_and_http_errors_name_every_url_and_the_hint(tmp_path: Path) -> None:
    fetch, _ = _server({"http://a/f.bin": urllib.error.URLError("no route"),
                        "http://b/f.bin": OSError("timed out")})
    with pytest.raises(DataError, match=r"offline.*Use --data-dir X") as info:
        dl.fetch_verified(["http://a/f.bin", "http://b/f.bin"], SHA, fetch=fetch,
                          hint="Use --data-dir X.")
    assert "http://a/f.bin" in str(info.value) and "timed out" in str(info.value)
    err = urllib.error.HTTPError("http://a/f.bin", 404, "Not Found", {}, None)  # type: ignore[arg-type]
    fetch, _ = _server({"http://a/f.bin": err})
    with pytest.raises(DataError, match="HTTP 404") as info:
        dl.fetch_verified(["http://a/f.bin"], SHA, fetch=fetch)
    assert "offline" not in str(info.value)
    with pytest.raises(DataError, match="no URL"):
        dl.fetch_verified([], SHA)


def test_interrupt_inside_the_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old complete file")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.write_atomically(target, PAYLOAD)
    assert target.read_bytes() == b"old complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_written_with_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = dl.write_atomically(tmp_path / "f.bin", PAYLOAD)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"could not save f\.bin into .*file.*--data-dir"):
        dl.write_atomically(blocker / "f.bin", PAYLOAD)


def test_loaders_use_the_shared_helper() -> None:
    """No second copy of the download/verify/write routine lives in the loaders."""
    root = Path(dl.__file__).parent
    for name in ("mnist.py", "planetoid.py"):
        text = (root / name).read_text()
        for needle in ("urlopen", "mkstemp", "os.replace"):
            assert needle not in text, f"{name} still has its own {needle}"
