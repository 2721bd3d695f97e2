"""Backward solvers for the adjoint system ``(I - J^T) z = g``.

Every solver shares one signature, ``solve(vjp, g, *, max_iter, tol, ...) -> Solution``, where
``vjp(v) = J^T v`` on flat vectors (``jvp(v) = J v`` where a solver needs it). ``tol`` is
relative: a solver stops once its increment or residual is at most ``tol * ||g||``; ``None``
runs exactly ``max_iter`` iterations, as the paper's truncated algorithms do.

A solver never raises on a bad system: it reports ``status`` (see :class:`Solution`) and the
caller decides what to do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

# An increment this many times larger than ||g|| means the iteration has blown up.
DIVERGENCE_FACTOR = 1e6


@dataclass
class Solution:
    """Result of a backward solve.

    ``status`` is one of: ``"converged"`` (tolerance met), ``"max_iter"`` (budget used while the
    increments shrank: the normal outcome of a truncated method), ``"growing"`` (the last
    increment is not smaller than the first: the iteration is not contracting),
    ``"stalled"`` (a Krylov residual stopped decreasing) or ``"diverged"`` (non-finite or larger
    than ``DIVERGENCE_FACTOR * ||g||``).
    """

    z: torch.Tensor
    iterations: int
    residuals: list[float] = field(default_factory=list)
    status: str = "max_iter"

    @property
    def ok(self) -> bool:
        return self.status in ("converged", "max_iter")


def _check_budget(max_iter: int) -> None:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")


def _status(residuals: list[float], gnorm: float, tol: float | None) -> str:
    """Classify a finished iteration from its increments / residuals."""
    if not residuals:
        return "converged"
    last = residuals[-1]
    if not math.isfinite(last) or last > DIVERGENCE_FACTOR * max(gnorm, 1e-30):
        return "diverged"
    if tol is not None and last <= tol * gnorm:
        return "converged"
    if len(residuals) > 1 and last >= residuals[0]:
        return "growing"
    return "max_iter"


def _blown_up(value: float, gnorm: float) -> bool:
    return not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(gnorm, 1e-30)


def neumann(vjp: Matvec, g: torch.Tensor, *, max_iter: int, tol: float | None = None) -> Solution:
    """Neumann-RBP (Alg. 2): ``z = sum_{t=0}^{K} (J^T)^t g`` with K = ``max_iter``.

    Converges iff the spectral radius of J is below one. The residual reported at step t is
    ``||(J^T)^t g||``, the increment added to the sum.
    """
    _check_budget(max_iter)
    gnorm = g.norm().item()
    v, z = g, g.clone()
    residuals: list[float] = []
    for t in range(1, max_iter + 1):
        v = vjp(v)
        z.add_(v)
        residuals.append(v.norm().item())
        if _blown_up(residuals[-1], gnorm) or (tol is not None and residuals[-1] <= tol * gnorm):
            return Solution(z, t, residuals, _status(residuals, gnorm, tol))
    return Solution(z, max_iter, residuals, _status(residuals, gnorm, tol))


def fixed_point_iteration(
    vjp: Matvec,
    g: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    z0: torch.Tensor | None = None,
) -> Solution:
    """Original RBP (Alg. 1): iterate ``z_i = J^T z_{i-1} + g`` from ``z0`` (zeros if None).

    Same convergence condition as Neumann; with ``z0 = 0`` it equals Neumann with one term
    fewer. The residual is the increment ``||z_i - z_{i-1}||``.
    """
    _check_budget(max_iter)
    gnorm = g.norm().item()
    z = torch.zeros_like(g) if z0 is None else z0.to(g)
    residuals: list[float] = []
    for i in range(1, max_iter + 1):
        z_next = vjp(z) + g
        residuals.append((z_next - z).norm().item())
        z = z_next
        if _blown_up(residuals[-1], gnorm) or (tol is not None and residuals[-1] <= tol * gnorm):
            return Solution(z, i, residuals, _status(residuals, gnorm, tol))
    return Solution(z, max_iter, residuals, _status(residuals, gnorm, tol))


def conjugate_gradient_normal(
    vjp: Matvec, g: torch.Tensor, *, jvp: Matvec, max_iter: int, tol: float | None = None
) -> Solution:
    """CG-RBP: conjugate gradient on ``(I - J)(I - J^T) z = (I - J) g`` from ``z = 0``.

    The normal equations are symmetric positive definite whenever ``I - J`` is invertible, so
    CG applies to any such J, but their condition number is the square of the original one.
    Each iteration costs one ``vjp`` and one ``jvp``. The residual is the normal-equation one.
    """
    _check_budget(max_iter)

    def normal_matvec(p: torch.Tensor) -> torch.Tensor:
        q = p - vjp(p)
        return q - jvp(q)

    gnorm = g.norm().item()
    b = g - jvp(g)
    z = torch.zeros_like(g)
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    residuals: list[float] = []
    best = math.inf
    for i in range(1, max_iter + 1):
        if rr.item() <= (torch.finfo(g.dtype).eps * gnorm) ** 2:  # solved to round-off
            return Solution(z, i - 1, residuals, "converged")
        ap = normal_matvec(p)
        p_ap = torch.dot(p, ap)
        if p_ap.item() <= 0.0:  # the operator lost positive-definiteness: I - J is singular
            return Solution(z, i - 1, residuals, "stalled" if residuals else "diverged")
        alpha = rr / p_ap
        z.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_next = torch.dot(r, r)
        residuals.append(rr_next.sqrt().item())
        if _blown_up(residuals[-1], gnorm) or (tol is not None and residuals[-1] <= tol * gnorm):
            return Solution(z, i, residuals, _status(residuals, gnorm, tol))
        best = min(best, residuals[-1])
        p = r + (rr_next / rr) * p
        rr = rr_next
    status = _status(residuals, gnorm, tol)
    if status == "max_iter" and len(residuals) >= 10 and residuals[-1] > 0.999 * residuals[-10]:
        status = "stalled"
    return Solution(z, max_iter, residuals, status)


def gmres(
    vjp: Matvec,
    g: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    restart: int = 30,
) -> Solution:
    """GMRES(restart) on the non-symmetric system ``(I - J^T) z = g`` from ``z = 0``.

    Minimises the true residual ``||g - (I - J^T) z||`` over a Krylov space at each step, so it
    needs no symmetry and does not square the condition number; works whenever ``I - J`` is
    invertible, including ``rho(J) >= 1`` where the Neumann series diverges. One ``vjp`` per
    iteration; memory grows with ``restart`` (that many vectors are kept).
    """
    _check_budget(max_iter)
    if restart < 1:
        raise ValueError(f"restart must be >= 1, got {restart}")

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return v - vjp(v)

    gnorm = g.norm().item()
    z = torch.zeros_like(g)
    residuals: list[float] = []
    done = 0
    exact = False
    while done < max_iter:
        r = g - matvec(z) if done else g.clone()
        beta = r.norm().item()
        if beta == 0.0 or (tol is not None and beta <= tol * gnorm):
            break
        m = min(restart, max_iter - done)
        basis = torch.empty(m + 1, g.numel(), dtype=g.dtype, device=g.device)
        basis[0] = r / beta
        hess = torch.zeros(m + 1, m, dtype=torch.float64)
        rhs = torch.zeros(m + 1, dtype=torch.float64)
        rhs[0] = beta
        y = torch.zeros(0, dtype=torch.float64)
        for j in range(m):
            w = matvec(basis[j])
            done += 1
            # classical Gram-Schmidt twice: as stable as modified GS, in 4 matrix-vector products
            v = basis[: j + 1]
            h = v @ w
            w = w - h @ v
            h2 = v @ w
            w = w - h2 @ v
            hess[: j + 1, j] = (h + h2).to(device="cpu", dtype=torch.float64)
            h_next = w.norm().item()
            hess[j + 1, j] = h_next
            y = torch.linalg.lstsq(hess[: j + 2, : j + 1], rhs[: j + 2, None]).solution[:, 0]
            residuals.append((rhs[: j + 2] - hess[: j + 2, : j + 1] @ y).norm().item())
            converged = tol is not None and residuals[-1] <= tol * gnorm
            if converged or h_next <= 1e-14 * beta or not math.isfinite(residuals[-1]):
                break
            basis[j + 1] = w / h_next
        z = z + y.to(g) @ basis[: len(y)]
        if not math.isfinite(residuals[-1]) or (tol is not None and residuals[-1] <= tol * gnorm):
            break
        if hess[len(y), len(y) - 1].item() <= 1e-14 * beta:  # happy breakdown: exact solution
            exact = True
            break
    status = "converged" if exact else _status(residuals, gnorm, tol)
    if status == "growing":  # GMRES residuals never grow; equal means no progress
        status = "stalled"
    return Solution(z, done, residuals, status)


SOLVERS: dict[str, Callable[..., Solution]] = {
    "rbp": fixed_point_iteration,
    "neumann": neumann,
    "cg": conjugate_gradient_normal,
    "gmres": gmres,
}
