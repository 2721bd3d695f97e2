"""What a run reports about itself: forward traces, backward solves, Jacobian norms, Prop. 2.

Nothing here changes a gradient; these are the numbers that tell whether one can be trusted.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class DivergenceError(ArithmeticError):
    """The forward recurrence or a backward solve produced non-finite or exploding values."""


class ConvergenceWarning(RuntimeWarning):
    """A forward trace that has not settled, or a backward solve that grows or stalls."""


# Frames in these files are rbp's core or torch's autograd machinery, not the user's call.
_CORE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@functools.lru_cache(maxsize=256)
def _internal(filename: str) -> bool:
    return os.path.dirname(filename) == _CORE_DIR or filename.startswith(_TORCH_DIR)


def report(on_failure: str, message: str) -> None:
    """Raise :class:`DivergenceError`, warn :class:`ConvergenceWarning`, or do nothing.

    The warning is attributed to the first frame outside rbp's core and torch: the user's
    ``fixed_point(...)`` call, or the ``loss.backward()`` that ran the adjoint.
    """
    if on_failure == "raise":
        raise DivergenceError(message)
    if on_failure == "warn":
        frame, level = sys._getframe(0), 1
        while frame.f_back is not None and _internal(frame.f_code.co_filename):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, ConvergenceWarning, stacklevel=level)



def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """The one integer check of the core's options: TypeError unless an ``int`` (a bool is not),
    ValueError below ``minimum``; the message names the option."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_real(name: str, value: Any) -> float:
    """The one real-number check: TypeError unless an ``int``/``float`` (not a bool),
    ValueError unless finite; the message names the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


class Status(StrEnum):
    """Outcome of a backward solve; the value is the name recorded in :class:`BackwardInfo`."""

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    GROWING = "growing"
    STALLED = "stalled"
    BREAKDOWN = "breakdown"
    DIVERGED = "diverged"

    @property
    def ok(self) -> bool:
        """Whether the solve ended normally (its error estimate may still be too large)."""
        return self in (Status.CONVERGED, Status.MAX_ITER)

    @property
    def message(self) -> str:
        return _STATUS_MESSAGES[self]


_STATUS_MESSAGES = {
    Status.CONVERGED: "the tolerance was met (or the solve is exact)",
    Status.MAX_ITER: "the iteration budget was used while the increments shrank",
    Status.GROWING: "the last increment is not smaller than the first: the iteration does not "
    "contract (spectral radius of J >= 1?)",
    Status.STALLED: "the Krylov residual stopped decreasing",
    Status.BREAKDOWN: "the Krylov space stopped growing before reaching a solution: I - J^T is "
    "singular and g is not in its range",
    Status.DIVERGED: "the iterates became non-finite or exploded",
}


@dataclass
class BackwardInfo:
    """One backward call of an implicit method.

    ``error_estimate`` is the a-posteriori estimate of the relative error ``||z_K - z|| /
    ||z_K||`` of the adjoint (max over samples); see ``docs/guarantees.md``. Neumann / RBP: the
    tail of the series extrapolated from its last increments (the larger of a mean-rate
    geometric tail and a Ritz extrapolation that sees a slow mode hidden under faster ones);
    CG / GMRES: the true relative residual times ``||g|| / (sigma ||z_K||)``, with ``sigma``
    the smallest of the Krylov estimates of ``sigma_min(I - J^T)`` (Ritz values of the
    Lanczos / Hessenberg matrix and ``||A r|| / ||r||`` along the final residual), so at least
    the residual; user solvers: the true relative residual (no conditioning estimate).
    ``None`` for JFB / phantom gradients, which are inexact by design. ``sample_errors`` holds
    it per sample when ``batch_dim`` is set.
    """

    method: str
    iterations: int
    residuals: list[float]
    status: str
    fell_back_to: str | None = None
    jacobian_norm: float | None = None
    error_bound: float | None = None  # Prop. 2 estimate of ||z_K - z|| / ||g||
    error_estimate: float | None = None
    sample_errors: list[float] | None = None
    dtype: str = ""  # dtype the adjoint was solved in
    # the true relative residual ||(I - J^T) z - g|| / ||g|| of the returned z (max over
    # samples), measured by the core for Krylov and user solvers; None for the series
    relative_residual: float | None = None
    # JFB / phantom: (||(J^T)^k g|| / ||g||)^(1/k), k = 4; >= 1 is reported (unstable point)
    stability_rate: float | None = None


@dataclass
class FixedPointInfo:
    """Diagnostics of one :func:`rbp.fixed_point` call.

    ``forward_trace[t-1] = ||h_t - h_{t-1}||`` over all state leaves (filled with
    ``rbp.Checks(trace=True)``); ``final_difference`` is the last entry, always computed.
    ``backward`` gains one entry per backward pass through the implicit methods.
    """

    method: str
    steps: int
    truncate: int
    forward_trace: list[float] = field(default_factory=list)
    # forward_trace[i] / ||h_t|| (a solver: / ||F(x_k)||), the same steps (trace=True)
    relative_forward_trace: list[float] = field(default_factory=list)
    final_difference: float = math.nan
    relative_final_difference: float = math.nan
    # the settle check's worst ||h_T - h_T-1|| / ||h_T|| over samples (batch_dim) or rows of
    # dim 0 (a state of two or more dims); the whole-state ratio otherwise. Implicit methods only.
    worst_relative_difference: float = math.nan
    backward: list[BackwardInfo] = field(default_factory=list)
    # Forward solve (see rbp.forward). Per-sample fields are lists when batch_dim is set.
    solver: str = "iterate"
    forward_steps: int | list[int] = 0  # evaluations of F that produced the returned state
    forward_residual: float | list[float] = math.nan  # ||F(h_in) - h_in|| at the returned h_in
    tol_reached: bool | list[bool] | None = None  # None: no forward tol was given
    best_iterate: bool | list[bool] = False  # an earlier, lower-residual iterate was returned
    solver_fallbacks: int = 0  # accelerated steps replaced by a plain step (summed over rows)
    row_updates: int = 0  # sum over iterations of the rows F was evaluated on


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


def spectral_radius_power(
    vjp: Matvec, like: torch.Tensor, iters: int = 50, seed: int = 0, rel_tol: float = 5e-3
) -> tuple[float, bool]:
    """Power-iteration estimate of the spectral radius of J, and whether it has converged.

    The estimate is Gelfand's ``(||(J^T)^k v|| / ||v||)^(1/k)`` over the **last half** of the
    ``iters`` products (the first half lets the dominant modes take over from the random start;
    a mean over all products is biased low by that transient). Converged: the same estimate
    over each quarter of the last half, and over the quarter before it, agree within
    ``rel_tol`` (a slowly separating spectrum, or too few products, fails this; on Gaussian
    matrices scaled to rho = 1.05, no estimate more than 2 % off passed it).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    v = v / v.norm()
    logs: list[float] = []
    for _ in range(iters):
        v = vjp(v)
        norm = v.norm().item()
        if norm == 0.0:
            return 0.0, True
        if math.isnan(norm):  # J^T v is NaN: nothing is known
            return math.nan, False
        if not math.isfinite(norm):
            return math.inf, True
        logs.append(math.log(norm))
        v = v / norm

    def mean_rate(part: list[float]) -> float:
        return math.exp(sum(part) / len(part))

    half = iters // 2
    rho = mean_rate(logs[half:])
    mid = half + (iters - half) // 2
    parts = [logs[iters // 4 : half], logs[half:mid], logs[mid:]]
    if any(not part for part in parts):
        return rho, False
    rates = [mean_rate(part) for part in parts]
    return rho, max(rates) - min(rates) <= rel_tol * rho


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
