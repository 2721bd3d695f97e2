"""Atomic, checksummed checkpoints and random-number-generator state, so a run can resume.

A checkpoint file is ``MAGIC``, the SHA-256 of the payload in hex and a newline, then the
payload: ``torch.save`` of tensors and plain Python values. It is read back only with
``torch.load(weights_only=True)`` after the checksum matches, so a damaged file is refused
and a crafted one cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rbp.data.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "parse_checkpoint",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

#: First bytes of every checkpoint file (format version 1).
MAGIC = b"RBPCKPT1\n"
_DIGEST_LEN = 64  # hex characters of a SHA-256

class CheckpointError(ValueError):
    """A checkpoint file is damaged, not written by rbp, or holds objects that are not data."""


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with str/int/float subclasses (enums, NumPy scalars) as the plain types that
    ``weights_only`` loading accepts; TypeError naming ``where`` for anything else."""
    if obj is None or type(obj) in (bool, int, float, str, bytes, complex):
        return obj
    if isinstance(obj, torch.Tensor | torch.dtype | torch.device | torch.Size):
        return obj
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        return {_plain(k, f"{where} key"): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"checkpoint {where} is a {type(obj).__name__}; store tensors and plain "
                    "values only (convert NumPy arrays with torch.from_numpy)")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain Python values) atomically, with its SHA-256."""
    buf = io.BytesIO()
    torch.save(_plain(state, "state"), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    with atomic_write(Path(path)) as f:
        f.write(MAGIC + digest + b"\n")
        f.write(payload)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Read a checkpoint written by :func:`save_checkpoint`; ``None`` if there is none.

    Raises :class:`CheckpointError` when the checksum does not match or the file holds
    anything but tensors and plain values (nothing in it is executed).
    """
    path = Path(path)
    if not path.is_file():
        return None
    return parse_checkpoint(path.read_bytes(), path)


def parse_checkpoint(data: bytes, path: Path) -> dict[str, Any]:
    """The state held in ``data``, the bytes of checkpoint file ``path`` (named in errors);
    raises :class:`CheckpointError` as :func:`load_checkpoint` does."""
    fix = "delete it to redo that part of the run, or pass --force to start the run over"
    head = len(MAGIC) + _DIGEST_LEN + 1
    if not data.startswith(MAGIC) or len(data) < head or data[head - 1:head] != b"\n":
        raise CheckpointError(f"checkpoint {path} was not written by this version of rbp "
                              f"or is truncated; {fix}")
    digest, payload = data[len(MAGIC):head - 1], data[head:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged (SHA-256 mismatch); {fix}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = [ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln]
        first = (why or lines or [type(exc).__name__])[0]
        first = first.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler "
                                                                          "error: ")
        raise CheckpointError(f"refusing checkpoint {path}: it holds objects other than "
                              f"tensors and plain values ({first[:200]}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
                              f"{fix}")
    return state


def rng_state() -> dict[str, Any]:
    """Snapshot of Python's, NumPy's global and torch's (CPU and CUDA) generators, as tensors
    and plain values (so that a checkpoint loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`rng_state` output (CUDA only when present and usable)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = np.asarray(npy["keys"].numpy() if isinstance(npy["keys"], torch.Tensor)
                          else npy["keys"]).astype(np.uint32)
        npy = (npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
