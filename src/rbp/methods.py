"""How :func:`rbp.fixed_point` differentiates, as values.

Two families. *Unrolled*: back-propagate through the forward steps themselves
(:class:`BPTT`, :class:`TBPTT`). *Implicit*: keep a graph of one application of F at the last
state ``h_T ~ h*`` and return ``z^T dF/dw``; :class:`Implicit` gets ``z`` from a linear solver of
``(I - J^T) z = g`` (:mod:`rbp.linear`, or any value with ``solve(matvec, b)``), while
:class:`JFB` and :class:`Phantom` use a fixed cheap ``z`` and are inexact by design.

The string names remain shortcuts: ``"neumann"`` is ``Implicit(Neumann(max_iter=truncate))``
and so on (:func:`resolve`); :func:`from_name` builds the same value with options of its
backward solver (``from_name("rbp", 10, init="uniform")``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from rbp import linear
from rbp.diagnostics import Status

Tensor = torch.Tensor


class Method:
    """Base of the method values."""

    name: str = "method"
    implicit: bool = False
    keeps_h0: bool = False  # back-propagates through every update into h0 (bptt)

    def graph_steps(self, steps: int) -> int:
        """How many of the ``steps`` forward updates keep an autograd graph."""
        return 1


@dataclass(frozen=True)
class BPTT(Method):
    """Back-propagation through all forward steps: exact for the unroll, O(T) memory."""

    name = "bptt"
    keeps_h0 = True

    def graph_steps(self, steps: int) -> int:
        return steps


@dataclass(frozen=True)
class TBPTT(Method):
    """Back-propagation through the last ``k`` forward steps: O(k) memory."""

    k: int
    name = "tbptt"

    def __post_init__(self) -> None:
        linear._check_int("TBPTT k", self.k)

    def graph_steps(self, steps: int) -> int:
        if self.k > steps:
            raise ValueError(
                f"tbptt cannot back-propagate through truncate={self.k} steps of a {steps}-step "
                "run; use truncate <= steps (truncate == steps is bptt)"
            )
        return self.k


@dataclass(frozen=True)
class Implicit(Method):
    """``z^T dF/dw`` with ``z`` from ``solver`` on ``(I - J^T) z = g`` at ``h_T``; O(1) memory.

    ``solver``: a :mod:`rbp.linear` value (``Neumann``, ``RBP``, ``CGNormal``, ``GMRES``) or any
    object with ``solve(matvec, b)`` / callable ``solver(matvec, b)`` (protocol in
    :mod:`rbp.linear`). ``second_order=True``: ``backward(create_graph=True)`` then gives the
    derivatives of this gradient (gradient penalties, hypergradients of hypergradients), the
    solve differentiated implicitly by one more solve of ``(I - J) u = v``, at O(1) memory
    (:mod:`rbp.higher_order`); the forward records which tensors ``f`` reads.
    """

    solver: Any
    second_order: bool = False
    implicit = True
    accurate = True  # its error estimate is checked against max_backward_error

    def __post_init__(self) -> None:
        if not (linear.is_solver(self.solver) or callable(self.solver)):
            hint = (f" {self.solver!r}: a name is fixed_point's method=, not a solver; pass a "
                    "value such as rbp.linear.GMRES(max_iter=20)"
                    if isinstance(self.solver, str) else "")
            raise TypeError(
                "Implicit(solver): solver must have a solve(matvec, b) method or be callable "
                f"as solver(matvec, b), got {type(self.solver).__name__}{hint}"
            )
        if not isinstance(self.second_order, bool):
            raise TypeError(f"second_order must be True or False, got {self.second_order!r}")
        if self.second_order and getattr(self.solver, "name", None) == "shine":
            raise ValueError(
                "second_order=True with rbp.linear.SHINE: the second-order solve, (I - J) u = "
                "v, has no forward estimate to reuse; use GMRES, CGNormal, Neumann or RBP"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return str(getattr(self.solver, "name", type(self.solver).__name__))

    @property
    def needs_jvp(self) -> bool:
        return bool(getattr(self.solver, "needs_jvp", False))


@dataclass(frozen=True)
class _Identity:
    name = "jfb"

    def solve(self, matvec: linear.Matvec, b: Tensor) -> linear.Solution:
        return linear.Solution(b, 0, [], Status.CONVERGED)


@dataclass(frozen=True)
class _Damped:
    k: int
    damping: float
    name = "phantom"

    def solve(self, matvec: linear.Matvec, b: Tensor) -> linear.Solution:
        vjp = linear._vjp_of(matvec)
        lam = self.damping
        u, z = b, b.clone()
        for _ in range(self.k - 1):
            u = lam * vjp(u) + (1 - lam) * u
            z.add_(u)
        return linear.Solution(lam * z, self.k - 1, [], Status.MAX_ITER)


class JFB(Implicit):
    """Jacobian-free backprop (Fung et al., 2022): ``z = g``, i.e. the gradient ``g^T dF/dw``.

    No Jacobian product at all; inexact (it drops ``(I - J^T)^{-1}``; a descent direction when F
    is contractive enough). Memory: one step's graph, like the implicit methods.
    """

    accurate = False

    def __init__(self) -> None:
        super().__init__(_Identity())

    def __repr__(self) -> str:
        return "JFB()"


class Phantom(Implicit):
    """Phantom gradient (Geng et al., 2021) of ``k`` damped steps ``h <- lam F(h) + (1-lam) h``.

    At a fixed point, back-propagating through those ``k`` steps gives
    ``z = lam sum_{i<k} (lam J^T + (1 - lam) I)^i g`` (``k - 1`` Jacobian products), which is what
    this computes on the graph of the one step at ``h_T``: memory O(1), not O(k). Inexact by
    design (a truncated, damped series); ``damping=1`` gives TBPTT(k).
    """

    accurate = False

    def __init__(self, k: int, damping: float = 0.5) -> None:
        linear._check_int("Phantom k", k)
        ok = isinstance(damping, (int, float)) and not isinstance(damping, bool)
        if not ok or not math.isfinite(damping) or not 0 < damping <= 1:
            raise ValueError(f"Phantom damping must be a number in (0, 1], got {damping!r}")
        super().__init__(_Damped(k, float(damping)))

    def __repr__(self) -> str:
        return f"Phantom(k={self.solver.k}, damping={self.solver.damping})"


STRING_METHODS: tuple[str, ...] = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")


def solver_from_name(name: str, *, truncate: int) -> Any:
    """The solver value a string shortcut stands for: ``truncate`` iterations, default options."""
    if name == "neumann":
        return linear.Neumann(max_iter=truncate)
    if name == "rbp":
        return linear.RBP(max_iter=truncate)
    if name == "cg":
        return linear.CGNormal(max_iter=truncate)
    if name == "gmres":
        return linear.GMRES(max_iter=truncate, restart=min(30, truncate))
    raise ValueError(
        f"unknown backward solver {name!r}; choose one of rbp, cg, neumann, gmres or pass a solver"
    )


def from_name(name: str, truncate: int = 20, **options: Any) -> Method:
    """The value a string method stands for, with options of its backward solver.

    ``from_name("rbp", 10, init="uniform")`` is ``Implicit(rbp.linear.RBP(max_iter=10,
    init="uniform"))``; ``from_name("gmres", 40, tol=1e-8, restart=20)``,
    ``from_name("cg", 20, jvp="func")`` likewise. bptt / tbptt have no backward solver, so
    options are refused for them (``from_name("tbptt", k)`` is ``TBPTT(k)``); an option the
    solver does not have is refused by the solver (TypeError).
    """
    if name in ("bptt", "tbptt"):
        if options:
            raise ValueError(
                f"{', '.join(options)} would be ignored: method {name!r} back-propagates through "
                "the forward updates and has no backward solver"
            )
        return BPTT() if name == "bptt" else TBPTT(truncate)
    if not isinstance(name, str) or name not in linear.SOLVERS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(STRING_METHODS)}")
    if name == "gmres" and "restart" not in options:
        options["restart"] = min(30, truncate)
    return Implicit(linear.SOLVERS[name](max_iter=truncate, **options))


def resolve(method: Any, *, truncate: int) -> Method:
    """A method value from a string shortcut (``truncate``: its K), a method value, or a bare
    solver value. A value carries its own options."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        if method in STRING_METHODS:
            try:  # the values are frozen: built once per distinct set of options
                return _from_string(method, truncate)
            except TypeError as exc:
                if "unhashable" not in str(exc):
                    raise
            return _from_string.__wrapped__(method, truncate)
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(STRING_METHODS)} or a value "
            "such as rbp.BPTT(), rbp.TBPTT(k), rbp.Implicit(rbp.linear.GMRES()), rbp.JFB(), "
            "rbp.Phantom(k)"
        )
    if linear.is_solver(method):
        return Implicit(method)
    raise TypeError(
        f"method must be a name ({', '.join(STRING_METHODS)}) or a method value "
        f"(rbp.BPTT(), rbp.Implicit(solver), ...), got {type(method).__name__}"
    )


