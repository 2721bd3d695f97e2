"""Gradients through the steady state of a recurrence ``h_{t+1} = F(h_t)``.

:func:`fixed_point` runs ``steps`` updates of ``f`` and returns the last state ``h_T``, standing in
for ``h* = F(h*)`` (with a ``tol`` it solves for ``h*`` instead, see :mod:`rbp.forward`). What
``loss(h_T).backward()`` then puts in the ``.grad`` of every tensor that ``f`` uses (parameters
and inputs alike) depends on ``method``:

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
and ``rbp`` (its default zero start) with ``truncate=K+1`` equals both.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from rbp import forward, higher_order, methods, tree
from rbp.adjoint import Adjoint, attach_implicit_backward, functorch_active, refuse_functorch
from rbp.checks import DEFAULT as DEFAULT_CHECKS
from rbp.checks import Checks
from rbp.diagnostics import DivergenceError, FixedPointInfo, report
from rbp.diagnostics import check_count as _count
from rbp.linear import shine
from rbp.tree import State

METHODS: tuple[str, ...] = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")
IMPLICIT_METHODS: tuple[str, ...] = ("rbp", "cg", "neumann", "gmres")


def fixed_point(
    f: Callable[..., State],
    h0: State,
    steps: int,
    method: str | methods.Method = "neumann",
    truncate: int = 20,
    *,
    solver: str | forward.ForwardSolver = "iterate",
    tol: float | None = None,
    batch_dim: int | None = None,
    inputs: Sequence[Any] = (),
    time_varying: bool = False,
    last_step: Callable[..., State] | None = None,
    checks: Checks | None = None,
    return_info: bool = False,
) -> State | tuple[State, FixedPointInfo]:
    """Run ``h_{t+1} = f(h_t)`` for ``steps`` updates; differentiate ``h_T`` by ``method``.

    Every option lives on what it configures: the forward's stopping rule on the forward
    solver value (``rbp.Anderson(tol=..., tol_mode=..., check_every=..., best_iterate=...)``),
    the backward's on the method or backward solver value (``rbp.linear.GMRES(max_iter=...,
    tol=..., restart=...)``), the checks and what they report on ``checks=rbp.Checks(...)``.

    Args:
        f: one update. Called ``f(h, *inputs)``, or ``f(h, t, *inputs)`` with
            ``t = 0 .. steps-1`` when ``time_varying``. It closes over its parameters (and
            inputs, unless passed as ``inputs``); every tensor with ``requires_grad`` it uses
            receives a gradient on ``backward()``. It must not modify ``h`` in place. An ``f``
            that uses nothing requiring grad returns a state that does not require grad.
        h0: initial state: a floating tensor or a tuple/list/dict of them. Only ``bptt``
            differentiates with respect to ``h0`` (at a fixed point it does not matter).
        steps: number of forward updates T >= 1; with a ``tol`` (or another solver) the most
            evaluations of ``f`` the forward solve may spend.
        method: one of :data:`METHODS`, or a value: ``rbp.BPTT()``, ``rbp.TBPTT(k)``,
            ``rbp.Implicit(solver)`` or the bare ``solver`` (from :mod:`rbp.linear`, e.g.
            ``rbp.linear.RBP(max_iter=10, init="uniform")``, ``rbp.linear.GMRES(max_iter=40,
            tol=1e-8, restart=20)``, ``rbp.linear.CGNormal(jvp="func")``, or your own with
            ``solve(matvec, b)``), ``rbp.JFB()``, ``rbp.Phantom(k, damping)``. A value carries
            its own options (``truncate`` with a value is refused, unless it is the value's
            own K); :func:`rbp.methods.from_name` builds the value of a name with solver
            options (``from_name("rbp", 10, init="uniform")``).
        truncate: K of a string method. tbptt: the number of steps back-propagated
            (1 <= K <= steps); implicit methods: the number of backward iterations
            (Jacobian-vector products). ``"bptt"`` has no K: it accepts any (checked as an
            integer >= 1) so that one call switches between the six methods by name alone.
        solver: forward solver: ``"iterate"`` / :class:`rbp.Iterate` (plain, or damped),
            ``"anderson"`` / :class:`rbp.Anderson`, ``"broyden"`` / :class:`rbp.Broyden`; each
            value carries its stopping options (``tol``, ``tol_mode``, ``check_every``,
            ``best_iterate``: :class:`rbp.forward.Stopping`). The accelerated solvers run
            without a graph; the implicit methods then linearise at the state they stop at.
            bptt/tbptt back-propagate through ``"iterate"`` only (and refuse
            ``best_iterate``). Your own solver: a value with ``name`` and
            ``init(x, max_evals)`` whose state has ``step(x, fx, g)`` and ``keep(rows)``
            (:mod:`rbp.forward.protocol`); it runs per sample like the built-in ones.
        tol: forward tolerance, the shortcut for the solver's own: ``solver="anderson",
            tol=1e-6`` is ``solver=rbp.Anderson(tol=1e-6)``. Stop once
            ``||F(h) - h|| <= tol * ||F(h)||`` (relative; ``rbp.Iterate(tol=...,
            tol_mode="absolute")`` for ``<= tol``), returning ``F(h)``; not reaching it within
            ``steps`` is reported per ``checks.on_failure``. ``None``: the solver's own
            (``None``: run all ``steps``). Refused with a solver value that has its own.
        batch_dim: the dim of every state leaf (and input) that indexes independent samples:
            each sample stops when it has converged and is removed from later calls of ``f``,
            which then receives only the live samples (and the matching rows of ``inputs``).
            ``f`` must treat samples independently; one sub-batch check refuses one that does
            not. ``None`` (default): the state is one system. Refused with bptt/tbptt.
        inputs: tensors passed to ``f`` after the state; with ``batch_dim`` they are sliced to
            the live samples along ``batch_dim``.
        time_varying: pass the step index to ``f`` (e.g. a fresh mini-batch per step).
        last_step: map used for the final update ``h_T = last_step(h_{T-1}, *inputs)`` by every
            method, so it is the map whose Jacobian the implicit methods invert (e.g. the
            full-batch step of a training run). Default: ``f`` at step ``T-1``.
        checks: what is checked and recorded, and what a failed check does:
            :class:`rbp.Checks` (``settle_tol``, ``max_backward_error``, ``on_failure``,
            ``fallback``, ``estimate_error``, ``trace``); ``None``: ``rbp.Checks()``.
            bptt/tbptt refuse its ``fallback`` and ``estimate_error``, the inexact
            ``rbp.JFB()`` / ``rbp.Phantom(k)`` its ``fallback``.
        return_info: return ``(h_T, info)`` with a :class:`FixedPointInfo`.

    Every option is checked before anything runs (TypeError for a wrong type, ValueError for a
    wrong value); the values check their own options when they are built. An option the chosen
    method or solver would not use is refused, not ignored (the message names it).

    Returns:
        ``h_T`` (same structure as ``h0``), or ``(h_T, info)``.
    """
    arguments = dict(locals())
    call = _validate(arguments)  # the one place options are checked
    how, stop, checks = call.how, call.stop, call.checks
    transformed = functorch_active()  # one cheap test; the messages only under a transform
    if transformed and how.implicit and torch.is_grad_enabled():
        refuse_functorch(how.name)  # all but torch.func.jvp
        with torch.no_grad():  # jvp: the tangent is solved for; no reverse graph inside it
            return fixed_point(**arguments)
    if isinstance(how, methods.TBPTT):
        truncate = how.k
    elif not isinstance(method, str):
        truncate = methods.own_k(how) or truncate  # the K of a solver value
    method = how.name  # what the info and the messages see; the forward gets the value
    if transformed:
        _refuse_functorch()

    grad_on = torch.is_grad_enabled()
    implicit = grad_on and how.implicit
    second_order = implicit and getattr(how, "second_order", False)
    since = higher_order.sequence_mark() if second_order else 0
    try:
        fwd = forward.run(
            f, h0, steps, method=how, time_varying=time_varying, last_step=last_step,
            tol=stop.tol, tol_mode=stop.tol_mode, solver=call.solver, batch_dim=batch_dim,
            inputs=inputs, best_iterate=stop.best_iterate, check_every=stop.check_every,
            trace=checks.trace,
        )
    except (DivergenceError, RuntimeError, NotImplementedError) as exc:  # h0 checked now: free
        _refuse_bad_start(h0, exc)
        raise
    info = _info(method, steps, truncate, fwd.measured)
    h, h_in_leaves, out_leaves, spec = fwd.h, fwd.h_in, fwd.h_out, fwd.spec
    if stop.tol is not None:
        message = forward.unreached_message(info, stop.tol, stop.tol_mode, steps)
        if message is not None:
            report(checks.on_failure, message)

    tangent = how.implicit and higher_order.forward_mode_active()
    if implicit or tangent:  # both linearise at the returned state: it must have settled
        _check_settled(fwd, info, checks, stop, batch_dim)
        if fwd.update is None:  # no graph was kept (grad off): forward mode only
            fwd.update = forward.step_map(f, steps, time_varying, last_step, inputs)
        adjoint = _adjoint(call, info, fwd, steps, batch_dim)
        if implicit:
            out_leaves = (higher_order.attach(h_in_leaves, out_leaves, adjoint, inputs, since)
                          if second_order else
                          attach_implicit_backward(h_in_leaves, out_leaves, adjoint))
            h = tree.unflatten(spec, out_leaves)
        if tangent:
            h = tree.unflatten(spec, higher_order.implicit_tangent(adjoint, tree.flatten(h)[0]))
    return (h, info) if return_info else h


def _check_settled(fwd: forward.Forward, info: FixedPointInfo, checks: Checks, stop: Any,
                   batch_dim: int | None) -> None:
    """The implicit methods assume a steady state: report (per ``checks.on_failure``) a last
    step whose relative change exceeds ``checks.settle_tol``, per sample."""
    info.worst_relative_difference = forward.worst_ratio(fwd.rows,
                                                         info.relative_final_difference)
    settle_tol = checks.settle_tol
    if settle_tol is not None and info.worst_relative_difference > settle_tol:
        message = forward.unsettled_message(fwd.rows, info, settle_tol, stop.tol, stop.tol_mode,
                                            batch_dim)
        if message is not None:
            report(checks.on_failure, f"fixed_point: {message}")


def _adjoint(call: Any, info: FixedPointInfo, fwd: forward.Forward, steps: int,
             batch_dim: int | None) -> Adjoint:
    """The backward of an implicit method, at the map of the last step."""
    update, checks = fwd.update, call.checks
    assert update is not None
    return Adjoint(
        method=call.how,
        fallback=call.fallback,
        on_failure=checks.on_failure,
        jvp_mode=call.jvp,
        estimate_error=checks.estimate_error,
        info=info,
        map_at_fixed_point=lambda state: update(state, steps - 1),
        spec=fwd.spec,
        max_backward_error=checks.max_backward_error,
        batch_dim=batch_dim,
        inverse_estimate=fwd.inverse_estimate
        if shine.uses_estimate(call.how, call.fallback) else None,
        autocast_eps=_autocast_eps(fwd.h_out),
    )


def _autocast_eps(leaves: Sequence[torch.Tensor]) -> float:
    """Unit round-off of the dtype autocast runs the map's products in, 0 without autocast:
    the backward's tests of J v and of a Krylov breakdown allow for it."""
    device = leaves[0].device.type if leaves else "cpu"
    try:
        if not torch.is_autocast_enabled(device):
            return 0.0
        return float(torch.finfo(torch.get_autocast_dtype(device)).eps)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return 0.0


