"""The solvers as values: options checked at construction, ``solve(matvec, b)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rbp.linear.krylov import conjugate_gradient_normal, gmres
from rbp.linear.protocol import Matvec, Solution, Tensor, _check_int, _check_tol
from rbp.linear.series import fixed_point_iteration, neumann

JVP_MODES: tuple[str, ...] = ("double_vjp", "func")


@dataclass(frozen=True)
class _Options:
    max_iter: int = 20
    tol: float | None = None
    check_every: int = 10

    def __post_init__(self) -> None:
        _check_int("max_iter", self.max_iter)
        _check_tol(self.tol)
        _check_int("check_every", self.check_every)


@dataclass(frozen=True)
class Neumann(_Options):
    """Neumann series ``sum_{t<=K} (J^T)^t g`` (Alg. 2). Assumes rho(J) < 1; O(1) memory."""

    name = "neumann"

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return neumann(
            matvec, b, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every
        )


@dataclass(frozen=True)
class RBP(_Options):
    """Fixed-point iteration ``z <- J^T z + g`` (Alg. 1). Assumes rho(J) < 1; O(1) memory.

    ``init``: ``"zeros"`` (default: the gradient is linear in the loss and zero for a zero
    loss) or ``"uniform"``, the paper's ``z_0 ~ U[0, 1]``.
    """

    init: str = "zeros"
    name = "rbp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init, str):
            raise TypeError(f"init must be 'zeros' or 'uniform', got {self.init!r}")
        if self.init not in ("zeros", "uniform"):
            raise ValueError(f"init must be 'zeros' or 'uniform', got {self.init!r}")

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        z0 = torch.rand_like(b) if self.init == "uniform" else None
        return fixed_point_iteration(
            matvec, b, max_iter=self.max_iter, tol=self.tol, z0=z0, check_every=self.check_every
        )


@dataclass(frozen=True)
class CGNormal(_Options):
    """CG on the normal equations (CG-RBP). Assumes ``I - J`` invertible; needs ``J v``.

    ``jvp``: how ``J v`` is obtained: ``"double_vjp"`` (default: reverse-over-reverse on the graph
    of the last step; tested on its first use, so a step whose backward cannot be differentiated
    again, e.g. an ``autograd.Function`` with ``once_differentiable``, is an error, not zeros) or
    ``"func"`` (forward mode, ``torch.func.jvp``; for a step compiled by ``torch.compile``, whose
    graph cannot be differentiated twice).
    """

    jvp: str = "double_vjp"
    name = "cg"
    needs_jvp = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.jvp, str):
            raise TypeError(f"jvp must be 'double_vjp' or 'func', got {self.jvp!r}")
        if self.jvp not in JVP_MODES:
            raise ValueError(f"jvp must be 'double_vjp' or 'func', got {self.jvp!r}")

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return conjugate_gradient_normal(
            matvec, b, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every
        )


@dataclass(frozen=True)
class GMRES(_Options):
    """GMRES(restart) on ``(I - J^T) z = g``. Assumes ``I - J`` invertible; O(restart) memory."""

    restart: int = 30
    name = "gmres"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("restart", self.restart)

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return gmres(
            matvec,
            b,
            max_iter=self.max_iter,
            tol=self.tol,
            restart=min(self.restart, self.max_iter),
            check_every=self.check_every,
        )


SOLVERS: dict[str, type[_Options]] = {
    "rbp": RBP,
    "neumann": Neumann,
    "cg": CGNormal,
    "gmres": GMRES,
}
