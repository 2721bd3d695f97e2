"""What ``--resume`` compares: a run's recorded settings against the new ones, and the data a
checkpoint was trained on (by fingerprint, wherever the files lie)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rbp.runner.config import config_to_dict
from rbp.runner.results import CHECKPOINT_DIR, RESULTS_FILE, RunExistsError, read_json, to_jsonable

__all__ = ["CONTROL_KEYS", "DATA_KEY", "LOCATION_KEYS", "SettingsMismatchError", "check_resume",
           "data_fingerprint", "describe_differences", "moved_data", "previous_results",
           "settings_differences", "with_new_defaults"]

#: Settings that control the run but not its numbers: they may differ on ``--resume`` (a
#: checkpoint loads on another device, and seeds may be regrouped into other batches).
CONTROL_KEYS = frozenset({"checkpoint_every", "interrupt_after", "device", "seed_batch"})

#: Key of a checkpoint's state holding the fingerprints of the data the run read
#: (:meth:`RunContext.record_data`): name -> SHA-256 of the arrays.
DATA_KEY = "_rbp_data"

#: Settings that say where the data are, not what they are: compared through the data's
#: fingerprints instead, when the checkpoint holds them (a run moves to a machine whose data
#: live elsewhere).
LOCATION_KEYS = frozenset({"data_dir"})

class SettingsMismatchError(RunExistsError):
    """``--resume`` with settings that differ from the run's own."""



def data_fingerprint(*arrays: Any) -> str:
    """SHA-256 (hex) of arrays' dtypes, shapes and bytes: the same for the same data wherever
    the files lay and whatever device the tensors are on."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().contiguous()
            dtype, shape = str(a.dtype).removeprefix("torch."), tuple(a.shape)
            raw = a.view(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b""
        else:
            a = np.ascontiguousarray(a)
            dtype, shape, raw = str(a.dtype), a.shape, a.tobytes()
        h.update(f"{dtype}{shape};".encode())
        h.update(raw)
    return h.hexdigest()


def settings_differences(old: dict[str, Any], new: dict[str, Any],
                         ignore: frozenset[str] = frozenset()) -> list[str]:
    """Keys whose values differ between two settings dicts (``CONTROL_KEYS`` and ``ignore``
    left out)."""
    old_j, new_j = to_jsonable(old), to_jsonable(new)
    keys = sorted((set(old_j) | set(new_j)) - CONTROL_KEYS - ignore)
    return [k for k in keys if old_j.get(k, "<unset>") != new_j.get(k, "<unset>")]


def with_new_defaults(old: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``old`` settings plus every setting of ``cfg`` they lack that ``cfg`` holds at its
    default: a setting added since a run started, left at its default, is what the run ran
    with (so the run still resumes)."""
    if not (dataclasses.is_dataclass(cfg) and isinstance(old, dict)):
        return old
    new = to_jsonable(config_to_dict(cfg))
    added = {f.name: new[f.name] for f in dataclasses.fields(cfg)
             if f.name not in old and f.name in new and _at_default(cfg, f)}
    return {**added, **old}


def _at_default(cfg: Any, f: dataclasses.Field) -> bool:
    """Whether field ``f`` of settings ``cfg`` holds its declared default."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return False
    return to_jsonable(getattr(cfg, f.name)) == to_jsonable(default)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_differences(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    """``key: old -> new`` for the first six ``keys`` (values shortened), and how many more."""
    old_j, new_j = to_jsonable(old), to_jsonable(new)
    shown = "; ".join(f"{k}: {_short(old_j.get(k))} -> {_short(new_j.get(k))}"
                      for k in keys[:6])
    return shown + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")


def previous_results(out: Path) -> dict[str, Any] | None:
    """The ``results.json`` of the run in ``out`` (None: no run there); RunExistsError when
    the run's settings cannot be known (checkpoints without results, a damaged file)."""
    path = out / RESULTS_FILE
    if not path.is_file():
        if any((out / CHECKPOINT_DIR).glob("*.pt")):
            raise RunExistsError(f"{out} has checkpoints but no {RESULTS_FILE}, so the "
                                 "settings of the run to resume are unknown; pass --force to "
                                 "start it over")
        return None
    try:
        prev = read_json(path)
    except (OSError, ValueError) as exc:
        raise RunExistsError(f"cannot read {path} ({exc}), so the settings of the run to "
                             "resume are unknown; pass --force to start it over") from None
    if not isinstance(prev, dict):
        raise RunExistsError(f"{path} does not hold a run's results; pass --force to start "
                             "over or choose another --out")
    return prev


def moved_data(prev: dict[str, Any], cfg: Any) -> list[str]:
    """The ``LOCATION_KEYS`` whose values differ between the previous run and ``cfg``."""
    old = prev.get("config")
    if not isinstance(old, dict) or not dataclasses.is_dataclass(cfg):
        return []
    new = to_jsonable(config_to_dict(cfg))
    old = to_jsonable(old)
    return [k for k in sorted(LOCATION_KEYS) if k in new and old.get(k) != new[k]]


def check_resume(out: Path, prev: dict[str, Any] | None, cfg: Any, name: str) -> None:
    """Refuse (:class:`SettingsMismatchError`) to resume the run ``prev`` in ``out`` as
    experiment ``name`` with settings ``cfg`` that differ from its own (where the data lie
    aside: the checkpoints compare the data themselves)."""
    if prev is None:
        return
    if prev.get("experiment") not in (None, name):
        raise SettingsMismatchError(
            f"{out} holds a '{prev.get('experiment')}' run, not '{name}'; choose another --out")
    old = prev.get("config")
    if not isinstance(old, dict):
        return
    new = config_to_dict(cfg)
    old = with_new_defaults(old, cfg)
    # where the data lie may change: each checkpoint compares the data's fingerprints
    diff = settings_differences(old, new, ignore=LOCATION_KEYS)
    if diff:
        raise SettingsMismatchError(
            f"cannot --resume {out} with other settings "
            f"({describe_differences(old, new, diff)}); resume with the "
            "run's own settings, choose another --out, or pass --force to start a new run there")
