"""Run directories, strict JSON results and a description of the machine."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rbp.data.atomic import atomic_write

__all__ = [
    "CHECKPOINT_DIR",
    "RESULTS_FILE",
    "RunExistsError",
    "check_run_dir",
    "current_torch_threads",
    "machine_info",
    "prepare_run_dir",
    "read_json",
    "to_jsonable",
    "write_json",
]

#: Name of the results file inside a run directory.
RESULTS_FILE = "results.json"
#: Sub-directory of a run directory holding ``<tag>.pt`` checkpoints.
CHECKPOINT_DIR = "checkpoints"


class RunExistsError(ValueError):
    """The output directory holds a run that this invocation would silently overwrite."""


def _checkpoints(out: Path) -> list[Path]:
    ckpt_dir = out / CHECKPOINT_DIR
    return sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []


def read_json(path: Path) -> Any:
    """Load a JSON file."""
    with open(path) as f:
        return json.load(f)


def _readable(path: Path) -> Any:
    """The JSON in ``path``, or None when it cannot be read."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _status(out: Path) -> str | None:
    path = out / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data.get("status") if isinstance(data, dict) else None


def prepare_run_dir(out: Path, resume: bool, force: bool) -> Path:
    """Create ``out`` and protect an existing run in it; return the directory.

    A finished run needs ``force`` (or ``resume``); checkpoints of an unfinished run need
    ``resume`` to continue or ``force`` to start over. ``force`` deletes the checkpoints and
    the old results file. Raises :class:`RunExistsError`.
    """
    out = Path(out)
    check_run_dir(out, resume, force)
    if force:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        (out / RESULTS_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Raise :class:`RunExistsError` when a run into ``out`` would overwrite a run without
    ``force`` (the checks of :func:`prepare_run_dir`, which changes nothing)."""
    out = Path(out)
    if resume and force:
        raise RunExistsError("--resume and --force exclude each other")
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"--out {out} exists and is not a directory")
    if not (resume or force):
        path = out / RESULTS_FILE
        if path.is_file() and not isinstance(_readable(path), dict):
            raise RunExistsError(
                f"{path} cannot be read as a run's results (damaged?), so whether it holds a "
                "finished run is unknown; pass --force to overwrite it or choose another --out"
            )
        if _status(out) == "finished":
            raise RunExistsError(
                f"{out} holds a finished run; pass --force to overwrite it or choose another --out"
            )
        if _checkpoints(out):
            raise RunExistsError(
                f"{out} holds checkpoints of an unfinished run; pass --resume to continue it "
                "or --force to start over"
            )


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types: numpy/torch scalars and arrays become numbers and
    lists, paths strings, dataclasses dicts; NaN and infinities become ``None``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` atomically as strict JSON (see :func:`to_jsonable`)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_write(Path(path)) as f:
        f.write(text.encode())


def current_torch_threads() -> int:
    """The threads torch uses now (``torch.get_num_threads()``)."""
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """Software versions and hardware of this machine (no host name)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": current_torch_threads(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "version": torch.version.cuda,
            "device": torch.cuda.get_device_name(0),
            "device_count": torch.cuda.device_count(),
        }
    return info
