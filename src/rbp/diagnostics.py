"""What a run reports about itself: forward traces, backward solves, Jacobian norms, Prop. 2.

Nothing here changes a gradient; these are the numbers that tell whether one can be trusted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class DivergenceError(ArithmeticError):
    """The forward recurrence or a backward solve produced non-finite or exploding values."""


class ConvergenceWarning(RuntimeWarning):
    """A forward trace that has not settled, or a backward solve that grows or stalls."""


@dataclass
class BackwardInfo:
    """One backward call of an implicit method."""

    method: str
    iterations: int
    residuals: list[float]
    status: str
    fell_back_to: str | None = None
    jacobian_norm: float | None = None
    error_bound: float | None = None  # Prop. 2 estimate of ||z_K - z|| / ||g||


@dataclass
class FixedPointInfo:
    """Diagnostics of one :func:`rbp.fixed_point` call.

    ``forward_trace[t-1] = ||h_t - h_{t-1}||`` over all state leaves (filled when ``trace=True``);
    ``final_difference`` is the last entry, always computed. ``backward`` gains one entry per
    backward pass through the implicit methods.
    """

    method: str
    steps: int
    truncate: int
    forward_trace: list[float] = field(default_factory=list)
    final_difference: float = math.nan
    relative_final_difference: float = math.nan
    backward: list[BackwardInfo] = field(default_factory=list)


def power_iteration_norm(
    vjp: Matvec, jvp: Matvec, like: torch.Tensor, iters: int = 10, seed: int = 0
) -> float:
    """Estimate ``||J||_2`` by power iteration on ``J J^T`` (from below, converging up)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        w = jvp(vjp(v))
        norm = w.norm().item()
        if norm == 0.0 or not math.isfinite(norm):
            return 0.0 if norm == 0.0 else math.inf
        sigma = math.sqrt(norm)
        v = w / norm
    return sigma


def spectral_radius_estimate(
    vjp: Matvec, like: torch.Tensor, iters: int = 50, seed: int = 0
) -> float:
    """Estimate the spectral radius of J from ``||(J^T)^k v||^(1/k)`` (Gelfand's formula)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    v = v / v.norm()
    log_growth = 0.0
    for _ in range(iters):
        v = vjp(v)
        norm = v.norm().item()
        if norm == 0.0:
            return 0.0
        if not math.isfinite(norm):
            return math.inf
        log_growth += math.log(norm)
        v = v / norm
    return math.exp(log_growth / iters)


def neumann_error_bound(jacobian_norm: float, inverse_norm: float, terms: int) -> float:
    """Prop. 2: ``||sum_{t<=K} J^t - (I-J)^{-1}|| <= ||(I-J)^{-1}|| ||J||^{K+1}`` (K = terms-1)."""
    return inverse_norm * jacobian_norm**terms


def neumann_relative_error_estimate(jacobian_norm: float, terms: int) -> float:
    """Bound on ``||z_K - z|| / ||g||`` for a K-step Neumann solve, K = ``terms - 1``.

    Uses Prop. 2 with ``||(I-J)^{-1}|| <= 1 / (1 - ||J||)``; infinite when ``||J|| >= 1``
    (the bound then says nothing, even though the series may still converge).
    """
    if jacobian_norm >= 1.0:
        return math.inf
    return jacobian_norm**terms / (1.0 - jacobian_norm)
