"""A sweep directory as data: its points' results grouped and merged, mean ± std over a key.

Read by the sweeps (an application's summary at the end of a sweep) and by ``rbp report``.

Nothing here knows an application: points are grouped by their grid values except the
``split`` keys (by default the method keys), and the ``merge`` mapping of each point's
``results.json`` (by default ``methods``, the runner's per-method results) is merged across the
points of a group, so that each group reads like the ``results.json`` of one run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rbp.runner.results import RESULTS_FILE, read_json, write_json
from rbp.runner.stats import mean_std

__all__ = ["SWEEP_FILE", "aggregate", "group_label", "name_part", "read_results",
           "runs_matching", "summarize", "write_merged_run"]

#: Summary file written at the top of a sweep directory.
SWEEP_FILE = "sweep.json"


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """The ``results.json`` of ``run_dir``; None when absent, unreadable or not a mapping."""
    try:
        data = read_json(Path(run_dir) / RESULTS_FILE)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def name_part(value: Any) -> str:
    """``value`` as a piece of a file name or label (lists joined by ``+``)."""
    if isinstance(value, (list, tuple)):
        text = "+".join(name_part(v) for v in value)
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "_" for c in text) or "_"


def group_label(values: Mapping[str, Any]) -> str:
    """``{"dataset": "cora", "seed": 0}`` -> ``"dataset=cora,seed=0"`` (``"all"`` for none)."""
    return ",".join(f"{k.lstrip('-')}={name_part(v)}" for k, v in values.items()) or "all"


def aggregate(sweep_dir: Path, split: Sequence[str] = ("method", "methods"),
              merge: str = "methods") -> dict[str, Any]:
    """Collect the finished points of a sweep into one structure.

    Returns ``{"experiment", "grid", "keys", "results", "points", "incomplete"}`` where

    * ``points[name]`` = ``{"values", "status", "path", "results"}`` (``results`` = the point's
      whole ``results.json``, ``None`` when it has none);
    * ``results[label]`` = ``{"values": v, merge: {...}, "points": [names]}``, one entry per
      combination ``v`` of the grid values other than the ``split`` keys: the ``merge``
      mappings of the finished points sharing ``v`` merged into one (``label`` is e.g.
      ``"dataset=cora,seed=0"``);
    * ``keys`` = the grid keys of ``values``; ``incomplete`` = names of unfinished points.

    Raises ValueError when two points of one group report the same entry of ``merge``.
    """
    sweep_dir = Path(sweep_dir)
    doc = read_json(sweep_dir / SWEEP_FILE)
    agg: dict[str, Any] = {"experiment": doc["experiment"], "grid": doc.get("grid", {}),
                           "keys": [], "results": {}, "points": {}, "incomplete": []}
    for rec in doc["points"]:
        res = read_results(sweep_dir / rec["path"])
        status = res.get("status") if res else rec.get("status")
        values = rec.get("values") or {}
        agg["points"][rec["name"]] = {"values": values, "status": status,
                                      "path": str(sweep_dir / rec["path"]), "results": res}
        if status != "finished" or res is None:
            agg["incomplete"].append(rec["name"])
            continue
        others = {k: v for k, v in values.items() if k.lstrip("-") not in split}
        agg["keys"] = list(others)
        label = group_label(others)
        group = agg["results"].setdefault(label, {"values": others, merge: {}, "points": []})
        group["points"].append(rec["name"])
        for key, value in (res.get(merge) or {}).items():
            if key in group[merge]:
                raise ValueError(f"'{merge}' entry '{key}' of group {label} is reported by "
                                 f"two points ({', '.join(group['points'])})")
            group[merge][key] = value
    return agg


def runs_matching(agg: Mapping[str, Any], **values: Any) -> list[dict[str, Any]]:
    """The merged results of the groups whose grid values include ``values`` (e.g. all seeds
    of ``dataset="cora"``), in sweep order: ``[{"values", "methods", "points"}, ...]``."""
    return [g for g in agg["results"].values()
            if all(g["values"].get(k) == v for k, v in values.items())]


def summarize(agg: Mapping[str, Any], over: str = "seed",
              merge: str = "methods") -> dict[str, dict[str, Any]]:
    """Mean, sample standard deviation and count (:func:`rbp.runner.stats.mean_std`) of every
    finite numeric scalar metric of every method, across the values of grid key ``over``.

    Returns ``{label of the other grid values: {method: {metric: {"mean", "std", "n"}}}}``.
    """
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for group in agg["results"].values():
        rest = {k: v for k, v in group["values"].items() if k.lstrip("-") != over}
        for method, result in group.get(merge, {}).items():
            if not isinstance(result, Mapping):
                continue
            for metric, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                        math.isfinite(value):
                    (samples.setdefault(group_label(rest), {}).setdefault(method, {})
                     .setdefault(metric, []).append(float(value)))
    return {label: {method: {metric: mean_std(xs).as_dict() for metric, xs in metrics.items()}
                    for method, metrics in methods.items()}
            for label, methods in samples.items()}


def write_merged_run(directory: Path, experiment: str, results: Mapping[str, Any],
                     points: Sequence[str]) -> Path:
    """Write ``results`` merged from the finished ``points`` of a sweep as ``results.json`` of a
    run directory, so that figures, tables and ``rbp report`` treat it like a single run."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {**results, "experiment": experiment, "status": "finished",
           "merged_from": list(points)}
    write_json(directory / RESULTS_FILE, doc)
    return directory
