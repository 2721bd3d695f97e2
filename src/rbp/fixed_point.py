"""Gradients through the steady state of a recurrence ``h_{t+1} = F(h_t)``.

:func:`fixed_point` runs ``steps`` updates of ``f`` and returns the last state ``h_T``, standing in
for ``h* = F(h*)`` (with ``tol`` it solves for ``h*`` instead, see :mod:`rbp.forward`). What
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
and ``rbp`` with ``rbp_init="zeros"`` and ``truncate=K+1`` equals both.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from rbp import forward, higher_order, methods, solvers, tree
from rbp.adjoint import Adjoint, attach_implicit_backward, functorch_active, refuse_functorch
from rbp.diagnostics import FixedPointInfo, report
from rbp.diagnostics import check_count as _count
from rbp.solvers import shine
from rbp.tree import State

METHODS: tuple[str, ...] = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")
IMPLICIT_METHODS: tuple[str, ...] = ("rbp", "cg", "neumann", "gmres")
OnFailure = Literal["raise", "warn", "ignore"]


def fixed_point(
    f: Callable[..., State],
    h0: State,
    steps: int,
    method: str | methods.Method = "neumann",
    truncate: int = 20,
    *,
    time_varying: bool = False,
    last_step: Callable[..., State] | None = None,
    tol: float | None = None,
    tol_mode: Literal["relative", "absolute"] = "relative",
    solver: str | forward.ForwardSolver = "iterate",
    batch_dim: int | None = None,
    inputs: Sequence[Any] = (),
    best_iterate: bool = False,
    check_every: int = 1,
    backward_tol: float | None = None,
    max_backward_error: float | None = 1e-2,
    settle_tol: float | None = 1e-3,
    on_failure: OnFailure = "warn",
    fallback: Any = None,
    rbp_init: Literal["uniform", "zeros"] = "zeros",
    jvp: Literal["double_vjp", "func"] = "double_vjp",
    restart: int = 30,
    trace: bool = False,
    estimate_error: bool = False,
    return_info: bool = False,
) -> State | tuple[State, FixedPointInfo]:
    """Run ``h_{t+1} = f(h_t)`` for ``steps`` updates; differentiate ``h_T`` by ``method``.

    Args:
        f: one update. Called ``f(h, *inputs)``, or ``f(h, t, *inputs)`` with
            ``t = 0 .. steps-1`` when ``time_varying``. It closes over its parameters (and
            inputs, unless passed as ``inputs``); every tensor with ``requires_grad`` it uses
            receives a gradient on ``backward()``. It must not modify ``h`` in place. An ``f``
            that uses nothing requiring grad returns a state that does not require grad.
        h0: initial state: a floating tensor or a tuple/list/dict of them. Only ``bptt``
            differentiates with respect to ``h0`` (at a fixed point it does not matter).
        steps: number of forward updates T >= 1; with ``tol`` (or another solver) the most
            evaluations of ``f`` the forward solve may spend.
        method: one of :data:`METHODS`, or a value: ``rbp.BPTT()``, ``rbp.TBPTT(k)``,
            ``rbp.Implicit(solver)`` (``solver`` from :mod:`rbp.solvers` or your own with
            ``solve(matvec, b)``), ``rbp.JFB()``, ``rbp.Phantom(k, damping)``. A value carries
            its own options; ``truncate``, ``backward_tol``, ``rbp_init`` and ``restart`` apply
            to the string names.
        truncate: K. tbptt: the number of steps back-propagated (1 <= K <= steps);
            implicit methods: the number of backward iterations (Jacobian-vector products).
        time_varying: pass the step index to ``f`` (e.g. a fresh mini-batch per step).
        last_step: map used for the final update ``h_T = last_step(h_{T-1})`` by every
            method, so it is the map whose Jacobian the implicit methods invert (e.g. the
            full-batch step of a training run). Default: ``f`` at step ``T-1``.
        tol: forward tolerance: stop once ``||F(h) - h|| <= tol * ||F(h)||`` (``tol_mode=
            "relative"``) or ``<= tol`` (``"absolute"``), returning ``F(h)``; not reaching it
            within ``steps`` is reported per ``on_failure``. ``None``: run all ``steps``.
        tol_mode: ``"relative"`` or ``"absolute"`` (see ``tol``; refused without ``tol``).
        solver: forward solver: ``"iterate"`` (plain, or :class:`rbp.Iterate` with damping),
            ``"anderson"`` / :class:`rbp.Anderson`, ``"broyden"`` / :class:`rbp.Broyden`. The
            accelerated solvers run without a graph; the implicit methods then linearise at the
            state they stop at. bptt/tbptt back-propagate through ``"iterate"`` only. Your own
            solver: a value with ``name`` and ``init(x, max_evals)`` whose state has
            ``step(x, fx, g)`` and ``keep(rows)`` (:mod:`rbp.forward.protocol`); it runs per
            sample like the built-in ones.
        batch_dim: the dim of every state leaf (and input) that indexes independent samples:
            each sample stops when it has converged and is removed from later calls of ``f``,
            which then receives only the live samples (and the matching rows of ``inputs``).
            ``f`` must treat samples independently; one sub-batch check refuses one that does
            not. ``None`` (default): the state is one system.
        inputs: tensors passed to ``f`` after the state; with ``batch_dim`` they are sliced to
            the live samples along ``batch_dim``.
        best_iterate: return, per sample, the lowest-residual iterate the solve visited (and
            linearise there); flagged in ``info.best_iterate``.
        check_every: test the stopping rule (one host synchronisation) every N iterations
            (refused without ``tol``).
        backward_tol: stop a backward iteration early once its increment (or residual) is at
            most ``backward_tol * ||g||``; ``None`` always runs ``truncate`` iterations.
        settle_tol: implicit methods assume a steady state; if
            ``||h_T - h_{T-1}|| > settle_tol * ||h_T||`` this is reported per ``on_failure``.
            The ratio is checked per sample: with ``batch_dim``, per sample (all leaves of it
            together); without, per index of dim 0 of every state leaf of two or more dims (a
            batch-first state is checked sample by sample; a 2-D state that is one system is
            checked row by row, each row's norm floored at the rms row norm so that a row near
            zero is not held to its own scale) and over the whole leaf for a leaf of fewer
            dims. With ``tol_mode="absolute"`` a row whose ``||h_T - h_{T-1}|| <= tol`` counts as
            settled (a fixed point at zero has no meaningful relative change). The worst ratio
            is ``info.worst_relative_difference``. ``None`` disables the check.
        on_failure: what to do when the forward has not settled or a backward solve grows,
            stalls or diverges: ``"raise"`` (:class:`DivergenceError`), ``"warn"``
            (:class:`ConvergenceWarning`) or ``"ignore"``. A non-finite forward state always
            raises.
        max_backward_error: report (per ``on_failure``) an implicit solve whose a-posteriori
            estimate of the relative error ``||z_K - z|| / ||z_K||`` of the adjoint exceeds
            this (Neumann / RBP: the series' tail extrapolated from its last increments, Ritz
            values included; CG / GMRES: the true relative residual divided by a Krylov
            estimate of ``sigma_min(I - J^T)``; user solvers: the true relative residual of
            their ``z``, re-measured by the core). What it guarantees and where it can fail:
            ``docs/guarantees.md``. ``None``: check statuses only. JFB and phantom gradients
            are inexact by design and never checked (an unstable fixed point is still
            reported for them).
        fallback: a backward solver (name or :mod:`rbp.solvers` value) to re-solve with when
            the backward solve fails or exceeds ``max_backward_error`` (e.g. ``"gmres"``); the
            failure is then a warning, unless the fallback fails too (then per ``on_failure``).
        rbp_init: initial guess z_0 of ``rbp``: ``"zeros"`` (default: the gradient is linear
            in the loss, zero for a zero loss) or ``"uniform"`` (U[0,1], the paper's Alg. 1).
        jvp: how ``cg`` obtains ``J v``: ``"double_vjp"`` (reverse-over-reverse on the graph of
            the last step) or ``"func"`` (forward mode, ``torch.func.jvp``). Refused for a
            method (and fallback) that needs no ``J v``.
        restart: GMRES restart length (refused unless ``method`` or ``fallback`` is
            ``"gmres"``).
        trace: record ``||h_t - h_{t-1}||`` for every step in the info (``forward_trace``; for a
            solver ``||F(x_k) - x_k||`` per iteration) and the same divided by ``||h_t||``
            (``||F(x_k)||``) in ``relative_forward_trace``.
        estimate_error: in the backward pass, estimate ``||J||`` by power iteration and store
            the Prop. 2 bound on the relative error of the solve in the info (costs ~20
            Jacobian products per backward).
        return_info: return ``(h_T, info)`` with a :class:`FixedPointInfo`.

    Every option is checked before anything runs (TypeError for a wrong type, ValueError for a
    wrong value); an option the chosen method or solver would not use is refused, not ignored:
    bptt/tbptt refuse ``backward_tol``, ``fallback``, ``estimate_error``, ``batch_dim``,
    ``best_iterate`` and an accelerated solver. (``truncate`` with ``"bptt"``, ``rbp_init``
    with another method, and ``settle_tol`` / ``max_backward_error`` with bptt/tbptt are
    accepted so that one call can sweep the methods; they have no effect there.)

    Returns:
        ``h_T`` (same structure as ``h0``), or ``(h_T, info)``.
    """
    arguments = dict(locals())
    how, fallback_solver, solver = _validate(arguments)  # the one place options are checked
    transformed = functorch_active()  # one cheap test; the messages only under a transform
    if transformed and how.implicit and torch.is_grad_enabled():
        refuse_functorch(how.name)  # all but torch.func.jvp
        with torch.no_grad():  # jvp: the tangent is solved for; no reverse graph inside it
            return fixed_point(**arguments)
    method = how.name  # what the info and the messages see; the forward gets the value
    if isinstance(how, methods.TBPTT):
        truncate = how.k
    if transformed:
        _refuse_functorch()

    grad_on = torch.is_grad_enabled()
    implicit = grad_on and how.implicit
    second_order = implicit and getattr(how, "second_order", False)
    since = higher_order.sequence_mark() if second_order else 0
    fwd = forward.run(
        f, h0, steps, method=how, time_varying=time_varying, last_step=last_step, tol=tol,
        tol_mode=tol_mode, solver=solver, batch_dim=batch_dim, inputs=inputs,
        best_iterate=best_iterate, check_every=check_every, trace=trace,
    )
    info = _info(method, steps, truncate, fwd.measured)
    h, h_in_leaves, out_leaves, spec = fwd.h, fwd.h_in, fwd.h_out, fwd.spec
    if tol is not None:
        message = forward.unreached_message(info, tol, tol_mode, steps)
        if message is not None:
            report(on_failure, message)

    if implicit:
        info.worst_relative_difference = forward.worst_ratio(
            fwd.rows, info.relative_final_difference)
        if settle_tol is not None and info.worst_relative_difference > settle_tol:
            message = forward.unsettled_message(fwd.rows, info, settle_tol, tol, tol_mode,
                                                batch_dim)
            if message is not None:
                report(on_failure, f"fixed_point: {message}")
    adjoint = None
    if implicit or (how.implicit and higher_order.forward_mode_active()):
        if fwd.update is None:  # no graph was kept (grad off): forward mode only
            fwd.update = forward.step_map(f, steps, time_varying, last_step, inputs)
        update = fwd.update
        adjoint = Adjoint(
            method=how,
            fallback=fallback_solver,
            on_failure=on_failure,
            jvp_mode=jvp,
            estimate_error=estimate_error,
            info=info,
            map_at_fixed_point=lambda state: update(state, steps - 1),
            spec=spec,
            max_backward_error=max_backward_error,
            batch_dim=batch_dim,
            inverse_estimate=fwd.inverse_estimate
            if shine.uses_estimate(how, fallback_solver) else None,
        )
    if implicit:
        assert adjoint is not None
        if second_order:
            out_leaves = higher_order.attach(h_in_leaves, out_leaves, adjoint, inputs, since)
        else:
            out_leaves = attach_implicit_backward(h_in_leaves, out_leaves, adjoint)
        h = tree.unflatten(spec, out_leaves)
    if adjoint is not None and higher_order.forward_mode_active():
        h = tree.unflatten(spec, higher_order.implicit_tangent(adjoint, tree.flatten(h)[0]))
    return (h, info) if return_info else h


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
_CHOICES: dict[str, tuple[str, ...]] = {
    "tol_mode": ("relative", "absolute"),
    "on_failure": ("raise", "warn", "ignore"),
    "rbp_init": ("uniform", "zeros"),
    "jvp": ("double_vjp", "func"),
}


def _validate(o: dict[str, Any]) -> tuple[methods.Method, Any, forward.ForwardSolver]:
    """Refuse every invalid option of :func:`fixed_point` and every combination that cannot run
    or would be ignored: the one place options are checked, for :func:`fixed_point` at its call
    and :class:`rbp.FixedPoint` at construction (:func:`check_options`). ``o``: the arguments
    by name (``f``, ``steps``, ``method``, ``truncate`` and every keyword option).

    A wrong type is a TypeError, a wrong value (or combination) a ValueError; each message names
    the option. Returns the method value, the fallback solver (or ``None``) and the forward
    solver value.
    """
    method = o["method"]
    _validate_core(o["f"], o["steps"], method, o["truncate"])
    given = any(o[name] is not default for name, default in _DEFAULTS)
    if given:
        _validate_options(o)
    how = methods.resolve(method, truncate=o["truncate"], tol=o["backward_tol"],
                          rbp_init=o["rbp_init"], restart=o["restart"])
    if not isinstance(method, str):  # a value carries its own backward options
        methods.check_string_options(method, truncate=o["truncate"],
                                     backward_tol=o["backward_tol"], rbp_init=o["rbp_init"],
                                     restart=o["restart"])
    if isinstance(how, methods.TBPTT):
        how.graph_steps(o["steps"])  # k <= steps
    fallback = None if o["fallback"] is None else methods.resolve_fallback(
        o["fallback"], truncate=o["truncate"], tol=o["backward_tol"], rbp_init=o["rbp_init"],
        restart=o["restart"])
    solver = forward.as_solver(o["solver"])
    shine.check_forward(how, fallback, solver)
    if given:
        _refuse_combinations(o, how, fallback, solver)
    return how, fallback, solver


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
    for name in ("restart", "check_every"):
        _count(name, o[name])
    for name in ("time_varying", "best_iterate", "trace", "estimate_error", "return_info"):
        if not isinstance(o[name], bool):
            raise TypeError(f"{name} must be True or False, got {o[name]!r}")
    for name in ("tol", "backward_tol", "max_backward_error", "settle_tol"):
        value = o[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be positive (a number) or None, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{name} must be positive and finite, or None (no test), got {value!r}"
            )
    for name, allowed in _CHOICES.items():
        value = o[name]
        if value not in allowed or not isinstance(value, str):
            error = ValueError if isinstance(value, str) else TypeError
            raise error(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    fallback = o["fallback"]
    if isinstance(fallback, str) and fallback not in IMPLICIT_METHODS:
        raise ValueError(
            f"fallback must be one of {', '.join(IMPLICIT_METHODS)} (a backward solver: the "
            f"forward graph is gone by then), got {fallback!r}"
        )
    if fallback is not None and not isinstance(fallback, str) and not (
            solvers.is_solver(fallback) or isinstance(fallback, methods.Implicit)):
        raise TypeError(
            "fallback must be a backward solver name (rbp, cg, neumann, gmres) or a solver "
            f"value such as rbp.solvers.GMRES(), got {type(fallback).__name__}"
        )
    if o["last_step"] is not None and not callable(o["last_step"]):
        raise TypeError(f"last_step must be callable or None, got {type(o['last_step']).__name__}")
    batch_dim = o["batch_dim"]
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
        raise TypeError(f"batch_dim must be an integer dim or None, got {batch_dim!r}")
    if not isinstance(o["inputs"], (tuple, list)):
        raise TypeError(
            "inputs must be a tuple or list (passed to f as f(h, *inputs)), got "
            f"{type(o['inputs']).__name__}"
        )


def _refuse_combinations(o: dict[str, Any], how: methods.Method, fallback: Any,
                         solver: Any) -> None:
    """Options that cannot run together, or that the chosen method or solver would ignore."""
    # the string names that the shortcut options configure
    named = [name for name in (o["method"], o["fallback"]) if isinstance(name, str)]
    if o["restart"] != 30 and "gmres" not in named:
        _ignored("restart", o["restart"], "is the restart length of gmres (method='gmres' or "
                 "fallback='gmres')")
    uses_jvp = how.implicit and bool(getattr(how, "needs_jvp", False))
    if o["jvp"] != "double_vjp" and not (uses_jvp or getattr(fallback, "needs_jvp", False)):
        _ignored("jvp", o["jvp"], "is how cg obtains J v (method='cg' or fallback='cg'); "
                 f"method {how.name!r} needs no J v")
    if o["tol"] is None:
        for name, default in (("tol_mode", "relative"), ("check_every", 1)):
            if o[name] != default:
                _ignored(name, o[name], "configures the forward's stopping test, which runs "
                         "only with tol=...; set tol or leave it out")
    if not how.implicit:  # bptt / tbptt back-propagate through the forward updates
        for name, default in (("backward_tol", None), ("fallback", None),
                              ("estimate_error", False)):
            if o[name] is not default and not (name == "backward_tol" and fallback is not None):
                _ignored(name, o[name], f"configures the implicit backward solve; method "
                         f"{how.name!r} back-propagates through the forward updates")
        _refuse_unrolled(how.name, solver, o["batch_dim"], o["best_iterate"])
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
            raise ValueError(
                f"method={method!r} with {name}={value!r} is not supported: it would "
                "remove samples or iterates from a graph being back-propagated; use an "
                f"implicit method, or {name}={'None' if name == 'batch_dim' else 'False'}"
            )


def _ignored(name: str, value: Any, what: str) -> None:
    raise ValueError(f"{name}={value!r} would be ignored: {name} {what}")


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


def _refuse_functorch() -> None:
    """The forward stops on data-dependent tests, which ``torch.func.vmap`` cannot batch."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack):
        raise RuntimeError(
            "rbp.fixed_point cannot run under torch.func.vmap: its forward tests the state "
            "(finiteness, tol) on the host. Stack the systems along one dim and pass "
            "batch_dim=... instead, or call fixed_point outside vmap."
        )
