"""The lines a citation run ends with: each method's accuracy before and after training."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["accuracy_lines"]


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(vals)) * 100.0 if vals else None


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} %"


def accuracy_lines(results: Mapping[str, Any]) -> Iterator[str]:
    """One line per (dataset, model, method): validation and test accuracy of the untrained
    model (the epoch-0 evaluation) and at the reported epoch (the first best validation
    epoch), means over the seeds; one line per baseline (test accuracy)."""
    for name, entry in (results.get("datasets") or {}).items():
        for model, methods in (entry.get("models") or {}).items():
            for method, summary in methods.items():
                units = summary.get("per_seed") or []
                curves = [u.get("curves") or {} for u in units]
                val0 = _mean([c["val_acc"][0] for c in curves if c.get("val_acc")])
                test0 = _mean([c["test_acc"][0] for c in curves if c.get("test_acc")])
                val = _mean([u.get("best_val_acc") for u in units])
                test = _mean([u.get("test_acc") for u in units])
                yield (f"{name} {model}/{method}: val acc {_pct(val0)} untrained -> "
                       f"{_pct(val)}, test acc {_pct(test0)} -> {_pct(test)} (at the best "
                       f"validation epoch; {len(units)} seed(s))")
        for base, summary in (entry.get("baselines") or {}).items():
            units = summary.get("per_seed") or []
            yield (f"{name} baseline {base}: test acc "
                   f"{_pct(_mean([u.get('test_acc') for u in units]))} ({len(units)} seed(s))")
