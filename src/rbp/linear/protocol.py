"""The solver protocol: :class:`Solution`, the operator the core passes (:class:`AdjointOperator`),
and the checks and helpers every solver shares."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from rbp.diagnostics import Status, check_count

Tensor = torch.Tensor
Matvec = Callable[[Tensor], Tensor]

# An increment this many times larger than ||b|| means the iteration has blown up.
DIVERGENCE_FACTOR = 1e6


# Increments used to estimate the contraction rate of a Neumann / RBP series.
RATE_WINDOW = 5


@dataclass
class Solution:
    """Result of a backward solve.

    ``z`` has ``b``'s shape; ``residuals`` are the solver's own residuals (Neumann / RBP: the
    increment; CG: the normal-equation residual; GMRES: the Givens estimate of the residual),
    as 2-norms over all rows: after every iteration, except that the series solvers without a
    ``tol`` measure only the first increments and the last ``RATE_WINDOW + 1`` (all of them
    when ``max_iter <= 2 RATE_WINDOW + 2``), saving a reduction per product.
    ``sample_errors`` is the a-posteriori
    error estimate of each row (see :class:`~rbp.diagnostics.BackwardInfo`), ``None`` when the
    solver gives none.
    """

    z: Tensor
    iterations: int
    residuals: list[float] = field(default_factory=list)
    status: Status = Status.MAX_ITER
    sample_errors: list[float] | None = None
    terms: int | None = None  # Neumann terms summed (Prop. 2 bound), if a series
    # the true relative residual ||A z - b|| / ||b|| per row, where measured (Krylov, user)
    sample_residuals: list[float] | None = None

    @property
    def ok(self) -> bool:
        return Status(self.status).ok

    @property
    def error_estimate(self) -> float | None:
        return None if self.sample_errors is None else max(self.sample_errors, default=0.0)


@runtime_checkable
class Solver(Protocol):
    """Anything with ``solve(matvec, b) -> Solution`` (see the module docstring)."""

    def solve(self, matvec: Matvec, b: Tensor) -> Any: ...


def is_solver(value: Any) -> bool:
    """Whether ``value`` has a ``solve`` method (cheaper than ``isinstance(value, Solver)``);
    a tensor is not one, though ``torch.Tensor`` still carries a ``solve`` attribute."""
    return not isinstance(value, Tensor) and callable(getattr(value, "solve", None))


class AdjointOperator:
    """``A v = v - J^T v`` on ``(batch, n)`` rows, with ``vjp = J^T`` and ``rmatvec = A^T``."""

    def __init__(self, vjp: Matvec, jvp: Matvec | None = None, estimate: bool = True,
                 inverse_estimate: Any = None, eps: float | None = None) -> None:
        self.vjp = vjp
        self.jvp = jvp
        # unit round-off of the products (a map run in bfloat16, or under autocast, is less
        # precise than the float32 rows it is read in); None: that of the rows
        self.eps = eps
        # the forward's estimate of (dg/dh)^{-1}, g = F(h) - h, per row (Broyden's; SHINE reads it)
        self.inverse_estimate = inverse_estimate
        # False: the caller reads statuses only, so the built-in solvers skip the conditioning
        # and Ritz estimates of their error (their sample_errors are then residuals / the
        # mean-rate tail, as before those estimates existed)
        self.estimate = estimate

    def __call__(self, v: Tensor) -> Tensor:
        return v - self.vjp(v)

    def rmatvec(self, v: Tensor) -> Tensor:
        if self.jvp is None:
            raise ValueError("this operator has no forward products J v (rmatvec)")
        return v - self.jvp(v)


def _wide(t: Tensor) -> torch.dtype:
    """float64 for the small estimates, float32 on MPS (which has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _estimating(matvec: Matvec) -> bool:
    return bool(getattr(matvec, "estimate", True))


def _vjp_of(matvec: Matvec) -> Matvec:
    vjp = getattr(matvec, "vjp", None)
    return vjp if vjp is not None else (lambda v: v - matvec(v))


def _check_int(name: str, value: Any, low: int = 1) -> None:
    check_count(name, value, low)


def _check_tol(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"tol must be a finite number > 0 or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tol must be a finite number > 0 or None, got {value!r}")


def _rows(b: Tensor) -> Tensor:
    if b.dim() != 2:
        raise ValueError(f"b must have shape (batch, n), got {tuple(b.shape)}")
    return b
