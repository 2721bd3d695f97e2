"""``rbp hopfield``: associative memory with a continuous Hopfield network (Sec. 5.1)."""

from __future__ import annotations

import argparse

import rbp
from rbp.runner.registry import Experiment, register, register_summary

from .experiment import HopfieldConfig, check_data, run
from .figures import sweep_summary

__all__ = ["EXPERIMENT", "HopfieldConfig", "run"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truncate", type=int, default=None, help="K (setting 'truncate')")
    p.add_argument("--epochs", type=int, default=None, help="epochs (setting 'epochs')")


EXPERIMENT = register(Experiment(
    name="hopfield",
    help="associative memory: continuous Hopfield network on 10 MNIST digits (Sec. 5.1)",
    config_cls=HopfieldConfig,
    run=run,
    methods=tuple(rbp.METHODS),
    add_arguments=_add_arguments,
    flag_to_key={"truncate": "truncate", "epochs": "epochs"},
    check_data=check_data,
))

register_summary("hopfield", sweep_summary)