def _info(method: str, steps: int, truncate: int, m: forward.Measured | None) -> FixedPointInfo:
    """The :class:`FixedPointInfo` of a call, from what the forward measured: the one place its
    forward fields are written (the backward appends to ``info.backward`` later)."""
    assert m is not None  # every forward path records what it measured
    return FixedPointInfo(
        method=method, steps=steps, truncate=truncate, forward_trace=m.forward_trace,
        relative_forward_trace=m.relative_forward_trace,
        final_difference=m.final_difference,
        relative_final_difference=m.relative_final_difference, solver=m.solver,
        forward_steps=m.forward_steps, forward_residual=m.forward_residual,
        tol_reached=m.tol_reached, best_iterate=m.best_iterate,
        solver_fallbacks=m.solver_fallbacks, row_updates=m.row_updates,
    )


# The keyword options and their defaults, read off the signature (the names are written once,
# there): an option equal to its default needs no check, so the common call checks only the
# four arguments every call sets.
_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (name, p.default) for name, p in inspect.signature(fixed_point).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


class _Stop(NamedTuple):
    """The forward's stopping rule: the solver value's own, or the ``tol`` shortcut."""

    tol: float | None = None
    tol_mode: str = "relative"
    check_every: int = 1
    best_iterate: bool = False


class _Call(NamedTuple):
    """A checked call: the method, fallback and forward solver values, the stopping rule, the
    checks and how J v is obtained."""

    how: methods.Method
    fallback: Any
    solver: forward.ForwardSolver
    stop: _Stop
    checks: Checks
    jvp: str


