"""Planetoid citation graphs (Cora, Citeseer, Pubmed) from the original ``ind.*`` files.

The eight files per data set are those of the ``data/`` folder of the ``kimiyoung/planetoid``
repository (Yang, Cohen and Salakhutdinov, ICML 2016): pickled SciPy/NumPy objects written by
Python 2, plus a text file of test node ids. They are assembled the way the usual GCN
preprocessing does it: node ``test_index[i]`` receives row ``i`` of ``tx``/``ty``, and the
Citeseer test ids that are absent from ``test.index`` (isolated nodes) become nodes with zero
features and no label.

Cora and Citeseer ship inside the package (``rbp/data/files/planetoid``, gzip-compressed, MIT
licence of the original repository), so they load offline; each packaged file is checked
against the SHA-256 table below every time it is read. Pubmed is read from a data directory or
downloaded into the user cache. Files found in a directory the user names are used as they are;
only packaged and downloaded files are checked against the table.
"""

from __future__ import annotations

import codecs
import collections
import gzip
import hashlib
import importlib
import importlib.resources
import io
import math
import os
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .cache import user_cache_dir, user_data_dir
from .download import download_verified
from .download import fetch_bytes as _fetch_bytes  # the tests patch this name
from .errors import DataError

__all__ = [
    "PACKAGED_PLANETOID",
    "PLANETOID_NAMES",
    "PLANETOID_PARTS",
    "PLANETOID_SHA256",
    "PLANETOID_URL",
    "Planetoid",
    "default_planetoid_dir",
    "describe",
    "describe_planetoid_source",
    "load_planetoid",
    "split_labelled",
]

PLANETOID_NAMES: tuple[str, ...] = ("cora", "citeseer", "pubmed")
#: The data sets whose eight files ship inside the package (Pubmed, ~8 MB, does not).
PACKAGED_PLANETOID: tuple[str, ...] = ("cora", "citeseer")
PLANETOID_PARTS: tuple[str, ...] = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
# Pinned to the commit whose files the SHA-256 table below describes.
PLANETOID_COMMIT = "af6abf468a772cc055bec88c52e4d6f51b7c37e3"
PLANETOID_URL = f"https://raw.githubusercontent.com/kimiyoung/planetoid/{PLANETOID_COMMIT}/data/"

