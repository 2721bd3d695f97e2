"""What :func:`rbp.fixed_point` checks and records, and what it does when a check fails.

One value, :class:`Checks`, passed as ``checks=``; its options are checked when it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rbp import linear, methods

ON_FAILURE: tuple[str, ...] = ("raise", "warn", "ignore")
BACKWARD_SOLVERS: tuple[str, ...] = ("rbp", "cg", "neumann", "gmres")


@dataclass(frozen=True, kw_only=True)
class Checks:
    """The checks of a :func:`rbp.fixed_point` call (``checks=rbp.Checks(...)``).

    Args:
        settle_tol: implicit methods assume a steady state; if
            ``||h_T - h_{T-1}|| > settle_tol * ||h_T||`` this is reported per ``on_failure``.
            The ratio is checked per sample: with ``batch_dim``, per sample (all leaves of it
            together); without, per index of dim 0 of every state leaf of two or more dims (a
            batch-first state is checked sample by sample; a 2-D state that is one system is
            checked row by row, each row's norm floored at the rms row norm so that a row near
            zero is not held to its own scale) and over the whole leaf for a leaf of fewer
            dims. With an absolute forward tolerance (``tol_mode="absolute"`` on the solver) a
            row whose ``||h_T - h_{T-1}|| <= tol`` counts as settled (a fixed point at zero has
            no meaningful relative change). The worst ratio is
            ``info.worst_relative_difference``. ``None`` disables the check.
        max_backward_error: report (per ``on_failure``) an implicit solve whose a-posteriori
            estimate of the relative error ``||z_K - z|| / ||z_K||`` of the adjoint exceeds
            this (Neumann / RBP: the series' tail extrapolated from its last increments, Ritz
            values included; CG / GMRES: the true relative residual divided by a Krylov
            estimate of ``sigma_min(I - J^T)``; user solvers: the true relative residual of
            their ``z``, re-measured by the core). What it guarantees and where it can fail:
            ``docs/guarantees.md``. ``None``: check statuses only. JFB and phantom gradients
            are inexact by design and never checked (an unstable fixed point is still
            reported for them).
        on_failure: what to do when the forward has not settled (or not reached its ``tol``)
            or a backward solve grows, stalls or diverges: ``"raise"``
            (:class:`DivergenceError`), ``"warn"`` (:class:`ConvergenceWarning`) or
            ``"ignore"``. A non-finite forward state always raises.
        fallback: a backward solver (name or :mod:`rbp.linear` value) to re-solve with when
            the backward solve fails or exceeds ``max_backward_error`` (e.g. ``"gmres"``; a
            name runs ``truncate`` iterations); the failure is then a warning, unless the
            fallback fails too (then per ``on_failure``). Refused with bptt / tbptt.
        estimate_error: in the backward pass, estimate ``||J||`` by power iteration and store
            the Prop. 2 bound on the relative error of the solve in the info (costs ~20
            Jacobian products per backward). Refused with bptt / tbptt.
        trace: record ``||h_t - h_{t-1}||`` for every step in the info (``forward_trace``; for
            a solver ``||F(x_k) - x_k||`` per iteration) and the same divided by ``||h_t||``
            (``||F(x_k)||``) in ``relative_forward_trace``.

    ``settle_tol`` and ``max_backward_error`` are accepted with bptt / tbptt (one ``Checks``
    can serve a sweep over the methods) and have no effect there.
    """

    settle_tol: float | None = 1e-3
    max_backward_error: float | None = 1e-2
    on_failure: str = "warn"
    fallback: Any = None
    estimate_error: bool = False
    trace: bool = False

    def __post_init__(self) -> None:
        for name in ("settle_tol", "max_backward_error"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be positive (a number) or None, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{name} must be positive and finite, or None (no test), got {value!r}"
                )
        if self.on_failure not in ON_FAILURE or not isinstance(self.on_failure, str):
            error = ValueError if isinstance(self.on_failure, str) else TypeError
            raise error(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, got "
                        f"{self.on_failure!r}")
        for name in ("estimate_error", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        fallback = self.fallback
        if isinstance(fallback, str) and fallback not in BACKWARD_SOLVERS:
            raise ValueError(
                f"fallback must be one of {', '.join(BACKWARD_SOLVERS)} (a backward solver: the "
                f"forward graph is gone by then), got {fallback!r}"
            )
        if isinstance(fallback, methods.Method) and not (
                isinstance(fallback, methods.Implicit) and fallback.accurate):
            raise ValueError(
                "fallback must be a backward solver name (rbp, cg, neumann, gmres) or a solver "
                f"value such as rbp.linear.GMRES(); got {fallback!r}"
            )
        if fallback is not None and not isinstance(fallback, str) and not (
                linear.is_solver(fallback) or isinstance(fallback, methods.Implicit)):
            raise TypeError(
                "fallback must be a backward solver name (rbp, cg, neumann, gmres) or a solver "
                f"value such as rbp.linear.GMRES(), got {type(fallback).__name__}"
            )


DEFAULT = Checks()
