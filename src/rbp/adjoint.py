"""The adjoint (backward) side of :func:`rbp.fixed_point`.

At a fixed point ``h* = F(h*)`` the gradient of a loss ``L(h*)`` with respect to the parameters
is ``z^T dF/dw`` with ``z`` solving ``(I - J^T) z = g``, ``J = dF/dh`` and ``g = dL/dh*``.
:func:`attach_implicit_backward` wraps the last state so that autograd, arriving with ``g``,
first solves for ``z`` (an :class:`Adjoint`) and then carries it on through the graph of one
application of F.

The solve runs on a ``(batch, n)`` matrix: one row per sample when ``batch_dim`` is given (J is
then block-diagonal and each sample is its own system), else one row holding the whole state.
It accumulates in float32 at least, whatever the state's dtype (e.g. under ``torch.autocast``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rbp import linear
from rbp.diagnostics import (
    BackwardInfo,
    DivergenceError,
    FixedPointInfo,
    Status,
    neumann_relative_error_estimate,
    power_iteration_norm,
    report,
)
from rbp.jacobian import JacobianRows, jvp_products
from rbp.methods import Implicit, _Damped, _Identity
from rbp.tree import State

Tensor = torch.Tensor

DOUBLE_BACKWARD_METHODS = ("bptt", "tbptt")
# J^T products JFB / phantom spend per backward to check that the fixed point is stable
STABILITY_PRODUCTS = 4


@dataclass
class Adjoint:
    """Solves ``(I - J^T) z = g`` at the fixed point for the method, reporting failures.

    ``jvp_mode``: the ``jvp`` of the backward solver that needs ``J v`` (``CGNormal(jvp=...)``).
    ``max_backward_error``: the solve is reported per ``on_failure`` when its a-posteriori error
    estimate exceeds it (``None``: only statuses are checked).
    """

    method: Implicit
    fallback: Any
    on_failure: str
    jvp_mode: str
    estimate_error: bool
    max_backward_error: float | None
    batch_dim: int | None
    info: FixedPointInfo
    map_at_fixed_point: Callable[[State], State]
    spec: Any
    inverse_estimate: Any = None  # the forward's inverse-Jacobian estimate (SHINE reads it)
    autocast_eps: float = 0.0  # unit round-off of the autocast dtype the forward ran under

    def __call__(
        self,
        h_in: list[Tensor],
        h_out: list[Tensor],
        grads: Sequence[Tensor | None],
    ) -> list[Tensor]:
        if torch.is_grad_enabled():
            name = self.method.name
            how = ("rbp.Implicit(rbp.linear.GMRES(max_iter=K), second_order=True) (or another "
                   "solver)" if self.method.accurate else "an exact implicit method, e.g. "
                   "rbp.Implicit(rbp.linear.GMRES(max_iter=K), second_order=True)")
            raise RuntimeError(
                f"{name}: second derivatives (backward with create_graph=True, e.g. a gradient "
                "penalty or meta-learning) need the fixed point built for them: pass "
                f"method={how}, which differentiates the adjoint solve implicitly at O(1) "
                "memory; or use a method that back-propagates through the steps: "
                f"{', '.join(DOUBLE_BACKWARD_METHODS)}."
            )
        return self.solve(h_in, h_out, grads)

    def solve(
        self,
        h_in: list[Tensor],
        h_out: list[Tensor],
        grads: Sequence[Tensor | None],
    ) -> list[Tensor]:
        """``z = (I - J^T)^{-1} g`` on the graph ``h_out = F(h_in)``, checked and recorded in the
        info (``grads``: ``g`` per leaf of ``h_out``)."""
        make_jvp = functools.partial(jvp_products, self.jvp_mode, self.map_at_fixed_point,
                                     self.spec)
        rows = JacobianRows(h_in, h_out, grads, self.batch_dim, make_jvp,
                            check_jvp=self.jvp_mode == "double_vjp", eps=self.autocast_eps)
        op = linear.AdjointOperator(rows.vjp, rows.jvp,
                                     estimate=self.max_backward_error is not None,
                                     inverse_estimate=self.inverse_estimate, eps=rows.eps)
        solution = self._checked(op, rows.b, rows.work)
        return rows.leaves(solution.z)

    def _checked(self, op: linear.AdjointOperator, b: Tensor, work: torch.dtype,
                 what: str = "") -> linear.Solution:
        """Run the method's solver on ``op z = b`` (and the fallback, if it fails), report per
        ``on_failure`` and append the record to the info, named ``"<method> (<what>)"`` for
        another system than the adjoint's."""
        name = f"{self.method.name} ({what})" if what else self.method.name
        solution = _solve(self.method.solver, op, b, name)
        record = BackwardInfo(
            method=name,
            iterations=solution.iterations,
            residuals=solution.residuals,
            status=Status(solution.status),
            error_estimate=solution.error_estimate,
            sample_errors=solution.sample_errors if self.batch_dim is not None else None,
            dtype=str(work).removeprefix("torch."),
            relative_residual=_max_or_none(solution.sample_residuals),
        )
        problem = self._problem(solution, b)
        if problem is not None:
            message = f"{name}: {problem}"
            if self.fallback is not None:
                solution = self._fall_back(op, b, message, record)
            else:
                report(
                    self.on_failure,
                    f"{message}. Try checks=rbp.Checks(fallback='gmres'), a larger truncate, "
                    "more forward steps, or a contractive f.",
                )
        if not self.method.accurate:
            self._check_stable(op.vjp, b, name, record)
        if self.estimate_error:
            assert op.jvp is not None
            record.jacobian_norm = power_iteration_norm(
                lambda v: op.vjp(v.reshape(b.shape)).reshape(-1),
                lambda v: op.jvp(v.reshape(b.shape)).reshape(-1),  # type: ignore[misc]
                b.reshape(-1),
                iters=10,
            )
            terms = solution.terms if solution.terms is not None else solution.iterations
            record.error_bound = neumann_relative_error_estimate(record.jacobian_norm, terms)
        self.info.backward.append(record)
        return solution

    def _fall_back(self, op: linear.AdjointOperator, b: Tensor, message: str,
                   record: BackwardInfo) -> linear.Solution:
        """Re-solve with the fallback solver after the method's solve failed (``message``)."""
        fb_name = str(getattr(self.fallback, "name", type(self.fallback).__name__))
        solution = _solve(self.fallback, op, b, fb_name)
        record.fell_back_to = fb_name
        record.error_estimate = solution.error_estimate
        record.relative_residual = _max_or_none(solution.sample_residuals)
        record.sample_errors = solution.sample_errors if self.batch_dim is not None else None
        second = self._problem(solution, b)
        if second is None:
            report("warn" if self.on_failure != "ignore" else "ignore",
                   f"{message}; fell back to {fb_name}: {solution.status} after "
                   f"{solution.iterations} iterations")
        else:
            report(self.on_failure, f"{message}; the fallback {fb_name} failed too: {second}")
        return solution

    def _check_stable(
        self, vjp: Callable[[Tensor], Tensor], b: Tensor, name: str, record: BackwardInfo
    ) -> None:
        """JFB / phantom drop ``(I - J^T)^{-1}``, which is only a fair trade at a stable fixed
        point: estimate the growth rate of ``J^T`` on ``g`` by ``STABILITY_PRODUCTS`` power
        steps, ``(||(J^T)^k g|| / ||g||)^(1/k)`` (a lower estimate of the spectral radius along
        ``g``), and report a rate >= 1 (the fixed point repels the forward iteration there;
        the gradient then has no meaning)."""
        v = b
        k = STABILITY_PRODUCTS
        for _ in range(k):
            v = vjp(v)
        ratio = (torch.linalg.vector_norm(v, dim=1)
                 / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-300))
        rate = float(ratio.amax()) ** (1.0 / k) if bool(torch.isfinite(ratio).all()) else math.inf
        record.stability_rate = rate
        if rate >= 1.0:
            report(
                self.on_failure,
                f"{name}: the fixed point is unstable along the gradient (||(J^T)^{k} g|| / "
                f"||g|| = {rate:.3g}^{k}: spectral radius of J >= 1), so the {name} gradient, "
                "which drops (I - J^T)^-1, has no meaning there (it may point the wrong way). "
                "Use an exact implicit method (e.g. 'gmres'), or make f contractive at its "
                "fixed point.",
            )

    def _problem(self, solution: linear.Solution, b: Tensor) -> str | None:
        """Why this solution cannot be trusted, or None."""
        status = Status(solution.status)
        last = solution.residuals[-1] if solution.residuals else 0.0
        if not status.ok:
            return (
                f"backward solve {status} after {solution.iterations} iterations ({status.message};"
                f" last residual {last:.3g}, ||g|| = {b.norm().item():.3g})"
            )
        err = solution.error_estimate
        limit = self.max_backward_error
        if self.method.accurate and limit is not None and err is not None and not err <= limit:
            return (
                f"backward solve {status} after {solution.iterations} iterations with an "
                f"estimated relative error {err:.3g} > max_backward_error={limit:g}"
            )
        return None

