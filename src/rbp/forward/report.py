"""The forward's messages: an unreached tolerance and an unsettled state."""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor


def _worst(rows: tuple[Tensor, ...]) -> Tensor:
    d, n = rows[0], rows[1]
    return torch.where(d > 0, d / n, 0.0).amax()  # d / 0 = inf: a zero row that moved


def worst_ratio(rows: tuple[Tensor, ...] | None, whole: float) -> float:
    """The largest per-row ``||h_T - h_T-1|| / ||h_T||`` (0 for a row that did not move; the
    whole-state ratio ``whole`` when there are no rows). One host read, none when the forward
    read it already (a third entry of ``rows``)."""
    if rows is None:
        return whole
    worst = rows[2] if len(rows) > 2 else float(_worst(rows))
    return max(worst, whole)


def unsettled_message(
    rows: tuple[Any, ...] | None,
    info: Any,
    settle_tol: float,
    tol: float | None,
    tol_mode: str,
    batch_dim: int | None,
) -> str | None:
    """The settle check's message (``None``: settled). A row is unsettled when its
    ``||h_T - h_T-1|| / ||h_T|| > settle_tol``, unless the forward's absolute tolerance
    (``tol_mode="absolute"``) holds for it: at a fixed point at or near zero the relative ratio
    says nothing, and the user's absolute tolerance is what "settled" means there."""
    absolute = tol if (tol is not None and tol_mode == "absolute") else None
    if rows is None:
        if absolute is not None and info.final_difference <= absolute:
            return None
        count = ""
        worst = info.relative_final_difference
        if not worst > settle_tol:
            return None
    else:
        d, n = rows[0], rows[1]
        ratio = torch.where(d > 0, d / n, 0.0)
        bad = ~(ratio <= settle_tol)
        if absolute is not None:
            bad = bad & ~(d <= absolute)
        k = int(bad.sum())
        if k == 0:
            return None
        first = int(bad.nonzero()[0, 0])
        worst = float(ratio[bad].amax())
        what = (f"samples (batch_dim={batch_dim})" if batch_dim is not None
                else "rows (dim 0 of the state)")
        count = f" in {k} of {len(ratio)} {what}, e.g. row {first}"
    return (
        f"the forward state has not settled after {steps_taken(info)} steps{count} "
        f"(||h_T - h_T-1|| / ||h_T|| = {worst:.3g} > settle_tol={settle_tol:g}); implicit "
        "gradients assume a fixed point. Run more steps (or set tol), or use "
        "method='bptt'/'tbptt'."
    )


def steps_taken(info: Any) -> int:
    """Evaluations of F the forward spent (the slowest sample's, with ``batch_dim``)."""
    steps = info.forward_steps
    return max(steps) if isinstance(steps, list) else steps


def unreached_message(info: Any, tol: float, tol_mode: str, steps: int) -> str | None:
    """The on_failure message when ``tol`` was not reached (``None`` when it was)."""
    reached = info.tol_reached
    if reached is None:
        return None
    flags = reached if isinstance(reached, list) else [reached]
    missed = [i for i, ok in enumerate(flags) if not ok]
    if not missed:
        return None
    res = info.forward_residual if isinstance(info.forward_residual, list) else [
        info.forward_residual]
    worst = max(res[i] for i in missed)
    where = f" for {len(missed)} of {len(flags)} samples" if isinstance(reached, list) else ""
    hint = "try solver='anderson', " if info.solver == "iterate" else ""
    return (
        f"fixed_point: the forward did not reach tol={tol:g} ({tol_mode}) within steps={steps} "
        f"evaluations{where} (largest residual ||F(h) - h|| = {worst:.3g}, solver "
        f"{info.solver!r}). Raise steps, {hint}or loosen tol; the solver's best_iterate=True "
        "(e.g. rbp.Anderson(tol=..., best_iterate=True)) returns the lowest-residual iterate."
    )
