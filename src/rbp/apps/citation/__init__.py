"""``rbp citation``: semi-supervised document classification with a recurrent GNN (Sec. 5.2)."""

from __future__ import annotations

import argparse

import rbp
from rbp.runner.registry import Experiment, register, register_summary

from .config import MODELS, CitationConfig
from .experiment import check_data, run
from .tables import sweep_summary

__all__ = ["EXPERIMENT", "MODELS", "CitationConfig", "run"]


def _names(text: str) -> list[str]:
    return [p.strip().lower() for p in text.split(",") if p.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") \
            from exc


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=_names, default=None, metavar="NAMES",
                   help="cora, pubmed and/or citeseer, comma-separated (setting 'dataset')")
    p.add_argument("--seeds", type=_ints, default=None, metavar="INTS",
                   help="seeds, e.g. 0,1,2 (setting 'seeds'; default: num_seeds from --seed)")
    p.add_argument("--model", type=_names, default=None, metavar="NAMES",
                   help="paper and/or injected (setting 'models')")
    p.add_argument("--epochs", type=int, default=None, help="paper model epochs ('epochs')")


EXPERIMENT = register(Experiment(
    name="citation",
    help="semi-supervised document classification with a recurrent GNN (Sec. 5.2, Table 1)",
    config_cls=CitationConfig,
    run=run,
    methods=tuple(rbp.METHODS),
    add_arguments=_add_arguments,
    flag_to_key={"dataset": "dataset", "seeds": "seeds", "model": "models",
                 "epochs": "epochs"},
    check_data=check_data,
))

register_summary("citation", sweep_summary)
