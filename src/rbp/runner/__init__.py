"""Shared experiment runner: settings, checkpoints, results, progress, plots and the CLI.

The plotting helpers (``line_plot``, ``multi_panel``, ``image_grid``, ``method_colors``) are
imported on first use so that importing the runner does not load matplotlib.
"""

from __future__ import annotations

from typing import Any

from rbp.runner.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from rbp.runner.cli import Experiment, RunContext, experiments, main, register, unregister
from rbp.runner.config import ConfigError, config_to_dict, default_config_path, load_config
from rbp.runner.progress import get_logger, progress, setup_logging
from rbp.runner.results import (
    RunExistsError,
    machine_info,
    prepare_run_dir,
    read_json,
    to_jsonable,
    write_json,
)

__all__ = [
    "ConfigError",
    "Experiment",
    "RunContext",
    "RunExistsError",
    "config_to_dict",
    "default_config_path",
    "experiments",
    "get_logger",
    "image_grid",
    "line_plot",
    "load_checkpoint",
    "load_config",
    "machine_info",
    "main",
    "method_colors",
    "multi_panel",
    "prepare_run_dir",
    "progress",
    "read_json",
    "register",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_logging",
    "to_jsonable",
    "unregister",
    "write_json",
]

_PLOTS = {"image_grid", "line_plot", "method_colors", "multi_panel"}


def __getattr__(name: str) -> Any:
    if name in _PLOTS:
        from rbp.runner import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'rbp.runner' has no attribute {name!r}")
