"""The device a run lives on: the ``device`` setting and ``--device`` flag of every experiment.

``auto`` is CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps``
name one. A device this machine does not have is refused before any work starts, in one line
that says what is there instead.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch

from rbp.runner.config import ConfigError

__all__ = ["DEVICE_CHOICES", "describe_device", "resolve_device"]

#: What the ``device`` setting accepts (``cuda:N`` for any N).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

_CUDA = re.compile(r"cuda(?::(\d+))?")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: Any) -> torch.device:
    """The :class:`torch.device` that ``spec`` names on this machine.

    Raises:
        ConfigError: ``spec`` is not one of :data:`DEVICE_CHOICES`, or names a device this
            machine does not have (no CUDA build or GPU, a GPU index out of range, no MPS).
    """
    if not isinstance(spec, str):
        raise ConfigError(f"setting 'device' must be a string ({', '.join(DEVICE_CHOICES)}), "
                          f"got {spec!r}")
    name = spec.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' is not available here (no Apple-silicon GPU that "
                              "torch can use); use --device cpu or --device auto")
        return torch.device("mps")
    match = _CUDA.fullmatch(name)
    if match:
        if not torch.cuda.is_available():
            build = ("this torch build has no CUDA" if torch.version.cuda is None
                     else "torch sees no GPU")
            raise ConfigError(f"device '{spec}' is not available here ({build}); use "
                              "--device cpu or --device auto")
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device '{spec}' is not available here: torch sees {count} "
                              f"GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    close = difflib.get_close_matches(name, ["auto", "cpu", "cuda", "mps"], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown device '{spec}'{hint} (valid: {', '.join(DEVICE_CHOICES)})")


def describe_device(device: torch.device) -> dict[str, Any]:
    """What ``results.json`` records of the device a run used: its name and, for a GPU, model."""
    out: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
