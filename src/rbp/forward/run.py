"""The forward of :func:`rbp.fixed_point`: the paper's unroll, or a solve then one step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rbp import tree
from rbp.forward.iterate import Iterate
from rbp.forward.loop import solve
from rbp.forward.protocol import ForwardSolver, solver_name
from rbp.forward.result import Forward, _diff_norm, _norm, check_finite, measured
from rbp.forward.rows import (
    _slice_inputs,
    call_map,
    check_inputs,
    check_rows_independent,
    from_rows,
    layout,
    row_differences,
    to_rows,
)
from rbp.forward.unroll import _unroll_tensor, _unroll_to_tol, unroll
from rbp.tree import State

Tensor = torch.Tensor


def is_plain(solver: Any) -> bool:
    return isinstance(solver, Iterate) and solver.damping == 0.0


def step_map(
    f: Callable[..., State],
    steps: int,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    inputs: Sequence[Any],
) -> Callable[[State, int], State]:
    """The update at step t, ``F_t(h)``: ``last_step(h, *inputs)`` at ``t = steps - 1`` when
    given, else ``f(h, t, *inputs)`` (``time_varying``) or ``f(h, *inputs)``."""

    def update(h: State, t: int) -> State:
        if t == steps - 1 and last_step is not None:
            return last_step(h, *inputs)
        return f(h, t, *inputs) if time_varying else f(h, *inputs)

    return update


def run(
    f: Callable[..., State],
    h0: State,
    steps: int,
    *,
    method: Any,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    tol: float | None,
    tol_mode: str,
    solver: ForwardSolver,
    batch_dim: int | None,
    inputs: Sequence[Any],
    best_iterate: bool,
    check_every: int,
    trace: bool,
) -> Forward:
    """The forward of :func:`rbp.fixed_point`; what it measured is ``.measured``.

    ``method``: the method value (:mod:`rbp.methods`). An implicit one differentiates the fixed
    point (an adjoint is attached by the caller at ``(h_in, h_out)``); otherwise, with grad
    enabled, the method back-propagates through its ``graph_steps(steps)`` last updates (into
    ``h0`` too when ``method.keeps_h0``: bptt).
    """
    grad_on = torch.is_grad_enabled()
    implicit, name = method.implicit, method.name
    paper = tol is None and is_plain(solver) and batch_dim is None and not best_iterate
    graph_steps = method.graph_steps(steps) if grad_on else steps  # updates keeping a graph
    # back-propagating through every update (bptt, or tbptt with k = steps) reaches h0
    detach = grad_on and not (method.keeps_h0 or (not implicit and graph_steps >= steps))
    if (
        paper and not trace and not time_varying and last_step is None
        and isinstance(h0, Tensor) and h0.is_floating_point() and isinstance(inputs, tuple)
    ):  # the paper's setting on a tensor state: what most training steps run
        fwd, diff, scale = _unroll_tensor(
            f, h0, inputs, steps, graph_steps, detach=detach,
            require_grad_input=grad_on and implicit, method=name,
        )
        fwd.measured = measured(solver_name(solver), diff, scale, [], steps, diff, steps)
        fwd.update = step_map(f, steps, time_varying, last_step, inputs)
        return _constant_if_nothing_to_differentiate(fwd)
    h0_leaves, spec = tree.flatten(h0, "h0")
    batch = layout(h0_leaves, spec, batch_dim).batch if batch_dim is not None else None
    inputs, in_dims = check_inputs(inputs, batch_dim, batch)

    update = step_map(f, steps, time_varying, last_step, inputs)

    def step(h: State, t: int) -> State:
        return call_map(update, h, t)

    if paper:
        fast = None
        if not time_varying:
            fast = (lambda h: f(h, *inputs)) if inputs else f
        fwd, diffs, scale, scales = unroll(
            step, h0, steps, graph_steps, detach=detach,
            require_grad_input=grad_on and implicit, trace=trace, method=name, fast=fast,
        )
        fwd.measured = measured(solver_name(solver), diffs[-1], scale, diffs if trace else [],
                                steps, diffs[-1], steps, trace_scales=scales)
        fwd.update = update
        return _constant_if_nothing_to_differentiate(fwd)

    if grad_on and not implicit:
        window = None if method.keeps_h0 else graph_steps
        return _unroll_to_tol(step, h0, steps, name, window, tol, tol_mode, solver,
                              check_every, trace)
    fwd = _solve_then_step(step, f, h0, steps, name, implicit and grad_on, time_varying,
                           last_step, tol, tol_mode, solver, batch_dim, inputs, in_dims,
                           best_iterate, check_every, trace)
    fwd.update = update
    return _constant_if_nothing_to_differentiate(fwd)


def _constant_if_nothing_to_differentiate(fwd: Forward) -> Forward:
    """Detach ``h_out`` when its graph reaches no leaf but ``h_in`` (f uses no parameter).

    Then, as for any function of constants, the returned state does not require grad, instead
    of carrying an adjoint that would deliver gradients to nobody. The graph of the one step is
    walked on every call (it stops at the first parameter, ~1.5 us on a small map): a cache
    keyed by the map's code was wrong for two closures of one factory, one using a parameter.
    """
    outs = fwd.h_out
    if not fwd.h_in or not (outs[0].requires_grad or any(o.requires_grad for o in outs)):
        return fwd
    own = {id(leaf) for leaf in fwd.h_in}
    if any(o.requires_grad and o.grad_fn is None and id(o) not in own for o in outs):
        return fwd  # f returned a parameter itself (a leaf: no graph to walk)
    seen: set[int] = set()
    todo = [o.grad_fn for o in fwd.h_out if o.grad_fn is not None]
    while todo:
        for nxt, _ in todo.pop().next_functions:
            if nxt is None or id(nxt) in seen:
                continue
            seen.add(id(nxt))
            if type(nxt) is torch._C._functions.AccumulateGrad:  # a leaf: h_in or a weight
                if id(nxt.variable) not in own:  # reaches a parameter or an input: keep
                    return fwd
            else:
                todo.append(nxt)
    out = [o.detach() for o in fwd.h_out]
    return Forward(tree.unflatten(fwd.spec, out), [], out, fwd.spec, fwd.update, fwd.rows,
                   fwd.measured)


def _solve_then_step(
    step: Callable[[State, int], State],
    f: Callable[..., State],
    h0: State,
    steps: int,
    method: str,
    attach: bool,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    tol: float | None,
    tol_mode: str,
    solver: ForwardSolver,
    batch_dim: int | None,
    inputs: Sequence[Any],
    in_dims: Sequence[int],
    best_iterate: bool,
    check_every: int,
    trace: bool,
) -> Forward:
    """Solve without a graph, then apply the map once more at the returned iterate ``h_in``."""
    h0_leaves, spec = tree.flatten(h0, "h0")
    lay = layout(h0_leaves, spec, batch_dim)
    calls = [0]
    expected: dict[int, list[Tensor]] = {}

    def fmap(x: Tensor, rows: Tensor | None) -> Tensor:
        leaves = from_rows(x, lay)
        h = tree.unflatten(spec, leaves)
        args = _slice_inputs(inputs, in_dims, rows)
        out = call_map(f, h, calls[0], *args) if time_varying else call_map(f, h, *args)
        calls[0] += 1
        if x.shape[0] not in expected:  # first call at this batch size: check fully
            tree.check_same_structure(spec, leaves, out, calls[0] - 1)
            expected[x.shape[0]] = leaves
        return to_rows(tree.flatten(out)[0], lay)

    x0 = to_rows([leaf.detach() for leaf in h0_leaves], lay)
    with torch.no_grad():
        fx0 = fmap(x0, None)
    if batch_dim is not None:
        check_rows_independent(fmap, x0, fx0, batch_dim)
    rs = solve(fmap, x0, solver, max_evals=steps, tol=tol, tol_mode=tol_mode,
               check_every=check_every, best_iterate=best_iterate, trace=trace, fx0=fx0,
               what="fixed_point")
    h_in = [leaf.detach() for leaf in from_rows(rs.x, lay)]
    if attach:
        h_in = [leaf.requires_grad_() for leaf in h_in]
    if attach or last_step is not None:
        t = steps - 1
        with torch.set_grad_enabled(attach):
            out = step(tree.unflatten(spec, h_in), t)
        out_leaves = tree.check_same_structure(spec, h0_leaves, out, t)
    else:
        out_leaves = from_rows(rs.fx, lay)
    check_finite(out_leaves, method, max(rs.evaluations))
    diff = _diff_norm(out_leaves, h_in).item()
    rows = row_differences(out_leaves, h_in, lay) if attach else None
    one = (lambda v: v) if batch_dim is not None else (lambda v: v[0])  # per sample, or not
    record = measured(
        solver_name(solver), diff, _norm(out_leaves), rs.trace, one(rs.evaluations),
        one(rs.residual), rs.row_updates, tol_reached=None if tol is None else one(rs.reached),
        best_iterate=one(rs.best), solver_fallbacks=rs.fallbacks,
        trace_scales=rs.scale_trace)
    return Forward(tree.unflatten(spec, out_leaves), h_in if attach else [], out_leaves, spec,
                   rows=rows, measured=record, inverse_estimate=rs.estimate)