_NO_STOP = _Stop()


def _validate(o: dict[str, Any]) -> _Call:
    """Refuse every invalid option of :func:`fixed_point` and every combination that cannot run
    or would be ignored: the one place options are checked, for :func:`fixed_point` at its call
    and :class:`rbp.FixedPoint` at construction (:func:`check_options`). ``o``: the arguments
    by name (``f``, ``steps``, ``method``, ``truncate`` and every keyword option). The values
    (solvers, methods, :class:`rbp.Checks`) have checked their own options when built.

    A wrong type is a TypeError, a wrong value (or combination) a ValueError; each message names
    the option.
    """
    method = o["method"]
    _validate_core(o["f"], o["steps"], method, o["truncate"])
    given = any(o[name] is not default for name, default in _DEFAULTS)
    if given:
        _validate_options(o)
    how = methods.resolve(method, truncate=o["truncate"])
    if not isinstance(method, str):  # a value carries its own backward options
        methods.check_string_options(method, truncate=o["truncate"])
    if isinstance(how, methods.TBPTT):
        how.graph_steps(o["steps"])  # k <= steps
    checks = DEFAULT_CHECKS if o["checks"] is None else o["checks"]
    fallback = None if checks.fallback is None else methods.resolve_fallback(
        checks.fallback, truncate=o["truncate"])
    solver = forward.as_solver(o["solver"])
    shine.check_forward(how, fallback, solver)
    stop = _stopping(solver, o["tol"]) if given else _NO_STOP
    jvp = _jvp_mode(how, fallback)
    if given:
        _refuse_combinations(o, how, checks, solver, stop)
    return _Call(how, fallback, solver, stop, checks, jvp)


