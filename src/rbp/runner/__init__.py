"""Shared experiment runner: settings, run lifecycle, checkpoints, results, progress, plots
and the CLI.

Names are imported on first use, so that ``import rbp.runner`` (and ``rbp --help``) loads
neither torch nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

# Eager: the function ``progress`` shares its module's name, and would otherwise be shadowed
# by the submodule once that is imported (tqdm only, no torch).
try:
    from rbp.runner.progress import get_logger as get_logger
    from rbp.runner.progress import progress as progress
    from rbp.runner.progress import setup_logging as setup_logging
except ModuleNotFoundError:  # no experiments extra: the `rbp` command says what to install
    pass

#: Public name -> the runner module that defines it.
_WHERE = {
    "ConfigError": "config",
    "config_to_dict": "config",
    "default_config_path": "config",
    "load_config": "config",
    "build_config": "config",
    "describe_device": "device",
    "resolve_device": "device",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "rng_state": "checkpoint",
    "save_checkpoint": "checkpoint",
    "seed_everything": "checkpoint",
    "set_rng_state": "checkpoint",
    "Experiment": "registry",
    "experiments": "registry",
    "register": "registry",
    "register_summary": "registry",
    "unregister": "registry",
    "RunContext": "lifecycle",
    "RunLockedError": "lock",
    "SettingsMismatchError": "resume",
    "interrupt_on_sigterm": "lifecycle",
    "run_experiment": "lifecycle",
    "RunExistsError": "results",
    "machine_info": "results",
    "prepare_run_dir": "results",
    "read_json": "results",
    "to_jsonable": "results",
    "write_json": "results",
    "image_grid": "plots",
    "line_plot": "plots",
    "method_color": "plots",
    "method_colors": "plots",
    "multi_panel": "plots",
    "note_coinciding": "plots",
    "save_figure": "plots",
    "style_axes": "plots",
}

__all__ = sorted([*_WHERE, "get_logger", "progress", "setup_logging"])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rbp.runner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rbp.runner.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
