"""What to do with each point: skip, resume, run afresh, or refuse — by comparing settings.

A point's settings are resolved in the sweep process exactly as its run will resolve them
(:func:`rbp.runner.config.build_config`); they are compared with the ``config`` recorded in
the ``results.json`` already in the point's directory, so a finished run is reused only when
it was made with the same settings, whatever the command line looked like.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rbp.runner.aggregate import read_results
from rbp.runner.arguments import check_flags
from rbp.runner.config import build_config, config_to_dict
from rbp.runner.registry import Experiment
from rbp.runner.results import CHECKPOINT_DIR, RESULTS_FILE, to_jsonable
from rbp.runner.resume import LOCATION_KEYS, settings_differences

from .spec import Point

__all__ = ["changed_settings", "plan_point", "resolve_point", "setting_defaults"]


def resolve_point(exp: Experiment, point: Point, quick: bool = False) -> dict[str, Any]:
    """The settings ``point`` runs with, as stored in its ``results.json`` (raises
    :class:`~rbp.runner.config.ConfigError` or FileNotFoundError for bad settings or a flag
    the run would refuse)."""
    check_flags(exp, point.flags)
    quick = quick or "--quick" in point.flags
    return to_jsonable(config_to_dict(build_config(exp, point.overrides, quick=quick)))


def setting_defaults(config_cls: type) -> dict[str, Any]:
    """The default of every setting of dataclass ``config_cls`` that has one (JSON form)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default_factory())
    return out


def changed_settings(old: dict[str, Any], new: dict[str, Any],
                     defaults: dict[str, Any] | None = None) -> list[str]:
    """Keys whose values differ. A setting the old run did not record (added to the code
    since) counts as unchanged when the new value is its default, and one the code no longer
    has counts as unchanged when the old run recorded it as null (off)."""
    defaults = defaults or {}
    return [k for k in settings_differences(old, new)
            if not (k not in old and k in defaults and new.get(k) == defaults[k])
            and not (k not in new and old.get(k) is None)]


def plan_point(run_dir: Path, settings: dict[str, Any] | None, force: bool = False,
               experiment: str | None = None,
               defaults: dict[str, Any] | None = None) -> tuple[str, str]:
    """``(action, why)`` for the point whose resolved ``settings`` are given: ``skip`` a
    finished run with the same settings, ``resume`` an unfinished one with checkpoints and
    the same settings, ``run`` afresh, or ``conflict`` when the directory holds a run with
    other settings or of another ``experiment`` (``why`` names the keys and says to pass
    ``--force``). ``defaults``: see :func:`changed_settings`."""
    if force:
        return "run", "--force"
    prev = read_results(run_dir)
    ckpt = run_dir / CHECKPOINT_DIR
    has_ckpt = ckpt.is_dir() and any(ckpt.glob("*.pt"))
    if prev is None and (run_dir / RESULTS_FILE).is_file() and not has_ckpt:
        return "conflict", (f"{run_dir / RESULTS_FILE} cannot be read (damaged?), so whether "
                            "it holds a finished run is unknown; pass --force to redo it")
    finished = prev is not None and prev.get("status") == "finished"
    other = prev.get("experiment") if prev is not None else None
    if (finished or has_ckpt) and experiment is not None and other not in (None, experiment):
        return "conflict", (f"{run_dir} holds a run of '{other}', not '{experiment}'; pass "
                            "--force to replace it")
    if (finished or has_ckpt) and prev is not None and settings is not None:
        old = prev.get("config")
        diff = (changed_settings(old, settings, defaults) if isinstance(old, dict)
                else ["(no settings recorded)"])
        moved = [k for k in diff if k in LOCATION_KEYS]
        if moved and len(moved) == len(diff) and has_ckpt:  # the run checks the data there
            return "resume", (f"{', '.join(moved)} changed: the run checks the data there "
                              "against its checkpoints")
        if diff:
            what = "finished run" if finished else "run with checkpoints"
            keys = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            return "conflict", (f"{run_dir} holds a {what} made with other settings "
                                f"({keys}); pass --force to redo it")
    if finished:
        return "skip", "finished"
    if has_ckpt:
        return "resume", "checkpoints"
    return "run", "new"
