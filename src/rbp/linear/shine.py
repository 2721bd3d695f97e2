"""SHINE: the backward reuses the inverse Jacobian that Broyden estimated in the forward.

Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward pass for bi-level
optimization and implicit models" (ICLR 2022). A Broyden forward (:class:`rbp.Broyden`) builds,
per sample, ``H = -I + U^T V ~ (dg/dh)^{-1}`` for ``g(h) = F(h) - h``, i.e. ``H ~ -(I - J)^{-1}``;
the adjoint ``z = (I - J^T)^{-1} g`` is then ``z ~ -H^T g``, at ``O(n k)`` and no Jacobian product
(``k``: the rank of the estimate). :class:`SHINE` uses that estimate

* alone (``refine=0``): inexact, and honest about it: its error estimate is the true relative
  residual ``||(I - J^T) z - g|| / ||g||`` (one product), so ``max_backward_error`` flags a
  poor estimate;
* as GMRES's initial guess (``use="init"``, ``refine=K``: K GMRES iterations on the rest,
  one more product for the initial residual);
* or as GMRES's right preconditioner (``use="precondition"``): GMRES on ``(I - J^T) M y = g``
  with ``M = -H^T`` and ``z = M y``, whose Krylov space holds ``-H^T g`` after one product.

The estimate reaches the solver on the operator: ``matvec.inverse_estimate`` (an
:class:`rbp.forward.broyden.InverseEstimate`, set by :func:`rbp.fixed_point` when the method or
the fallback is SHINE). Without one (another forward solver) it is refused: at validation by
:func:`check_forward`, and by :meth:`SHINE.solve` if reached anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rbp.diagnostics import Status
from rbp.linear.krylov import _true_errors, gmres
from rbp.linear.protocol import Matvec, Solution, Tensor, _check_int, _check_tol

USES = ("init", "precondition")


@dataclass(frozen=True)
class SHINE:
    """The adjoint from the forward's inverse-Jacobian estimate (needs ``solver=rbp.Broyden``).

    ``refine``: GMRES iterations after the estimate (0: ``z = -H^T g`` alone, one product for its
    true residual). ``use``: how GMRES uses it, ``"precondition"`` (right preconditioner, the
    default) or ``"init"`` (initial guess). ``tol``, ``restart``, ``check_every``: GMRES's
    (refused with ``refine=0``, which has nothing to stop or restart).
    """

    refine: int = 0
    use: str = "precondition"
    tol: float | None = None
    restart: int = 30
    check_every: int = 10
    name = "shine"

    def __post_init__(self) -> None:
        _check_int("SHINE(refine=...)", self.refine, low=0)
        if not isinstance(self.use, str):
            raise TypeError(f"SHINE(use=...) must be one of {USES}, got {self.use!r}")
        if self.use not in USES:
            raise ValueError(f"SHINE(use=...) must be one of {USES}, got {self.use!r}")
        _check_tol(self.tol)
        _check_int("SHINE(restart=...)", self.restart)
        _check_int("SHINE(check_every=...)", self.check_every)
        if self.refine == 0:
            for option, value, default in (("tol", self.tol, None), ("use", self.use,
                                           "precondition"), ("restart", self.restart, 30),
                                           ("check_every", self.check_every, 10)):
                if value != default:
                    raise ValueError(
                        f"SHINE({option}={value!r}) would be ignored: it configures the GMRES "
                        "refinement, which runs with refine >= 1 only"
                    )

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        estimate = getattr(matvec, "inverse_estimate", None)
        if estimate is None:
            raise ValueError(
                "SHINE needs the inverse-Jacobian estimate of a Broyden forward "
                "(fixed_point(..., solver=rbp.Broyden(), method=rbp.Implicit(rbp.linear."
                "SHINE(...)))); this operator carries none"
            )
        if estimate.rows != b.shape[0]:
            raise ValueError(
                f"SHINE: the forward's estimate has {estimate.rows} rows, the adjoint "
                f"{b.shape[0]}: the forward and the backward must share batch_dim"
            )
        bnorm = b.norm(dim=1)
        if self.refine == 0:
            return _alone(matvec, b, bnorm, -estimate.transpose_apply(b))
        if self.use == "init":
            return gmres(matvec, b, max_iter=self.refine, tol=self.tol,
                         restart=min(self.restart, self.refine), check_every=self.check_every,
                         z0=-estimate.transpose_apply(b))
        return gmres(matvec, b, max_iter=self.refine, tol=self.tol,
                     restart=min(self.restart, self.refine), check_every=self.check_every,
                     precondition=lambda v: -estimate.transpose_apply(v))


def _alone(matvec: Matvec, b: Tensor, bnorm: Tensor, z: Tensor) -> Solution:
    """``z = -H^T g`` as it is; its error estimate is its true relative residual (one product)."""
    errors_t = _true_errors(matvec, z, b, bnorm)
    residual = (errors_t * bnorm).norm()
    errors = errors_t.double().cpu().tolist()
    finite = all(math.isfinite(e) for e in errors)
    status = Status.DIVERGED if not finite else (
        Status.CONVERGED if max(errors, default=0.0) <= 1e3 * torch.finfo(b.dtype).eps
        else Status.MAX_ITER)
    return Solution(z, 0, [float(residual)], status, errors, sample_residuals=list(errors))


def uses_estimate(method: Any, fallback: Any) -> bool:
    """Whether the backward (the method's solver or the fallback) is SHINE."""
    return isinstance(getattr(method, "solver", None), SHINE) or isinstance(fallback, SHINE)


def check_forward(method: Any, fallback: Any, solver: Any) -> None:
    """Refuse SHINE after a forward solver that gives no inverse estimate (anything but
    :class:`rbp.Broyden`, or a solver value with ``gives_inverse_estimate = True``)."""
    if uses_estimate(method, fallback) and not getattr(solver, "gives_inverse_estimate", False):
        name = str(getattr(solver, "name", type(solver).__name__))
        raise ValueError(
            f"the SHINE backward (rbp.linear.SHINE) reuses the inverse-Jacobian estimate of a "
            f"Broyden forward, and the forward solver {name!r} builds none; pass "
            "solver=rbp.Broyden(...) (with tol=... as usual), or use another backward solver "
            "(e.g. rbp.linear.GMRES())"
        )
