"""Gradients through the steady state of a recurrence ``h_{t+1} = F(h_t)``.

:func:`fixed_point` runs ``steps`` updates of ``f`` and returns the last state ``h_T``, standing in
for ``h* = F(h*)``. What ``loss(h_T).backward()`` then puts in the ``.grad`` of every tensor
that ``f`` uses (parameters and inputs alike) depends on ``method``:

======== ============================================================== ==========
method   gradient                                                       memory
======== ============================================================== ==========
bptt     back-propagation through all ``steps`` updates                 O(steps)
tbptt    back-propagation through the last ``truncate`` updates         O(K)
rbp      ``z_i = J^T z_{i-1} + g``, K iterations (Almeida-Pineda)       O(1)
cg       CG on ``(I-J)(I-J^T) z = (I-J) g``, K iterations               O(1)
neumann  ``z = sum_{t=0}^{K} (J^T)^t g`` (Neumann-RBP)                  O(1)
gmres    GMRES on ``(I - J^T) z = g``, K iterations                     O(restart)
======== ============================================================== ==========

For the implicit methods (all but bptt/tbptt) the gradient is ``z^T dF/dw`` with
``J = dF/dh`` at ``h_T``; only ``h_{T-1}`` and one application of F keep a graph.

Index correspondence (Prop. 1): on a trajectory that is constant over its last K+1 states,
``neumann`` with ``truncate=K`` (K products, K+1 terms) equals ``tbptt`` with ``truncate=K+1``,
and ``rbp`` with ``rbp_init="zeros"`` and ``truncate=K+1`` equals both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from rbp import solvers, tree
from rbp.diagnostics import (
    BackwardInfo,
    ConvergenceWarning,
    DivergenceError,
    FixedPointInfo,
    neumann_relative_error_estimate,
    power_iteration_norm,
)
from rbp.tree import State

METHODS: tuple[str, ...] = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")
IMPLICIT_METHODS: tuple[str, ...] = ("rbp", "cg", "neumann", "gmres")
OnFailure = Literal["raise", "warn", "ignore"]


def fixed_point(
    f: Callable[..., State],
    h0: State,
    steps: int,
    method: str = "neumann",
    truncate: int = 20,
    *,
    time_varying: bool = False,
    last_step: Callable[[State], State] | None = None,
    tol: float | None = None,
    settle_tol: float | None = 1e-3,
    on_failure: OnFailure = "warn",
    fallback: str | None = None,
    rbp_init: Literal["uniform", "zeros"] = "uniform",
    jvp: Literal["double_vjp", "func"] = "double_vjp",
    restart: int = 30,
    trace: bool = False,
    estimate_error: bool = False,
    return_info: bool = False,
) -> State | tuple[State, FixedPointInfo]:
    """Run ``h_{t+1} = f(h_t)`` for ``steps`` updates; differentiate ``h_T`` by ``method``.

    Args:
        f: one update. Called ``f(h)``, or ``f(h, t)`` with ``t = 0 .. steps-1`` when
            ``time_varying``. It closes over its inputs and parameters; every tensor with
            ``requires_grad`` it uses receives a gradient on ``backward()``.
        h0: initial state: a floating tensor or a tuple/list/dict of them. Only ``bptt``
            differentiates with respect to ``h0`` (at a fixed point it does not matter).
        steps: number of forward updates T >= 1.
        method: one of :data:`METHODS`.
        truncate: K. tbptt: the number of steps back-propagated (1 <= K <= steps);
            implicit methods: the number of backward iterations (Jacobian-vector products).
        time_varying: pass the step index to ``f`` (e.g. a fresh mini-batch per step).
        last_step: map used for the final update ``h_T = last_step(h_{T-1})`` by every
            method, so it is the map whose Jacobian the implicit methods invert (e.g. the
            full-batch step of a training run). Default: ``f`` at step ``T-1``.
        tol: stop a backward iteration early once its increment (or residual) is at most
            ``tol * ||g||``; ``None`` always runs ``truncate`` iterations.
        settle_tol: implicit methods assume a steady state; if
            ``||h_T - h_{T-1}|| > settle_tol * ||h_T||`` this is reported per ``on_failure``.
            ``None`` disables the check.
        on_failure: what to do when the forward has not settled or a backward solve grows,
            stalls or diverges: ``"raise"`` (:class:`DivergenceError`), ``"warn"``
            (:class:`ConvergenceWarning`) or ``"ignore"``. A non-finite forward state always
            raises.
        fallback: an implicit method to re-solve with when the backward solve fails
            (e.g. ``"gmres"``); the failure is then reported as a warning at most.
        rbp_init: initial guess z_0 of ``rbp``: ``"uniform"`` (U[0,1], as in Alg. 1) or zeros.
        jvp: how ``cg`` obtains ``J v``: ``"double_vjp"`` (reverse-over-reverse on the graph of
            the last step) or ``"func"`` (forward mode, ``torch.func.jvp``).
        restart: GMRES restart length.
        trace: record ``||h_t - h_{t-1}||`` for every step in the info.
        estimate_error: in the backward pass, estimate ``||J||`` by power iteration and store
            the Prop. 2 bound on the relative error of the solve in the info (costs ~20
            Jacobian products per backward).
        return_info: return ``(h_T, info)`` with a :class:`FixedPointInfo`.

    Returns:
        ``h_T`` (same structure as ``h0``), or ``(h_T, info)``.
    """
    _validate(f, steps, method, truncate, on_failure, fallback, rbp_init, jvp, tol)
    h0_leaves, spec = tree.flatten(h0, "h0")
    info = FixedPointInfo(method=method, steps=steps, truncate=truncate)

    def step(h: State, t: int) -> State:
        if t == steps - 1 and last_step is not None:
            return last_step(h)
        return f(h, t) if time_varying else f(h)

    grad_on = torch.is_grad_enabled()
    if not grad_on or method == "bptt":
        graph_steps = steps
    elif method == "tbptt":
        graph_steps = truncate
    else:
        graph_steps = 1
    free_steps = steps - graph_steps

    norms: list[torch.Tensor] = []
    h, prev = h0, h0
    with torch.no_grad():
        for t in range(free_steps):
            prev, h = h, step(h, t)
            if t == 0:
                tree.check_same_structure(spec, h0_leaves, h, t)
            if trace:
                norms.append(_diff_norm(h, prev))

    implicit = grad_on and method in IMPLICIT_METHODS
    if grad_on and method != "bptt":
        h = tree.unflatten(spec, [leaf.detach() for leaf in tree.flatten(h)[0]])
    h_in_leaves: list[torch.Tensor] = []
    if implicit:
        h_in_leaves = [leaf.detach().requires_grad_() for leaf in tree.flatten(h)[0]]
        h = tree.unflatten(spec, h_in_leaves)
    for t in range(free_steps, steps):
        prev, h = h, step(h, t)
        if t in (0, steps - 1):
            tree.check_same_structure(spec, h0_leaves, h, t)
        if trace or t == steps - 1:
            norms.append(_diff_norm(h, prev))

    out_leaves = tree.flatten(h)[0]
    _check_finite(out_leaves, method, steps)
    diffs = torch.stack(norms).tolist()
    info.forward_trace = diffs if trace else []
    info.final_difference = diffs[-1]
    scale = math.sqrt(sum(leaf.detach().pow(2).sum().item() for leaf in out_leaves))
    info.relative_final_difference = diffs[-1] / max(scale, 1e-30)

    if implicit:
        if settle_tol is not None and info.relative_final_difference > settle_tol:
            _report(
                on_failure,
                f"{method}: the forward state has not settled after {steps} steps "
                f"(||h_T - h_T-1|| / ||h_T|| = {info.relative_final_difference:.3g} > "
                f"settle_tol={settle_tol:g}); implicit gradients assume a fixed point. "
                "Run more steps, or use method='bptt'/'tbptt'.",
            )
        out_leaves = _attach_implicit_backward(
            h_in_leaves,
            out_leaves,
            _Adjoint(
                method=method,
                truncate=truncate,
                tol=tol,
                on_failure=on_failure,
                fallback=fallback,
                rbp_init=rbp_init,
                jvp_mode=jvp,
                restart=restart,
                estimate_error=estimate_error,
                info=info,
                map_at_fixed_point=lambda state: step(state, steps - 1),
                spec=spec,
            ),
        )
        h = tree.unflatten(spec, out_leaves)
    return (h, info) if return_info else h


def _validate(
    f: Any,
    steps: Any,
    method: Any,
    truncate: Any,
    on_failure: Any,
    fallback: Any,
    rbp_init: Any,
    jvp: Any,
    tol: Any,
) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("steps", steps), ("truncate", truncate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if method == "tbptt" and truncate > steps:
        raise ValueError(
            f"tbptt cannot back-propagate through truncate={truncate} steps of a {steps}-step "
            "run; use truncate <= steps (truncate == steps is bptt)"
        )
    if on_failure not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_failure must be 'raise', 'warn' or 'ignore', got {on_failure!r}")
    if fallback is not None and fallback not in IMPLICIT_METHODS:
        raise ValueError(
            f"fallback must be one of {', '.join(IMPLICIT_METHODS)} (a backward solver: the "
            f"forward graph is gone by then), got {fallback!r}"
        )
    if rbp_init not in ("uniform", "zeros"):
        raise ValueError(f"rbp_init must be 'uniform' or 'zeros', got {rbp_init!r}")
    if jvp not in ("double_vjp", "func"):
        raise ValueError(f"jvp must be 'double_vjp' or 'func', got {jvp!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive or None, got {tol!r}")


def _diff_norm(a: State, b: State) -> torch.Tensor:
    la, lb = tree.flatten(a)[0], tree.flatten(b)[0]
    total = sum((x.detach() - y.detach()).pow(2).sum() for x, y in zip(la, lb, strict=True))
    return torch.as_tensor(total).sqrt().to("cpu", torch.float64)


def _check_finite(leaves: Sequence[torch.Tensor], method: str, steps: int) -> None:
    if not all(bool(torch.isfinite(leaf.detach()).all()) for leaf in leaves):
        raise DivergenceError(
            f"{method}: the forward state is not finite after {steps} steps: the map diverges. "
            "Check that f is a contraction (e.g. smaller weights or a damped update)."
        )


def _report(on_failure: str, message: str) -> None:
    if on_failure == "raise":
        raise DivergenceError(message)
    if on_failure == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=4)


class _Adjoint:
    """Solves ``(I - J^T) z = g`` at the fixed point with the chosen backward solver."""

    def __init__(
        self,
        *,
        method: str,
        truncate: int,
        tol: float | None,
        on_failure: str,
        fallback: str | None,
        rbp_init: str,
        jvp_mode: str,
        restart: int,
        estimate_error: bool,
        info: FixedPointInfo,
        map_at_fixed_point: Callable[[State], State],
        spec: Any,
    ) -> None:
        self.method = method
        self.truncate = truncate
        self.tol = tol
        self.on_failure = on_failure
        self.fallback = fallback
        self.rbp_init = rbp_init
        self.jvp_mode = jvp_mode
        self.restart = restart
        self.estimate_error = estimate_error
        self.info = info
        self.map_at_fixed_point = map_at_fixed_point
        self.spec = spec

    def __call__(
        self,
        h_in: list[torch.Tensor],
        h_out: list[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        g_leaves = [
            torch.zeros_like(o) if g is None else g for g, o in zip(grads, h_out, strict=True)
        ]
        g = tree.to_vector(g_leaves)
        # Only outputs that depend on the graph take part in J^T v.
        live = [i for i, o in enumerate(h_out) if o.requires_grad]

        def vjp(v: torch.Tensor) -> torch.Tensor:
            vs = tree.from_vector(v, h_out)
            out = torch.autograd.grad(
                [h_out[i] for i in live],
                h_in,
                [vs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return tree.to_vector(out)

        jvp_cache: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

        def jvp(v: torch.Tensor) -> torch.Tensor:
            if "f" not in jvp_cache:
                jvp_cache["f"] = self._make_jvp(h_in, h_out, live)
            return jvp_cache["f"](v)

        solution = self._solve(self.method, vjp, jvp, g)
        record = BackwardInfo(
            method=self.method,
            iterations=solution.iterations,
            residuals=solution.residuals,
            status=solution.status,
        )
        if not solution.ok:
            last = solution.residuals[-1] if solution.residuals else 0.0
            message = (
                f"{self.method}: backward solve {solution.status} after {solution.iterations} "
                f"iterations (last residual {last:.3g}, ||g|| = {g.norm().item():.3g})"
            )
            if self.fallback is not None:
                solution = self._solve(self.fallback, vjp, jvp, g)
                record.fell_back_to = self.fallback
                _report(
                    "warn" if self.on_failure != "ignore" else "ignore",
                    f"{message}; fell back to {self.fallback}: {solution.status} after "
                    f"{solution.iterations} iterations",
                )
            else:
                _report(
                    self.on_failure,
                    f"{message}. The Jacobian at h_T may have spectral radius >= 1; try "
                    "fallback='gmres', more forward steps, or a contractive f.",
                )
        if self.estimate_error:
            record.jacobian_norm = power_iteration_norm(vjp, jvp, g, iters=10)
            terms = self.truncate + 1 if self.method == "neumann" else self.truncate
            record.error_bound = neumann_relative_error_estimate(record.jacobian_norm, terms)
        self.info.backward.append(record)
        return tree.from_vector(solution.z, h_out)

    def _solve(
        self,
        method: str,
        vjp: Callable[[torch.Tensor], torch.Tensor],
        jvp: Callable[[torch.Tensor], torch.Tensor],
        g: torch.Tensor,
    ) -> solvers.Solution:
        k, tol = self.truncate, self.tol
        if method == "neumann":
            return solvers.neumann(vjp, g, max_iter=k, tol=tol)
        if method == "rbp":
            z0 = torch.rand_like(g) if self.rbp_init == "uniform" else None
            return solvers.fixed_point_iteration(vjp, g, max_iter=k, tol=tol, z0=z0)
        if method == "cg":
            return solvers.conjugate_gradient_normal(vjp, g, jvp=jvp, max_iter=k, tol=tol)
        return solvers.gmres(vjp, g, max_iter=k, tol=tol, restart=min(self.restart, k))

    def _make_jvp(
        self, h_in: list[torch.Tensor], h_out: list[torch.Tensor], live: list[int]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.jvp_mode == "func":
            primals = tuple(x.detach() for x in h_in)

            def forward_mode(v: torch.Tensor) -> torch.Tensor:
                tangents = tuple(tree.from_vector(v, h_in))

                def fn(*leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    out = self.map_at_fixed_point(tree.unflatten(self.spec, list(leaves)))
                    return tuple(tree.flatten(out)[0])

                with torch.enable_grad():
                    _, out_tangents = torch.func.jvp(fn, primals, tangents)
                return tree.to_vector([t.detach() for t in out_tangents])

            return forward_mode

        # J v = d/du <J^T u, v>: build u -> J^T u once with a graph, then one vjp per product.
        with torch.enable_grad():
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

        def double_vjp(v: torch.Tensor) -> torch.Tensor:
            vs = tree.from_vector(v, h_in)
            with torch.enable_grad():
                outs = torch.autograd.grad(
                    jt_u, u, vs, retain_graph=True, allow_unused=True, materialize_grads=True
                )
            full = [torch.zeros_like(o) for o in h_out]
            for i, o in zip(live, outs, strict=True):
                full[i] = o
            return tree.to_vector(full)

        return double_vjp


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the last state whose backward swaps ``g`` for the adjoint ``z``."""

    @staticmethod
    def forward(ctx: Any, backward_fn: Callable[..., list[torch.Tensor]], *leaves: torch.Tensor):
        ctx.backward_fn = backward_fn
        return tuple(leaf.clone() for leaf in leaves)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        return (None, *ctx.backward_fn(grads))


def _attach_implicit_backward(
    h_in: list[torch.Tensor], h_out: list[torch.Tensor], adjoint: _Adjoint
) -> list[torch.Tensor]:
    """Route the gradient arriving at ``h_out = F(h_in)`` through ``adjoint`` first.

    The returned leaves equal ``h_out``; autograd then carries ``z`` on through the graph of
    the last step, giving ``z^T dF/dw`` to every parameter and input F used.
    """
    if not any(o.requires_grad for o in h_out):
        return h_out

    def backward_fn(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        return adjoint(h_in, h_out, grads)

    return list(_ImplicitGradient.apply(backward_fn, *h_out))
