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

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rbp import linear, tree
from rbp.diagnostics import (
    BackwardInfo,
    DivergenceError,
    FixedPointInfo,
    Status,
    neumann_relative_error_estimate,
    power_iteration_norm,
    report,
)
from rbp.forward.rows import Layout, describe, from_rows, to_rows
from rbp.methods import Implicit, _Damped, _Identity
from rbp.tree import State

Tensor = torch.Tensor

DOUBLE_BACKWARD_METHODS = ("bptt", "tbptt")
# J^T products JFB / phantom spend per backward to check that the fixed point is stable
STABILITY_PRODUCTS = 4

# What torch.autograd.grad calls once it has checked its arguments (None: not in this torch):
# its Python wrapper, and the C++ engine under it. On CPU the K products call the engine
# directly: they run inside a backward that torch has set up, on the calling thread, and the
# wrapper's logging test and context stash cost ~1 us a product. Other devices keep the
# wrapper (its context reaches the device threads; the launch latency hides its cost there).
_ENGINE_RUN_BACKWARD: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)
_ENGINE_DIRECT: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None
)


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
        rows = _AdjointRows(h_in, h_out, grads, self.batch_dim, self._make_jvp,
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

    def _make_jvp(
        self, h_in: list[Tensor], h_out: list[Tensor], live: list[int]
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        if self.jvp_mode == "func":
            primals = tuple(x.detach() for x in h_in)

            checked: list[bool] = []

            def forward_mode(tangents: list[Tensor]) -> list[Tensor]:
                def fn(*leaves: Tensor) -> tuple[Tensor, ...]:
                    out = self.map_at_fixed_point(tree.unflatten(self.spec, list(leaves)))
                    return tuple(tree.flatten(out)[0])

                with torch.enable_grad():
                    values, out_tangents = torch.func.jvp(fn, primals, tuple(tangents))
                if not checked:  # f runs again here: it must still be the forward's map
                    check_same_map(values, h_out, "cg (jvp='func')", JVP_FUNC_REMEDY)
                    checked.append(True)
                return [t.detach() for t in out_tangents]

            return forward_mode

        # J v = d/du <J^T u, v>: build u -> J^T u once with a graph, then one vjp per product.
        with torch.enable_grad(), _name_jvp_func():
            u = [torch.zeros_like(h_out[i], requires_grad=True) for i in live]
            jt_u = torch.autograd.grad(
                [h_out[i] for i in live],
                h_in,
                u,
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )

        def double_vjp(vs: list[Tensor]) -> list[Tensor]:
            with torch.enable_grad(), _name_jvp_func():
                outs = torch.autograd.grad(
                    jt_u, u, vs, retain_graph=True, allow_unused=True, materialize_grads=True
                )
            full = [torch.zeros_like(o) for o in h_out]
            for i, o in zip(live, outs, strict=True):
                full[i] = o
            return full

        return double_vjp


class _AdjointRows:
    """The adjoint's right-hand side ``b = g`` as ``(batch, n)`` rows (in float32 at least) and
    the products ``J^T v`` / ``J v`` on rows, on the graph ``h_out = F(h_in)``."""

    def __init__(self, h_in: list[Tensor], h_out: list[Tensor], grads: Sequence[Tensor | None],
                 batch_dim: int | None,
                 make_jvp: Callable[[list[Tensor], list[Tensor], list[int]],
                                    Callable[[list[Tensor]], list[Tensor]]],
                 check_jvp: bool = False, eps: float = 0.0) -> None:
        self.h_in, self.h_out, self.batch_dim, self._make_jvp = h_in, h_out, batch_dim, make_jvp
        self._check_jvp_first = check_jvp  # J v by a double vjp: tested on its first use
        # the products' unit round-off: the least precise leaf's, or the autocast dtype's
        self.eps = max(eps, *(torch.finfo(o.dtype).eps for o in h_out))
        out0 = h_out[0]
        self.out_dtype = out0.dtype
        self._layout: Layout | None = None
        self._jvp: Callable[[list[Tensor]], list[Tensor]] | None = None
        self.single = (len(h_out) == 1 and len(h_in) == 1 and batch_dim is None
                       and out0.requires_grad)
        work = torch.promote_types(self.out_dtype, torch.float32)
        if self.single:  # the common case, set up without the row bookkeeping
            g0 = grads[0]
            self.b = (torch.zeros_like(out0) if g0 is None else g0).reshape(1, -1).to(work)
            self.live = [0]
            self._single = self._single_products(out0, h_in[0], work)
        else:
            for o in h_out[1:]:
                work = torch.promote_types(work, o.dtype)
            g_leaves = [torch.zeros_like(o) if g is None else g
                        for g, o in zip(grads, h_out, strict=True)]
            self.b = to_rows(g_leaves, self.layout(), work)
            self.live = [i for i, o in enumerate(h_out) if o.requires_grad]
            self._single = None
        self.work = work

    def layout(self) -> Layout:  # built on first use: the single-leaf products never need it
        if self._layout is None:
            self._layout = describe(self.h_out, None, self.batch_dim)  # the forward's layout
        return self._layout

    def _single_products(self, out0: Tensor, in0: Tensor, work: torch.dtype
                         ) -> Callable[[Tensor], Tensor]:
        """``J^T v`` for one leaf and one row. The K products reuse one graph with arguments
        checked here, so they call the engine the way torch.autograd.grad does, without its
        per-call Python re-validation (~10 us a product); a tensor subclass, or a v of another
        shape, takes the public path."""
        cast = self.out_dtype != work
        row_shape = self.b.shape
        direct = _ENGINE_DIRECT if out0.is_cpu else None
        engine = direct or _ENGINE_RUN_BACKWARD
        if engine is not None and torch.overrides.has_torch_function((out0, in0)):
            engine = None
        out_row = out0
        if engine is not None:
            torch._C._set_grad_enabled(True)  # (the context manager costs more, once a call)
            try:
                out_row = out0.reshape(row_shape)  # grads arrive as rows: no reshape per product
            finally:
                torch._C._set_grad_enabled(False)
        out_dtype = self.out_dtype

        def vjp_single(v: Tensor) -> Tensor:
            if engine is not None and v.shape == row_shape and v.dtype == work:
                (gi,) = engine(
                    (out_row,), (v.to(out_dtype) if cast else v,), True, False, (in0,), True,
                    accumulate_grad=False,
                )
            else:
                u = v.reshape(out0.shape)
                (gi,) = torch.autograd.grad(
                    out0, in0, u.to(out_dtype) if cast else u, retain_graph=True,
                    allow_unused=True,
                )
            if gi is None:
                return torch.zeros_like(v)
            return gi.reshape(1, -1).to(work) if cast else gi.reshape(1, -1)

        return vjp_single

    def vjp(self, v: Tensor) -> Tensor:
        """``J^T v`` on rows (a method, not a stored bound method: no reference cycle keeps the
        graph alive after the backward)."""
        if self._single is not None:
            return self._single(v)
        h_out, live = self.h_out, self.live
        vs = from_rows(v, self.layout(), [o.dtype for o in h_out])
        out = torch.autograd.grad(
            [h_out[i] for i in live], self.h_in, [vs[i] for i in live], retain_graph=True,
            allow_unused=True, materialize_grads=True,
        )
        return to_rows(out, self.layout(), self.work)

    def jvp(self, v: Tensor) -> Tensor:
        if self._jvp is None:
            self._jvp = self._make_jvp(self.h_in, self.h_out, self.live)
            if self._check_jvp_first:  # self.jvp no longer comes back here: _jvp is set
                check_jvp(self.vjp, self.jvp, v, JVP_BY_DOUBLE_VJP, self.eps)
        vs = from_rows(v, self.layout(), [x.dtype for x in self.h_in])
        return to_rows(self._jvp(vs), self.layout(), self.work)

    def leaves(self, z: Tensor) -> list[Tensor]:
        """The rows ``z`` as leaves shaped and typed like ``h_out``."""
        if self.single:
            out = z.reshape(self.h_out[0].shape)
            return [out.to(self.out_dtype) if self.out_dtype != self.work else out]
        return from_rows(z, self.layout(), [o.dtype for o in self.h_out])


# Solvers whose Solution is taken as it comes: rbp's own (their estimates are documented in
# docs/guarantees.md; exact types, not subclasses, which may override solve).
_TRUSTED = (linear.Neumann, linear.RBP, linear.CGNormal, linear.GMRES, linear.SHINE,
            _Identity, _Damped)


JVP_FUNC_REMEDY = ("use a method whose backward does not run f again (gmres, neumann, or cg "
                   "with jvp='double_vjp')")

JVP_BY_DOUBLE_VJP = (
    "cg obtains J v that way (jvp='double_vjp'). Make that backward differentiable, pass "
    "method=rbp.linear.CGNormal(max_iter=..., jvp='func') (forward mode; the Function needs a "
    "jvp), or use method='gmres', which needs no J v")


def check_same_map(values: Sequence[Tensor], stored: Sequence[Tensor], who: str,
                   remedy: str) -> None:
    """``f`` run again in the backward at ``h_{T-1}`` must give the forward's ``F(h_{T-1})``
    (to ``sqrt(eps)``, relative): a new dropout mask, a train/eval switch or a weight
    recomputed in between would make the derivatives those of another map."""
    worst = max((float((v.detach() - o.detach()).abs().max()
                       / o.detach().abs().max().clamp_min(1e-30))
                 for v, o in zip(values, stored, strict=True) if o.numel()), default=0.0)
    if not worst <= math.sqrt(max(torch.finfo(o.dtype).eps for o in stored)):
        raise RuntimeError(
            f"{who}: the backward runs f again at the fixed point, and f(h) differs from the "
            f"forward's by {worst:.2g} (relative): f changed in between (a new dropout mask, a "
            "train/eval switch, a weight recomputed outside `with rbp.cached_norm(...)`). Run "
            f"the backward before anything f reads changes, or {remedy}.")


def check_jvp(vjp: Callable[[Tensor], Tensor], jvp: Callable[[Tensor], Tensor], like: Tensor,
              remedy: str, eps: float | None = None) -> None:
    """``<J (J^T w), w> = ||J^T w||^2`` for one random ``w`` (rows shaped like ``like``): a map
    whose backward cannot be differentiated (an ``autograd.Function`` with
    ``once_differentiable``, a backward that detaches) gives ``J v`` by a double vjp as zeros
    or worse, without any error. Two products; RuntimeError with ``remedy`` when it fails.
    ``eps``: the products' unit round-off (default: ``like``'s); the test allows 1e-8 when
    they run in float64, else ``max(1e-3, 10 eps)`` (7.8 % when in bfloat16, where 0.3 % was
    seen; a J v by zeros is 100 % off)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    a = vjp(w)
    want = float(a.double().square().sum())  # sums in float64: no round-off growing with n
    if not want > 0.0 or not math.isfinite(want):  # J^T w = 0 or non-finite: no test
        return
    got = float((jvp(a).double() * w.double()).sum())
    eps = max(torch.finfo(like.dtype).eps, eps or 0.0)
    tol = 1e-8 if eps <= torch.finfo(torch.float64).eps else max(1e-3, 10 * eps)
    if abs(got - want) > tol * want:
        raise RuntimeError(
            f"J v is wrong: <J J^T w, w> = {got:.4g} where ||J^T w||^2 = {want:.4g}: the step's "
            f"backward cannot be differentiated again (an autograd.Function whose backward is "
            f"once_differentiable or detaches), and {remedy}.")


@contextlib.contextmanager
def _name_jvp_func() -> Any:
    """Say what to do when the double vjp behind ``J v`` meets a graph that cannot be
    differentiated twice (a step compiled by ``torch.compile``: AOTAutograd)."""
    try:
        yield
    except RuntimeError as exc:
        if "double backward" not in str(exc):
            raise
        raise RuntimeError(
            f"{exc}. cg obtains J v by differentiating the backward of the last step "
            "(jvp='double_vjp', the default), which a step compiled by torch.compile cannot "
            "give; pass method=rbp.linear.CGNormal(max_iter=..., jvp='func') (forward-mode "
            "J v through torch.func.jvp), or use method='gmres', which needs no J v."
        ) from exc


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