# Solvers whose Solution is taken as it comes: rbp's own (their estimates are documented in
# docs/guarantees.md; exact types, not subclasses, which may override solve).
_TRUSTED = (linear.Neumann, linear.RBP, linear.CGNormal, linear.GMRES, linear.SHINE,
            _Identity, _Damped)


def _solve(solver: Any, op: linear.AdjointOperator, b: Tensor, name: str) -> linear.Solution:
    """Run a built-in or user solver and normalise its result to a :class:`Solution`.

    A user solver gets a copy of ``b`` (it may modify it), and whatever it returns is
    re-measured: the true residual ``||A z - b|| / ||b||`` of its ``z`` against the original
    ``b`` (one product) is its error estimate; its own ``sample_errors`` are not trusted.
    """
    trusted = type(solver) in _TRUSTED
    solve = solver.solve if linear.is_solver(solver) else solver
    try:
        result = solve(op, b if trusted else b.clone())
    except torch.linalg.LinAlgError as exc:  # a user solver's dense solve, say
        raise DivergenceError(
            f"{name}: the backward solve failed in linear algebra: {exc}"
        ) from exc
    if trusted and isinstance(result, linear.Solution):
        return result
    z = result if isinstance(result, Tensor) else getattr(result, "z", None)
    if not isinstance(z, Tensor) or z.shape != b.shape:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(result).__name__
        raise TypeError(
            f"backward solver {name} returned {got}; it must return a Solution, an object with "
            f"a tensor z, or a tensor z of b's shape {tuple(b.shape)}"
        )
    z = z.to(b.dtype)
    bnorm = b.norm(dim=1)
    errors = linear._true_errors(op, z, b, bnorm).double().cpu().tolist()
    finite = all(math.isfinite(e) for e in errors)
    status = getattr(result, "status", None)
    if status is None or not finite:
        status = Status.CONVERGED if finite else Status.DIVERGED
    try:
        status = Status(status)
    except ValueError:
        raise TypeError(
            f"backward solver {name} returned status {status!r}; use one of "
            f"{', '.join(s.value for s in Status)} (rbp.Status)"
        ) from None
    residuals = [float(r) for r in getattr(result, "residuals", []) or []]
    iterations = int(getattr(result, "iterations", 0) or 0)
    return linear.Solution(z, iterations, residuals, status, errors, sample_residuals=errors)


