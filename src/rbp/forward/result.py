"""What the forward hands to :func:`rbp.fixed_point`, and the norms it reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rbp.diagnostics import DivergenceError
from rbp.tree import State

Tensor = torch.Tensor


@dataclass
class Forward:
    """What the forward hands to :func:`rbp.fixed_point`'s backward wiring."""

    h: State  # the returned state h_out (with the graph its method needs)
    h_in: list[Tensor]  # leaves at which the map was last applied (requires_grad if implicit)
    h_out: list[Tensor]  # leaves of h_out = F(h_in)
    spec: Any
    update: Callable[[State, int], State] | None = None  # F_t(h), as run() applied it
    # per row of the settle check: (||h_T - h_T-1||, ||h_T||), see row_differences
    rows: tuple[Any, ...] | None = None
    measured: Measured | None = None  # what the forward measured (every path sets it)
    # the forward solver's inverse-Jacobian estimate per row (Broyden's), for the SHINE backward
    inverse_estimate: Any = None


@dataclass
class Measured:
    """What the forward measured, field for field the forward part of
    :class:`rbp.FixedPointInfo` (which :func:`rbp.fixed_point` builds from it in one place).
    Per-sample fields are lists with ``batch_dim``."""

    solver: str
    forward_steps: int | list[int]  # evaluations of F that produced the returned state
    forward_residual: float | list[float]  # ||F(h_in) - h_in|| at the returned h_in
    final_difference: float  # ||h_out - h_in|| over the whole state
    relative_final_difference: float  # the same divided by ||h_out||
    forward_trace: list[float]  # ||h_t - h_t-1|| per step (trace=True), else empty
    row_updates: int  # sum over iterations of the rows F was evaluated on
    tol_reached: bool | list[bool] | None = None  # None: no forward tol was given
    best_iterate: bool | list[bool] = False  # an earlier, lower-residual iterate was returned
    solver_fallbacks: int = 0  # accelerated steps replaced by a plain step (summed over rows)
    # forward_trace over ||h_t|| (a solver: over ||F(x_k)||), the same steps (trace=True)
    relative_forward_trace: list[float] = field(default_factory=list)


def measured(solver: str, diff: float, scale: float, trace: list[float],
             steps: int | list[int], residual: float | list[float], row_updates: int,
             trace_scales: Sequence[float] = (), **rest: Any) -> Measured:
    """The record from the last difference ``diff``, ``||h_out|| = scale`` and the rest;
    ``trace_scales``: the norm beside each ``trace`` entry (its relative trace)."""
    relative = [d / s if s > 0 else (0.0 if d == 0 else math.inf)
                for d, s in zip(trace, trace_scales, strict=False)]
    return Measured(solver, steps, residual, diff, diff / max(scale, 1e-30), trace, row_updates,
                    relative_forward_trace=relative, **rest)


def state_norm(a: Sequence[Tensor]) -> Tensor:
    """``||a||`` over the leaves, as a float64 CPU tensor (read later with the others)."""
    total = sum(x.detach().double().pow(2).sum() for x in a)
    return torch.as_tensor(total).sqrt().to("cpu", torch.float64)


def _diff_norm(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = sum((x.detach() - y.detach()).pow(2).sum() for x, y in zip(a, b, strict=True))
    return torch.as_tensor(total).sqrt().to("cpu", torch.float64)


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(sum(leaf.detach().double().pow(2).sum().item() for leaf in a))


def divergence(what: str, steps: int, remedy: str = "") -> DivergenceError:
    """The error for a forward state that is not finite after ``steps`` steps."""
    return DivergenceError(
        f"{what}: the forward state is not finite after {steps} steps: the map diverges or a "
        "parameter or input of f holds NaN or inf. Check them, and that f is a contraction "
        f"(e.g. smaller weights or a damped update){remedy}.")


def check_finite(leaves: Sequence[Tensor], method: str, steps: int) -> None:
    if not all(bool(torch.isfinite(leaf.detach()).all()) for leaf in leaves):
        raise divergence("fixed_point", steps)
