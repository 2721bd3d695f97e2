"""``rbp hyperopt``: hyperparameter optimisation through SGD with momentum (paper §5.3)."""

from __future__ import annotations

import argparse

from rbp.apps.hyperopt.experiment import METHODS, HyperoptConfig, check_data, run
from rbp.apps.hyperopt.figures import sweep_summary
from rbp.runner.registry import Experiment, register, register_summary


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-steps", type=int, default=None,
                   help="inner training steps T (with --truncate: run this one setting "
                        "instead of the grid in 'settings')")
    p.add_argument("--truncate", type=int, default=None,
                   help="truncation K: TBPTT steps / RBP backward iterations")
    p.add_argument("--meta-steps", type=int, default=None, help="meta (Adam) steps")


register(Experiment(
    name="hyperopt",
    help="learn per-layer learning rates and momenta through SGD (paper Sec. 5.3, Fig. 4-6)",
    config_cls=HyperoptConfig,
    run=run,
    methods=METHODS,
    add_arguments=_add_arguments,
    flag_to_key={"train_steps": "train_steps", "truncate": "truncate",
                 "meta_steps": "meta_steps"},
    check_data=check_data,
))
register_summary("hyperopt", sweep_summary)