def _stopping(solver: Any, tol: float | None) -> _Stop:
    """The stopping rule of ``solver`` (a :class:`rbp.forward.Stopping` value carries one),
    with the ``tol`` shortcut filled in; both a ``tol`` and a solver's own is refused."""
    if not isinstance(solver, forward.Stopping):
        return _NO_STOP if tol is None else _Stop(tol)
    if tol is not None and solver.tol is not None:
        raise ValueError(
            f"tol={tol!r} with solver={solver!r}, which has its own tol={solver.tol!r}: give the "
            "tolerance once (on the solver value, or as tol= with a solver name or a value "
            "without one)"
        )
    return _Stop(solver.tol if tol is None else tol, solver.tol_mode, solver.check_every,
                 solver.best_iterate)


def _jvp_mode(how: methods.Method, fallback: Any) -> str:
    """How ``J v`` is obtained: the ``jvp`` of the backward solvers that need ``J v`` (CG)."""
    solver = getattr(how, "solver", None) if how.implicit else None
    if fallback is None:  # the common case, without the set
        return str(getattr(solver, "jvp", "double_vjp")) if getattr(
            solver, "needs_jvp", False) else "double_vjp"
    modes = {str(getattr(s, "jvp", "double_vjp")) for s in (solver, fallback)
             if s is not None and getattr(s, "needs_jvp", False)}
    if len(modes) > 1:
        raise ValueError(
            f"the method ({solver!r}) and the fallback ({fallback!r}) obtain J v differently "
            "(jvp='double_vjp' and jvp='func'); give them the same jvp"
        )
    return modes.pop() if modes else "double_vjp"