@functools.lru_cache(maxsize=256)
def _from_string(method: str, truncate: int) -> Method:
    if method == "bptt":
        return BPTT()
    if method == "tbptt":
        return TBPTT(truncate)
    return Implicit(solver_from_name(method, truncate=truncate))


def own_k(method: Any) -> int | None:
    """The K a method value carries (``TBPTT(k)``, a solver's ``max_iter``), or ``None``."""
    if isinstance(method, TBPTT):
        return method.k
    solver = method.solver if isinstance(method, Implicit) else method
    k = getattr(solver, "max_iter", None)
    return k if isinstance(k, int) else None


def check_string_options(method: Any, *, truncate: int) -> None:
    """Refuse ``truncate`` given together with a method value (it would be ignored), unless it
    is the value's own K (``from_name(name, k, ...)`` passed on with ``truncate=k``)."""
    if isinstance(method, str) or truncate == 20 or truncate == own_k(method):
        return
    raise ValueError(
        "truncate applies to the string method names only; a method value carries its own "
        "options (e.g. rbp.TBPTT(k), rbp.Implicit(rbp.linear.GMRES(max_iter=40, tol=1e-8, "
        f"restart=20)), rbp.linear.RBP(max_iter=k, init='uniform')); got method={method!r} "
        f"with truncate={truncate!r}"
    )


def resolve_fallback(fallback: Any, *, truncate: int) -> Any:
    """``None``, a solver name (``truncate`` iterations) or a solver value -> ``None`` or a
    solver value."""
    if fallback is None:
        return None
    if isinstance(fallback, str):
        if fallback not in ("rbp", "cg", "neumann", "gmres"):
            raise ValueError(
                "fallback must be one of rbp, cg, neumann, gmres (a backward solver: the "
                f"forward graph is gone by then) or a solver value, got {fallback!r}"
            )
        return solver_from_name(fallback, truncate=truncate)
    if isinstance(fallback, Implicit) and fallback.accurate:
        return fallback.solver
    if linear.is_solver(fallback) and not isinstance(fallback, Method):
        return fallback
    raise ValueError(
        "fallback must be a backward solver name (rbp, cg, neumann, gmres) or a solver value "
        f"such as rbp.linear.GMRES(); got {fallback!r}"
    )