def _max_or_none(values: list[float] | None) -> float | None:
    return None if values is None else max(values, default=0.0)


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the last state whose backward swaps ``g`` for the adjoint ``z``."""

    @staticmethod
    def forward(ctx: Any, backward_fn: Callable[..., list[Tensor]], *leaves: Tensor):
        ctx.backward_fn = backward_fn
        return tuple(leaf.clone() for leaf in leaves)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None):
        return (None, *ctx.backward_fn(grads))


_FUNCTORCH_ACTIVE: Callable[[], bool] | None = getattr(
    torch._C, "_are_functorch_transforms_active", None
)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is running."""
    return bool(_FUNCTORCH_ACTIVE()) if _FUNCTORCH_ACTIVE is not None else False


def refuse_functorch(name: str) -> None:
    """Raise a clear error when an implicit method runs under a reverse-mode ``torch.func``
    transform (grad, vjp, jacrev, vmap ...); ``torch.func.jvp`` alone is supported."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    jvp = torch._C._functorch.TransformType.Jvp
    if any(i.key() != jvp for i in stack):
        raise RuntimeError(
            f"fixed_point with the implicit method {name!r} cannot run under torch.func "
            "grad, vjp, jacrev or vmap: its adjoint is a hook that runs autograd inside the "
            "backward, which those transforms cannot trace. Use torch.autograd.grad / "
            ".backward() around fixed_point (create_graph=True works with "
            "rbp.Implicit(solver, second_order=True)), torch.func.jvp (forward mode), or "
            "method='bptt' / 'tbptt' under torch.func."
        )


def attach_implicit_backward(
    h_in: list[Tensor], h_out: list[Tensor], adjoint: Callable[..., list[Tensor]]
) -> list[Tensor]:
    """Route the gradient arriving at ``h_out = F(h_in)`` through ``adjoint`` first.

    ``h_in``: the leaves of the state at which the map was last applied (``requires_grad``);
    ``h_out``: the leaves of ``F(h_in)``, with the graph. The returned leaves equal ``h_out``;
    autograd then carries ``z`` on through the graph of the last step, giving ``z^T dF/dw`` to
    every parameter and input F used.
    """
    if len(h_out) == 1:
        if not h_out[0].requires_grad:
            return h_out
        # One leaf: a pre-hook on the node of a copy costs less per call than a custom Function
        # (and, unlike a hook on h_out itself, forms no cycle: the closure holds h_out, not
        # the copy). The copy keeps `h += x` on the result legal.
        out = h_out[0].clone()
        out.grad_fn.register_prehook(lambda grads: (adjoint(h_in, h_out, list(grads))[0],))
        return [out]
    if not any(o.requires_grad for o in h_out):
        return h_out

    def backward_fn(grads: Sequence[Tensor | None]) -> list[Tensor]:
        return adjoint(h_in, h_out, grads)

    return list(_ImplicitGradient.apply(backward_fn, *h_out))