def _validate_core(f: Any, steps: Any, method: Any, truncate: Any) -> None:
    """The arguments every call sets: f, steps, method and truncate."""
    if (
        type(steps) is int and type(truncate) is int and steps >= 1 and truncate >= 1
        and callable(f) and (not isinstance(method, str) or method in IMPLICIT_METHODS
                             or method == "bptt" or (method == "tbptt" and truncate <= steps))
    ):
        return  # the common case, accepted in one test; the checks below name what is wrong
    if not callable(f):
        raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
    if isinstance(method, str) and method not in METHODS:  # values check themselves
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("steps", steps), ("truncate", truncate)):
        _count(name, value)
    if method == "tbptt" and truncate > steps:
        raise ValueError(
            f"tbptt cannot back-propagate through truncate={truncate} steps of a "
            f"{steps}-step run; use truncate <= steps (truncate == steps is bptt)"
        )


def _validate_options(o: dict[str, Any]) -> None:
    """Types and ranges of the keyword options (their defaults are valid)."""
    for name in ("time_varying", "return_info"):
        if not isinstance(o[name], bool):
            raise TypeError(f"{name} must be True or False, got {o[name]!r}")
    tol = o["tol"]
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol must be positive (a number) or None, got {tol!r}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be positive and finite, or None (no test), got {tol!r}")
    if o["checks"] is not None and not isinstance(o["checks"], Checks):
        raise TypeError(
            "checks must be an rbp.Checks(settle_tol=..., max_backward_error=..., "
            f"on_failure=..., fallback=..., estimate_error=..., trace=...) or None, got "
            f"{o['checks']!r}"
        )
    if o["last_step"] is not None and not callable(o["last_step"]):
        raise TypeError(f"last_step must be callable or None, got {type(o['last_step']).__name__}")
    if o["last_step"] is not None and isinstance(o["inputs"], (tuple, list)):
        _check_arity(o["last_step"], 1 + len(o["inputs"]))
    batch_dim = o["batch_dim"]
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
        raise TypeError(f"batch_dim must be an integer dim or None, got {batch_dim!r}")
    if not isinstance(o["inputs"], (tuple, list)):
        raise TypeError(
            "inputs must be a tuple or list (passed to f as f(h, *inputs)), got "
            f"{type(o['inputs']).__name__}"
        )


def _refuse_combinations(o: dict[str, Any], how: methods.Method, checks: Checks,
                         solver: Any, stop: _Stop) -> None:
    """Options that cannot run together, or that the chosen method or solver would ignore."""
    if not how.implicit:  # bptt / tbptt back-propagate through the forward updates
        for name, value in (("fallback", checks.fallback),
                            ("estimate_error", checks.estimate_error or None)):
            if value is not None:
                _ignored(name, value, f"configures the implicit backward "
                         f"solve; method {how.name!r} back-propagates through the forward "
                         "updates")
        _refuse_unrolled(how.name, solver, o["batch_dim"], stop.best_iterate)
    elif not how.accurate and checks.fallback is not None:  # JFB, Phantom
        _ignored("fallback", checks.fallback, f"re-solves a failed backward solve; {how!r} is "
                 "inexact by design and never fails (use an exact method, e.g. 'gmres', to "
                 "have its error checked)")
    if o["time_varying"] and (not isinstance(solver, forward.Iterate)
                              or o["batch_dim"] is not None):
        raise ValueError(
            "time_varying=True changes the map every step, so it runs with solver='iterate' "
            f"and batch_dim=None only (got solver={forward.solver_name(solver)!r}, "
            f"batch_dim={o['batch_dim']!r})"
        )