# SHA-256 of the files in kimiyoung/planetoid's data/ folder, checked after each download.
PLANETOID_SHA256: dict[str, dict[str, str]] = {
    "cora": {
        "x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
        "y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
        "tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
        "ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
        "allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
        "ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
        "graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
        "test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    },
    "citeseer": {
        "x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
        "y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
        "tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
        "ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
        "allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
        "ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
        "graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
        "test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    },
    "pubmed": {
        "x": "fbe9cb5c47200d1b7769a26e579be3b7130b556831f9d850e77c4c74f2599b33",
        "y": "e6c807633307a07ed659249006536a147c7999c797f11a2560752990181b41b3",
        "tx": "4eb5f5d0f30f26497eb0ac6ac9719d09c67e284f1ed0385c93f3ef27a671da3d",
        "ty": "ee2e0d4819d9fbcc403689c3bf2e49face401b605932f093bc58ab6461130fdd",
        "allx": "508e538e2abdccdd54c4d3e9f49d638b4af7107d85845f66ddea5a5152658b7e",
        "ally": "0c37bbe3b5014ec365e9d393cf4791925e5ed94fb194305d74f064a8d7b50f0e",
        "graph": "5b89f0036ca22909471f1e6558eb42fa06e0c730a577bde5b058b40638f81dc9",
        "test.index": "b101d421688bbaecbd82e8a18f1e282378d6830f3a37666f28ebc47f844341b5",
    },
}


def default_planetoid_dir() -> Path:
    """The download cache used when no directory is given: ``<cache>/planetoid``, where
    ``<cache>`` is ``$XDG_CACHE_HOME/rbp`` (default ``~/.cache/rbp``)."""
    return user_cache_dir() / "planetoid"


@dataclass
class Planetoid:
    """One Planetoid graph, ready for full-batch node classification.

    Attributes:
        name: ``"cora"``, ``"citeseer"`` or ``"pubmed"``.
        features: ``float32 (N, F)`` dense node features, as stored (not normalised).
        labels: ``int64 (N,)`` class ids, ``-1`` for nodes without a label.
        edge_index: ``int64 (2, E)``; every undirected edge appears in both directions, once
            each, with no self loops, sorted by (source, target).
        num_classes: number of classes (columns of the one-hot label files).
        labelled: ``bool (N,)``, ``labels >= 0``.
    """

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    edge_index: torch.Tensor
    num_classes: int
    labelled: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """Number of nodes ``N``."""
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        """Feature dimension ``F``."""
        return int(self.features.shape[1])

    @property
    def num_undirected_edges(self) -> int:
        """Number of undirected edges (half the columns of ``edge_index``)."""
        return int(self.edge_index.shape[1]) // 2


def load_planetoid(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Planetoid:
    """Load Cora, Citeseer or Pubmed from the eight ``ind.<name>.*`` files.

    Where the files come from: without ``data_dir``, the packaged copy (Cora, Citeseer;
    SHA-256 checked) or, for Pubmed, :func:`default_planetoid_dir`. With ``data_dir``: that
    folder (or its ``planetoid/`` sub-folder, so one data root can hold MNIST and Planetoid
    side by side) when it holds any of the files, else the packaged copy. Files missing from
    a partial set, and Pubmed's, are downloaded into that folder.

    Args:
        name: ``"cora"``, ``"citeseer"`` or ``"pubmed"`` (any case).
        data_dir: a directory holding the files, or a data root with a ``planetoid/``
            sub-folder; ``None`` uses the packaged copy or the download cache.
        download: fetch files missing from the directory (for a data set that is not
            packaged) from the ``kimiyoung/planetoid`` repository, verifying each one's
            SHA-256 before saving it.

    Returns:
        The assembled :class:`Planetoid`.

    Raises:
        DataError: unknown name, missing files (without ``download``), no network, a checksum
            mismatch, a file that does not unpickle (corrupt) or files that disagree with one
            another.
    """
    key = _normalise_name(name)
    if data_dir is None and key in PACKAGED_PLANETOID:
        return _load_packaged(key)
    directory = _planetoid_dir(key, data_dir)
    paths = {part: directory / f"ind.{key}.{part}" for part in PLANETOID_PARTS}
    missing = [part for part, path in paths.items() if not path.is_file()]
    if len(missing) == len(PLANETOID_PARTS) and key in PACKAGED_PLANETOID:
        if not directory.is_dir():  # most likely a typo: say so rather than ignore it
            raise DataError(
                f"data directory {directory} does not exist. Pass an existing folder as "
                f"--data-dir (or RBP_DATA_DIR), or leave it unset to use the copy of {key} "
                "that ships with rbp."
            )
        return _load_packaged(key)  # a partial set is the user's to fix: no silent mix-up
    if missing:
        if not download:
            raise DataError(_missing_message(key, directory, missing))
        for part in missing:
            _download_part(key, part, directory)

    objects = {part: _unpickle(paths[part]) for part in PLANETOID_PARTS if part != "test.index"}
    test_index = _read_test_index(paths["test.index"])
    return _assemble(key, objects, test_index)


def split_labelled(
    labelled: torch.Tensor,
    seed: int,
    fractions: tuple[float, float, float] = (0.01, 0.49, 0.50),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomly split the labelled nodes into train / validation / test node ids.

    All labelled nodes are shuffled with a ``torch.Generator`` seeded by ``seed`` and cut into
    consecutive pieces of ``round(fractions[k] * n)`` nodes (the training piece has at least
    one node). When the fractions sum to 1 the test piece takes every remaining node.

    Args:
        labelled: ``bool (N,)`` mask of nodes that have a label.
        seed: the seed; the same seed always gives the same split.
        fractions: train, validation and test fractions, non-negative, summing to at most 1.

    Returns:
        ``(train_idx, val_idx, test_idx)``: disjoint, sorted ``int64`` node ids.

    Raises:
        DataError: a mask that is not 1-D boolean, bad fractions, or too few labelled nodes.
    """
    if labelled.dtype != torch.bool or labelled.dim() != 1:
        raise DataError(
            f"split_labelled needs a 1-D bool mask, got dtype {labelled.dtype} and shape "
            f"{tuple(labelled.shape)}. Pass Planetoid.labelled."
        )
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise DataError(
            f"fractions must be three non-negative numbers summing to at most 1, got {fractions}."
        )
    nodes = torch.nonzero(labelled.cpu(), as_tuple=False).flatten()
    n = int(nodes.numel())
    n_train = max(1, _round_half_up(fractions[0] * n))
    n_val = _round_half_up(fractions[1] * n)
    if abs(sum(fractions) - 1.0) <= 1e-9:
        n_test = n - n_train - n_val
    else:
        n_test = min(_round_half_up(fractions[2] * n), n - n_train - n_val)
    if n_train + n_val > n or n_test < 0:
        raise DataError(
            f"cannot cut {n} labelled nodes into fractions {fractions}: need at least one "
            "training node. Use a graph with more labelled nodes or larger fractions."
        )
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = nodes[torch.randperm(n, generator=generator)]
    train = shuffled[:n_train]
    val = shuffled[n_train : n_train + n_val]
    test = shuffled[n_train + n_val : n_train + n_val + n_test]
    return train.sort().values, val.sort().values, test.sort().values


def _round_half_up(x: float) -> int:
    """Round a non-negative number to the nearest integer, halves upwards."""
    return int(math.floor(x + 0.5))


def describe_planetoid_source(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Say, in one line for logs, where :func:`load_planetoid` takes ``name`` from.

    Reads no data; raises :class:`DataError` only for an unknown name. A data set that would
    have to be downloaded says so, so a dry run can flag it before any work starts.
    """
    key = _normalise_name(name)
    if data_dir is None and key in PACKAGED_PLANETOID:
        return f"{key}: the copy packaged with rbp (kimiyoung/planetoid, SHA-256 checked)"
    directory = _planetoid_dir(key, data_dir)
    missing = [p for p in PLANETOID_PARTS if not (directory / f"ind.{key}.{p}").is_file()]
    if not missing:
        return f"{key}: ind.{key}.* files in {directory}"
    if len(missing) == len(PLANETOID_PARTS) and key in PACKAGED_PLANETOID:
        if not directory.is_dir():
            return f"{key}: not found: data directory {directory} does not exist"
        return f"{key}: the copy packaged with rbp (kimiyoung/planetoid, SHA-256 checked)"
    return (f"{key}: not found in {directory} (missing {', '.join(missing)}); it will be "
            f"downloaded from github.com/kimiyoung/planetoid (needs network)")


def describe(p: Planetoid) -> str:
    """One line of statistics about a loaded graph, for logs."""
    return (
        f"{p.name}: {p.num_nodes} nodes, {p.num_features} features, {p.num_classes} classes, "
        f"{p.num_undirected_edges} undirected edges ({p.edge_index.shape[1]} directed), "
        f"{int(p.labelled.sum())} labelled nodes"
    )


# ----------------------------------------------------------------------------- reading


def _normalise_name(name: str) -> str:
    """Lower-case and validate a data set name."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if key not in PLANETOID_NAMES:
        raise DataError(
            f"unknown Planetoid data set {name!r}; valid names are {', '.join(PLANETOID_NAMES)}."
        )
    return key


def _planetoid_dir(key: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` itself, or its ``planetoid/`` sub-folder when only that holds the files
    of ``key``; :func:`default_planetoid_dir` for ``None``."""
    if data_dir is None:
        return default_planetoid_dir()
    directory = user_data_dir(data_dir)
    sub = directory / "planetoid"
    if not (directory / f"ind.{key}.x").is_file() and (sub / f"ind.{key}.x").is_file():
        return sub
    return directory


def _load_packaged(key: str) -> Planetoid:
    """Assemble ``key`` from the gzip-compressed copies shipped in ``rbp/data/files``."""
    payloads = {part: _read_packaged(key, part) for part in PLANETOID_PARTS}
    objects = {part: _unpickle_bytes(payloads[part], f"packaged ind.{key}.{part}")
               for part in PLANETOID_PARTS if part != "test.index"}
    test_index = _parse_test_index(payloads["test.index"].decode("latin-1"),
                                   f"packaged ind.{key}.test.index")
    return _assemble(key, objects, test_index)


def _read_packaged(key: str, part: str) -> bytes:
    """The original bytes of one packaged file, after checking their SHA-256."""
    resource = importlib.resources.files(__package__) / "files" / "planetoid" / \
        f"ind.{key}.{part}.gz"
    try:
        payload = gzip.decompress(resource.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"the packaged copy of ind.{key}.{part} ({resource}) is missing or damaged "
            f"({exc}). Reinstall rbp, or pass --data-dir pointing at a folder holding the "
            f"ind.{key}.* files of github.com/kimiyoung/planetoid."
        ) from exc
    digest = hashlib.sha256(payload).hexdigest()
    if digest != PLANETOID_SHA256[key][part]:
        raise DataError(
            f"the packaged copy of ind.{key}.{part} ({resource}) has SHA-256 {digest}, "
            f"expected {PLANETOID_SHA256[key][part]}: the installation is damaged. Reinstall "
            f"rbp, or pass --data-dir pointing at verified copies of the ind.{key}.* files."
        )
    return payload


def _missing_message(key: str, directory: Path, missing: list[str]) -> str:
    """The DataError text for files absent from ``directory`` when downloading is off."""
    files = ", ".join(f"ind.{key}.{part}" for part in missing)
    where = f"in {directory}" if directory.is_dir() else f"({directory} does not exist)"
    return (
        f"Planetoid file(s) {files} not found {where}. Pass --data-dir pointing at a folder "
        f"containing ind.{key}.x, ind.{key}.y, ind.{key}.tx, ind.{key}.ty, ind.{key}.allx, "
        f"ind.{key}.ally, ind.{key}.graph and ind.{key}.test.index (the data/ folder of "
        "github.com/kimiyoung/planetoid), or run once online with downloading enabled."
    )


def _multiarray_attr(name: str) -> Any:
    """An attribute of NumPy's ``multiarray`` module, wherever this NumPy version keeps it."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy multiarray.{name} not found")


_SPARSE_CLASSES = ("csr_matrix", "csc_matrix", "coo_matrix", "lil_matrix")
_BUILTINS = {"list": list, "dict": dict, "set": set, "tuple": tuple, "int": int, "float": float}


class _PlanetoidUnpickler(pickle.Unpickler):
    """An unpickler that only builds the objects the Planetoid files contain.

    Allowed: NumPy arrays and dtypes, SciPy sparse matrices, ``collections.defaultdict`` and
    plain containers. Anything else is refused, so a tampered file cannot run code. Old module
    paths (``scipy.sparse.csr``, ``numpy.core``) are mapped to their current objects.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global named in the pickle, or refuse it."""
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            return _multiarray_attr(name)
        if module.startswith("scipy.sparse") and name in _SPARSE_CLASSES:
            return getattr(sp, name)
        if module == "collections" and name in ("defaultdict", "OrderedDict"):
            return getattr(collections, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "_codecs" and name == "encode":
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load unexpected object {module}.{name}")


def _unpickle(path: Path) -> Any:
    """Unpickle one Python-2 ``ind.*`` file (latin-1 strings) with the restricted unpickler."""
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise DataError(f"could not read {path}: {exc}. Check its permissions.") from exc
    return _unpickle_bytes(payload, path)


def _unpickle_bytes(payload: bytes, path: Path | str) -> Any:
    """Unpickle the bytes of one ``ind.*`` file; ``path`` names it in error messages."""
    try:
        return _PlanetoidUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except Exception as exc:  # arbitrary bytes can raise almost any exception type
        raise DataError(
            f"{path} could not be unpickled ({type(exc).__name__}: {exc}); the file looks "
            "corrupt or truncated. Delete it and run once online with downloading enabled, or "
            "replace it with the copy from the data/ folder of github.com/kimiyoung/planetoid."
        ) from exc


def _read_test_index(path: Path) -> np.ndarray:
    """Read ``ind.<name>.test.index``: one non-negative integer node id per line."""
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"could not read {path}: {exc}. Check its permissions.") from exc
    return _parse_test_index(text, path)


def _parse_test_index(text: str, path: Path | str) -> np.ndarray:
    """Node ids from the text of a ``test.index`` file; ``path`` names it in errors."""
    try:
        ids = np.array([int(tok) for tok in text.split()], dtype=np.int64)
    except ValueError as exc:
        raise DataError(
            f"{path} is not a list of integer node ids ({exc}); the file looks corrupt. "
            "Replace it with the copy from github.com/kimiyoung/planetoid."
        ) from exc
    if ids.size == 0 or ids.min() < 0:
        raise DataError(
            f"{path} holds no valid node ids; the file looks corrupt. Replace it with the copy "
            "from github.com/kimiyoung/planetoid."
        )
    return ids


def _as_dense(obj: Any, key: str, part: str) -> np.ndarray:
    """Turn a loaded feature/label object into a dense 2-D float32 array, or fail clearly."""
    if sp.issparse(obj):
        _check_sparse(obj, key, part)  # SciPy's C code trusts these arrays: a bad one crashes
        try:
            arr = np.asarray(obj.toarray())
        except Exception as exc:
            raise DataError(f"ind.{key}.{part} is not a valid sparse matrix ({exc}); the file "
                            "looks corrupt.") from None
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise DataError(
            f"ind.{key}.{part} holds a {type(obj).__name__}, expected a matrix; the file looks "
            "corrupt or belongs to another data set."
        )
    if arr.ndim != 2:
        raise DataError(f"ind.{key}.{part} is {arr.ndim}-D, expected a 2-D matrix.")
    try:
        return arr.astype(np.float32, copy=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"ind.{key}.{part} does not hold numbers ({exc}); the file looks "
                        "corrupt.") from None


#: Largest matrix (entries) a Planetoid file may expand to; Pubmed's allx has 9.4 million.
_MAX_DENSE_ENTRIES = 2**28


def _check_sparse(obj: Any, key: str, part: str) -> None:
    """Validate the arrays of an unpickled SciPy sparse matrix before SciPy touches them:
    shape, dtypes, lengths and index ranges (a damaged file could otherwise crash SciPy)."""
    where = f"ind.{key}.{part}"

    def bad(what: str) -> DataError:
        return DataError(f"{where} is a damaged sparse matrix ({what}); the file looks corrupt. "
                         "Replace it with the copy from github.com/kimiyoung/planetoid.")

    state = getattr(obj, "__dict__", {})
    shape = state.get("_shape", state.get("shape"))
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(n, (int, np.integer)) and 0 <= n < 2**31 for n in shape)):
        raise bad(f"shape {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    if rows * cols > _MAX_DENSE_ENTRIES:
        raise bad(f"shape {rows} x {cols} is far larger than any Planetoid matrix")

    def array(name: str, integer: bool) -> np.ndarray:
        a = state.get(name)
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise bad(f"'{name}' is not a 1-D array")
        kind = "iu" if integer else "iufb"
        if a.dtype.kind not in kind:
            raise bad(f"'{name}' has dtype {a.dtype}")
        return a

    fmt = getattr(obj, "format", None)
    if fmt in ("csr", "csc"):
        major, minor = (rows, cols) if fmt == "csr" else (cols, rows)
        indptr, indices, data = array("indptr", True), array("indices", True), array("data", False)
        if indptr.size != major + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            raise bad("'indptr' does not fit its shape")
        nnz = int(indptr[-1])
        if indices.size < nnz or data.size < nnz:
            raise bad("fewer stored entries than 'indptr' says")
        if nnz and (int(indices[:nnz].min()) < 0 or int(indices[:nnz].max()) >= minor):
            raise bad("column index out of range" if fmt == "csr" else "row index out of range")
    elif fmt == "coo":
        if "coords" in state:  # SciPy >= 1.13 keeps (row, col) as 'coords'
            coords = state["coords"]
            if not (isinstance(coords, tuple) and len(coords) == 2):
                raise bad("'coords' is not a (row, col) pair")
            state = {**state, "row": coords[0], "col": coords[1]}
        row, col, data = array("row", True), array("col", True), array("data", False)
        if not row.size == col.size == data.size:
            raise bad("'row', 'col' and 'data' differ in length")
        if row.size and (row.min() < 0 or row.max() >= rows or col.min() < 0
                         or col.max() >= cols):
            raise bad("index out of range")
    elif fmt == "lil":
        lil_rows, lil_data = state.get("rows"), state.get("data")
        if not (isinstance(lil_rows, np.ndarray) and isinstance(lil_data, np.ndarray)
                and lil_rows.shape == lil_data.shape == (rows,)):
            raise bad("'rows' and 'data' do not fit its shape")
        for r, d in zip(lil_rows, lil_data, strict=True):
            if not (isinstance(r, list) and isinstance(d, list) and len(r) == len(d)
                    and all(isinstance(c, (int, np.integer)) and 0 <= c < cols for c in r)):
                raise bad("a row's column list is malformed or out of range")
    else:
        raise bad(f"unexpected format {fmt!r}")


def _one_hot_to_labels(onehot: np.ndarray) -> np.ndarray:
    """Class id per row (first maximum); ``-1`` where the row is all zero."""
    labels = onehot.argmax(axis=1).astype(np.int64)
    labels[~(onehot != 0).any(axis=1)] = -1
    return labels


def _edge_index(graph: Any, key: str, num_nodes: int) -> torch.Tensor:
    """Symmetric, deduplicated, self-loop-free edge list from adjacency lists."""
    if not isinstance(graph, Mapping):
        raise DataError(
            f"ind.{key}.graph holds a {type(graph).__name__}, expected a dict of adjacency "
            "lists; the file looks corrupt."
        )
    try:
        sources = np.fromiter((int(u) for u, nbrs in graph.items() for _ in nbrs), dtype=np.int64)
        targets = np.fromiter((int(v) for nbrs in graph.values() for v in nbrs), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"ind.{key}.graph has a malformed adjacency list ({exc}).") from exc
    if sources.size and (
        min(sources.min(), targets.min()) < 0 or max(sources.max(), targets.max()) >= num_nodes
    ):
        raise DataError(
            f"ind.{key}.graph refers to nodes outside 0..{num_nodes - 1}; the graph and feature "
            "files do not belong together."
        )
    keep = sources != targets
    src = np.concatenate([sources[keep], targets[keep]])
    dst = np.concatenate([targets[keep], sources[keep]])
    codes = np.unique(src * num_nodes + dst)
    pairs = np.stack([codes // num_nodes, codes % num_nodes])
    return torch.from_numpy(pairs).long()


def _assemble(key: str, objects: dict[str, Any], test_index: np.ndarray) -> Planetoid:
    """Build the graph exactly as the standard GCN preprocessing of the Planetoid files."""
    allx = _as_dense(objects["allx"], key, "allx")
    tx = _as_dense(objects["tx"], key, "tx")
    ally = _as_dense(objects["ally"], key, "ally")
    ty = _as_dense(objects["ty"], key, "ty")
    n_known, num_features = allx.shape
    num_classes = ally.shape[1]
    graph = objects["graph"]
    # every node is a key of the adjacency dict: test ids beyond them are not nodes
    graph_nodes = len(graph) if isinstance(graph, Mapping) else 0
    consistent = (
        tx.shape[1] == num_features
        and ally.shape[0] == n_known
        and ty.shape == (tx.shape[0], num_classes)
        and test_index.shape[0] == tx.shape[0]
        and np.unique(test_index).size == test_index.size
        and int(test_index.min()) >= n_known
        and int(test_index.max()) < max(n_known + tx.shape[0], graph_nodes)
    )
    if not consistent:
        raise DataError(
            f"the ind.{key}.* files disagree (allx {allx.shape}, tx {tx.shape}, ally "
            f"{ally.shape}, ty {ty.shape}, {test_index.size} test ids from "
            f"{int(test_index.min())} to {int(test_index.max())}, a graph of {graph_nodes} "
            "nodes); they do not belong to one data set. Replace them with "
            "the copies from github.com/kimiyoung/planetoid."
        )
    # Test ids are a range after the allx nodes; for Citeseer some ids in that range are
    # missing from test.index (isolated nodes) and stay as zero-feature, unlabelled nodes.
    num_nodes = max(n_known + tx.shape[0], int(test_index.max()) + 1)

    features = np.zeros((num_nodes, num_features), dtype=np.float32)
    features[:n_known] = allx
    features[test_index] = tx  # row i of tx belongs to node test_index[i]
    labels = np.full(num_nodes, -1, dtype=np.int64)
    labels[:n_known] = _one_hot_to_labels(ally)
    labels[test_index] = _one_hot_to_labels(ty)

    labels_t = torch.from_numpy(labels)
    return Planetoid(
        name=key,
        features=torch.from_numpy(features),
        labels=labels_t,
        edge_index=_edge_index(objects["graph"], key, num_nodes),
        num_classes=int(num_classes),
        labelled=labels_t >= 0,
    )


# ----------------------------------------------------------------------------- download


def _download_part(key: str, part: str, directory: Path) -> Path:
    """Download ``ind.<key>.<part>`` into ``directory`` after checking its SHA-256."""
    filename = f"ind.{key}.{part}"
    return download_verified(
        [PLANETOID_URL + filename], directory / filename, PLANETOID_SHA256[key][part],
        fetch=lambda url: _fetch_bytes(url),
        hint=f"Pass --data-dir pointing at a folder containing ind.{key}.x … "
        f"ind.{key}.test.index (the data/ folder of github.com/kimiyoung/planetoid, downloaded "
        f"by hand), or run once online to download them into {directory}.",
    )
