"""The experiment registry: what ``rbp <name>`` and ``rbp sweep`` can run.

An application registers itself when its package is imported::

    register(Experiment(name="hopfield", help="...", config_cls=HopfieldConfig, run=run))
    register_summary("hopfield", sweep_summary)   # optional: merge a sweep's points

The registry sits below the run lifecycle, the sweeps, the report and the CLI, so that an
application can register without importing any of them. :func:`experiments` imports the
packaged applications and the modules named in ``$RBP_IMPORTS`` (comma-separated; how a sweep
hands its ``imports:`` to its worker processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "APP_MODULES",
    "BUILTIN_APPS",
    "IMPORTS_ENV",
    "RESERVED_NAMES",
    "Experiment",
    "experiments",
    "extra_modules",
    "import_app",
    "register",
    "register_summary",
    "registered",
    "summary_of",
    "unregister",
]

#: Built-in applications: command -> (module that registers it, one-line help).
BUILTIN_APPS: dict[str, tuple[str, str]] = {
    "hopfield": ("rbp.apps.hopfield",
                 "associative memory: continuous Hopfield network on 10 MNIST digits "
                 "(Sec. 5.1)"),
    "citation": ("rbp.apps.citation",
                 "semi-supervised document classification with a recurrent GNN "
                 "(Sec. 5.2, Table 1)"),
    "hyperopt": ("rbp.apps.hyperopt",
                 "learn per-layer learning rates and momenta through SGD "
                 "(paper Sec. 5.3, Fig. 4-6)"),
}
#: Application modules imported (when present) by :func:`experiments` to fill the registry.
APP_MODULES = tuple(module for module, _ in BUILTIN_APPS.values())
#: Environment variable naming more modules (comma-separated) that register experiments.
IMPORTS_ENV = "RBP_IMPORTS"
#: Command names an experiment cannot take.
RESERVED_NAMES = ("list", "sweep", "report")


@dataclass
class Experiment:
    """A runnable experiment.

    ``config_cls`` is a dataclass of settings (defaults read from ``default_config`` or the
    packaged ``rbp/configs/<name>.yaml``). ``run(cfg, ctx)`` does the work and returns the
    results dict. ``add_arguments`` may add app-specific flags (use ``default=None``);
    ``flag_to_key`` maps their argparse dests to config keys. ``methods`` lists the valid
    method names: ``--method`` is checked against it and ``--method all`` expands to it.
    ``check_data(cfg)`` (optional) returns one line per data source for ``--dry-run`` and
    raises :class:`~rbp.data.DataError` when data would not be found.
    """

    name: str
    help: str
    config_cls: type
    run: Callable[[Any, Any], dict[str, Any] | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    flag_to_key: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    default_config: Path | None = None
    check_data: Callable[[Any], list[str]] | None = None


def check_experiment_data(exp: Experiment, cfg: Any) -> list[str]:
    """``exp.check_data`` of the settings each data set is read with: a settings object with
    per-data-set variants (``for_dataset(name)`` and a ``dataset`` list, as ``rbp citation``'s
    ``overrides``) is checked once per data set with that data set's own settings (its own
    ``data_dir``, say). Returns the lines; raises what ``check_data`` raises."""
    if exp.check_data is None:
        return []
    for_dataset, names = getattr(cfg, "for_dataset", None), getattr(cfg, "dataset", None)
    if not (callable(for_dataset) and isinstance(names, list) and dataclasses.is_dataclass(cfg)):
        return list(exp.check_data(cfg))
    lines: list[str] = []
    problems: list[Exception] = []
    for name in names:
        one = dataclasses.replace(for_dataset(str(name).lower()), dataset=[name])
        try:
            lines += exp.check_data(one)
        except (ValueError, FileNotFoundError) as exc:
            problems.append(exc)
    messages = list(dict.fromkeys(str(p) for p in problems))   # one line for a shared cause
    if len(messages) == 1:
        raise problems[0]
    if problems:
        raise ValueError("; ".join(messages))
    return lines


_REGISTRY: dict[str, Experiment] = {}
_SUMMARIES: dict[str, Callable[[dict[str, Any], Path], Any]] = {}


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry (re-registering an equal experiment is a no-op)."""
    if exp.name in RESERVED_NAMES:
        raise ValueError(f"'{exp.name}' is a reserved command name")
    old = _REGISTRY.get(exp.name)
    if old is not None and old != exp:
        raise ValueError(f"an experiment named '{exp.name}' is already registered")
    _REGISTRY[exp.name] = exp
    return exp


def unregister(name: str) -> None:
    """Remove an experiment (and its sweep summary) from the registry (mainly for tests)."""
    _REGISTRY.pop(name, None)
    _SUMMARIES.pop(name, None)


def import_app(module: str) -> None:
    """Import ``module``, which registers experiments; a packaged application whose own
    optional dependency is missing is left out (any other missing module is an error)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if module not in APP_MODULES or exc.name not in (module, module.rpartition(".")[0]):
            raise


def extra_modules() -> list[str]:
    """The modules named in ``$RBP_IMPORTS`` (comma-separated)."""
    return [m.strip() for m in os.environ.get(IMPORTS_ENV, "").split(",") if m.strip()]


def registered() -> dict[str, Experiment]:
    """The experiments registered so far (imports nothing)."""
    return dict(sorted(_REGISTRY.items()))


def experiments() -> dict[str, Experiment]:
    """All registered experiments, after importing the applications and ``$RBP_IMPORTS``."""
    for module in [*APP_MODULES, *extra_modules()]:
        import_app(module)
    return registered()


def register_summary(experiment: str, fn: Callable[[dict[str, Any], Path], Any]) -> None:
    """Have ``rbp sweep`` call ``fn(aggregate(sweep_dir), sweep_dir)`` at the end of a sweep
    of ``experiment`` (e.g. to write ``table1.md`` over all the points)."""
    _SUMMARIES[experiment] = fn


def summary_of(experiment: str) -> Callable[[dict[str, Any], Path], Any] | None:
    """The summary registered for ``experiment``, if any."""
    return _SUMMARIES.get(experiment)
