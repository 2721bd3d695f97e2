"""``rbp sweep``: a grid of independent runs of one experiment, locally or on a Ray cluster.

A sweep is the Cartesian product of the ``grid`` values (times the explicit ``points``); each
point is one ordinary run, ``rbp <experiment> --set key=value ... --out <sweep_out>/<point>``,
in its own subprocess. The parts, one module each:

* :mod:`.spec` — the spec (YAML or flags) and its points as ``key=value`` settings;
* :mod:`.plan` — skip / resume / run / conflict per point, by comparing resolved settings with
  those recorded in the point's ``results.json``;
* :mod:`.launch` — one :class:`Launcher` interface: local processes or Ray tasks;
* :mod:`.run` — :func:`run_sweep` (``sweep.json``, progress, ETA) and the command line;
* :mod:`rbp.runner.aggregate` — the points' results grouped, merged and summarised
  (mean ± std); shared with ``rbp report``.
"""

from __future__ import annotations

from rbp.runner.aggregate import (
    SWEEP_FILE,
    aggregate,
    group_label,
    runs_matching,
    summarize,
    write_merged_run,
)
from rbp.runner.registry import register_summary

from .launch import Job, Launcher, LocalLauncher, RayLauncher, execute
from .plan import plan_point, resolve_point
from .run import (
    POINT_LOG,
    add_arguments,
    launcher_for,
    plan,
    run_command,
    run_sweep,
    spec_from_args,
)
from .spec import Point, SweepSpec, expand_grid, load_spec, parse_grid_option, point_name

__all__ = [
    "POINT_LOG", "SWEEP_FILE", "Job", "Launcher", "LocalLauncher", "Point", "RayLauncher",
    "SweepSpec", "add_arguments", "aggregate", "execute", "expand_grid", "group_label",
    "launcher_for", "load_spec", "parse_grid_option", "plan", "plan_point", "point_name",
    "register_summary", "resolve_point", "run_command", "run_sweep", "runs_matching",
    "spec_from_args", "summarize", "write_merged_run",
]