def _refuse_unrolled(method: str, solver: Any, batch_dim: Any, best: bool) -> None:
    """bptt / tbptt keep the graph of the updates themselves: plain or damped iteration on the
    whole batch only (refused whether grad is on or not, so that a model refused in training is
    refused in evaluation too, and :class:`rbp.FixedPoint` can refuse it at construction)."""
    if not isinstance(solver, forward.Iterate):
        raise ValueError(
            f"method={method!r} back-propagates through the forward updates, which it can "
            "do for solver='iterate' (plain or damped) only, not "
            f"{forward.solver_name(solver)!r}; use an implicit method (e.g. 'neumann', "
            "'gmres') with an accelerated solver"
        )
    for name, value in (("batch_dim", batch_dim), ("best_iterate", best or None)):
        if value is not None:
            what = "batch_dim" if name == "batch_dim" else "the solver's best_iterate"
            raise ValueError(
                f"method={method!r} with {what}={value!r} is not supported: it would "
                "remove samples or iterates from a graph being back-propagated; use an "
                f"implicit method, or {name}={'None' if name == 'batch_dim' else 'False'}"
            )


def _check_arity(last_step: Callable[..., State], n: int) -> None:
    """``last_step`` is called as ``last_step(h, *inputs)``: refuse one that cannot take that."""
    try:
        sig = inspect.signature(last_step)
    except (TypeError, ValueError):  # a builtin without a signature: let the call tell
        return
    try:
        sig.bind(*([None] * n))
    except TypeError:
        raise TypeError(
            f"last_step is called as last_step(h, *inputs), with {n} argument(s) here, but its "
            f"signature is {sig}; give it the state and each of inputs, as f gets them"
        ) from None


def _ignored(name: str, value: Any, what: str) -> None:
    raise ValueError(f"Checks({name}={value!r}) would be ignored: {name} {what}")


def check_options(f: Any, steps: Any, method: Any = "neumann", truncate: Any = 20,
                  **options: Any) -> None:
    """Check the arguments of a future :func:`fixed_point` call without running it: the same
    :func:`_validate` as the call, so whatever the call would refuse is refused here."""
    try:
        bound = inspect.signature(fixed_point).bind(f, None, steps, method, truncate, **options)
    except TypeError as exc:
        raise TypeError(f"{exc}; see help(rbp.fixed_point) for its options") from None
    bound.apply_defaults()
    _validate(dict(bound.arguments))


def _refuse_bad_start(h0: State, exc: Exception) -> None:
    """Name ``h0`` when the start itself is the cause: NaN or inf in it, or the meta device
    (shapes, no values, which the forward's tests read; torch says 'Cannot copy out')."""
    leaves = tree.flatten(h0, "h0")[0]
    if any(leaf.device.type == "meta" for leaf in leaves):
        raise ValueError("fixed_point: h0 is on the meta device, which holds no values for the "
                         "forward's tests (finiteness, tol); start from a real tensor, e.g. "
                         "torch.zeros(shape, device='cpu')") from exc
    if not isinstance(exc, DivergenceError):
        return
    for i, leaf in enumerate(leaves):
        bad = int((~torch.isfinite(leaf.detach())).sum())
        if bad:
            where = f"h0 leaf {i}" if not isinstance(h0, torch.Tensor) else "h0"
            raise DivergenceError(
                f"fixed_point: {where} holds NaN or inf ({bad} of {leaf.numel()} entries), so "
                "the forward state cannot settle; start from finite values (e.g. zeros, or a "
                "warm start that did not diverge)") from exc


def _refuse_functorch() -> None:
    """The forward stops on data-dependent tests, which ``torch.func.vmap`` cannot batch."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack):
        raise RuntimeError(
            "rbp.fixed_point cannot run under torch.func.vmap: its forward tests the state "
            "(finiteness, tol) on the host. Stack the systems along one dim and pass "
            "batch_dim=... instead, or call fixed_point outside vmap."
        )
