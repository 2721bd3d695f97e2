"""Second derivatives through an implicit fixed point (``Implicit(solver, second_order=True)``).

The first-order adjoint (:mod:`rbp.adjoint`) hands ``z = (I - J^T)^{-1} g`` to the graph of one
step at a detached ``h_{T-1}``: right for ``backward()``, but that graph does not know that
``h*`` depends on the parameters, and the solve itself is not differentiable. Here the last
state is instead the output of a node whose inputs are the tensors ``C`` that ``f`` uses (its
parameters, and the ``inputs``), and whose backward is written in differentiable operations:

    h*  = node(C)                              (its backward is this same construction)
    y   = F(h*, C)                             (one step, with a graph through h* and C)
    z   = g + J(h*, C)^T z                     (solved by the method's solver; differentiated
                                                implicitly: the cotangent v of z becomes
                                                u = (I - J)^{-1} v, one more solve)
    dL/dC = z^T dF/dC (h*, C)

so ``backward(create_graph=True)`` (gradient penalties, hypergradients of hypergradients,
Hessian-vector products) gives the derivatives of the exact implicit gradient, at the memory of
two graphs of one step, whatever the number of forward steps. Third derivatives are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from rbp import tree
from rbp.adjoint import Adjoint
from rbp.forward.rows import describe, from_rows, to_rows
from rbp.jacobian import check_jvp, check_same_map
from rbp.linear import AdjointOperator

Tensor = torch.Tensor


def sequence_mark() -> int:
    """The autograd sequence number the next node will get (nodes made before are older)."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True).clone()
    return probe.grad_fn._sequence_nr() + 1


class _Reads(TorchFunctionMode):
    """Records the non-leaf tensors passed to torch functions, by (grad_fn, output_nr)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[tuple[int, int], tuple[Tensor, Any]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.grad_fn is not None:
                _remember(self.tensors, t)
        return func(*args, **(kwargs or {}))


def _remember(table: dict[tuple[int, int], tuple[Tensor, Any]], t: Tensor) -> None:
    """Key ``t`` by its node; the node's Python object is kept alive with it, so that its id
    stays its own (the object of a node is cached only while it lives)."""
    node = t.grad_fn
    table[(id(node), t.output_nr)] = (t, node)


def closure_tensors(h_out: list[Tensor], h_in: list[Tensor], inputs: Sequence[Any],
                    since: int, step: Callable[[list[Tensor]], Any]) -> list[Tensor]:
    """The tensors requiring grad that the step ``h_out = F(h_in)`` reads from outside: the
    leaves its graph reaches (parameters), the ``inputs``, and the tensors computed before the
    call that ``f`` reads through its closure (``x = encoder(data)``; found by running ``step``
    once more, recording what it reads). Gradients then reach each as autograd would."""
    known: dict[tuple[int, int], tuple[Tensor, Any]] = {}
    for t in inputs:
        if isinstance(t, Tensor) and t.grad_fn is not None:
            _remember(known, t)
    state = {id(t) for t in h_in}
    found: dict[int, Tensor] = {}
    seen: dict[int, Any] = {}  # holds the nodes, so that no id is reused during the walk
    stack = [(o.grad_fn, o.output_nr) for o in h_out if o.grad_fn is not None]
    recorded = False
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad: a leaf
            if id(variable) not in state:
                found[id(variable)] = variable
            continue
        if node._sequence_nr() < since:  # made before the call: a tensor read from outside
            if (id(node), nr) not in known and not recorded:
                with torch.no_grad(), _Reads() as reads:
                    step([t.detach() for t in h_in])
                known.update(reads.tensors)
                recorded = True
            if (id(node), nr) not in known:
                raise ValueError(
                    "second_order=True: f reads a tensor computed before the fixed_point call "
                    f"(through {node.name()}) that could not be identified; pass it as "
                    "fixed_point(..., inputs=(x,)) and take it as an argument of f (f(h, x))"
                )
            t = known[(id(node), nr)][0]
            found[id(t)] = t
            continue
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.next_functions)
    return list(found.values())


@dataclass
class _Plan:
    """What a fixed-point node needs in its backward."""

    adjoint: Adjoint
    step: Callable[[State], State]  # F at the fixed point, reading the closure tensors
    spec: Any
    closure: list[Tensor]
    at: list[Tensor]  # h_{T-1}: where J is taken
    out: list[Tensor]  # the node's value, F(h_{T-1})
    graph: tuple[list[Tensor], list[Tensor]] | None = None  # the forward's (h_in, F(h_in))
    f_at: list[Tensor] | None = None  # the forward's F(h_{T-1}), when ``out`` is not it


State = Any


class _FixedPointNode(torch.autograd.Function):
    """``h* = node(C)``: value ``plan.out``; backward ``z^T dF/dC`` with ``z = (I-J^T)^{-1} g``,
    differentiable when autograd builds a graph of it."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *closure: Tensor) -> tuple[Tensor, ...]:
        ctx.plan = plan
        return tuple(v.clone() for v in plan.out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        g = [torch.zeros_like(o) if gi is None else gi for gi, o in zip(grads, plan.out,
                                                                          strict=True)]
        if torch.is_grad_enabled():
            return (None, *_differentiable_gradient(plan, g))
        if plan.graph is not None and all(c.grad_fn is None for c in plan.closure):
            h_in, h_out = plan.graph  # leaves only: the partials are the forward graph's
            wrt = plan.closure
        else:  # the partials, at the others held fixed, through detached stand-ins
            wrt = [c.detach().requires_grad_(True) for c in plan.closure]
            with torch.enable_grad():
                h_in = [a.detach().requires_grad_(True) for a in plan.at]
                h_out = _step(plan, h_in, wrt)
        z = plan.adjoint.solve(h_in, h_out, g)
        return (None, *_grad(h_out, wrt, z, create_graph=False))


class _Substitute(TorchFunctionMode):
    """Runs code with some tensors replaced (by identity) wherever torch functions read them."""

    def __init__(self, table: dict[int, Tensor]) -> None:
        super().__init__()
        self.table = table
        self.hits: set[int] = set()  # ids of the tensors replaced at least once

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        def swap(t: Any) -> Any:
            if isinstance(t, Tensor) and id(t) in self.table:
                self.hits.add(id(t))
                return self.table[id(t)]
            return t

        args, kwargs = tree_map(swap, (args, kwargs or {}))
        return func(*args, **kwargs)


def _step(plan: _Plan, state: list[Tensor], closure: list[Tensor]) -> list[Tensor]:
    """``F(state)`` reading ``closure[i]`` wherever ``f`` reads ``plan.closure[i]``: stand-ins
    through which autograd takes partial derivatives (one closure tensor may be computed from
    another, e.g. ``w2 = w - lr * grad``; a derivative with respect to ``w`` would otherwise
    include the path through ``w2``, which autograd already carries from ``w2`` on).

    ``state`` holds the values of ``plan.at``: ``f`` must read the tensors it read in the
    forward and give the forward's ``F(h_{T-1})`` again, or the derivatives would be those
    of another map; RuntimeError otherwise."""
    table = {id(c): s for c, s in zip(plan.closure, closure, strict=True)}
    with _Substitute(table) as sub:
        out = tree.flatten(plan.step(tree.unflatten(plan.spec, state)))[0]
    if len(sub.hits) < len(table):
        raise RuntimeError(
            "second_order=True: the backward runs f again at the fixed point, and "
            f"{len(table) - len(sub.hits)} tensor(s) that f read in the forward are no longer "
            "read: f changed in between (e.g. a weight recomputed outside `with "
            "rbp.cached_norm(...)`). Run the backward inside that block, or use a first-order "
            "method without second_order=True.")
    check_same_map(out, plan.out if plan.f_at is None else plan.f_at, "second_order=True",
                   "use a first-order method without second_order=True")
    return out


def _grad(outs: list[Tensor], wrt: list[Tensor], cotangents: list[Tensor],
          create_graph: bool) -> tuple[Tensor, ...]:
    pairs = [(o, c) for o, c in zip(outs, cotangents, strict=True) if o.requires_grad]
    if not pairs or not wrt:
        return tuple(torch.zeros_like(w) for w in wrt)
    return torch.autograd.grad(
        [o for o, _ in pairs], wrt, [c for _, c in pairs], retain_graph=True,
        create_graph=create_graph, allow_unused=True, materialize_grads=True,
    )


def _differentiable_gradient(plan: _Plan, g: list[Tensor]) -> tuple[Tensor, ...]:
    """``z^T dF/dC`` as a graph in ``g``, ``h*`` and ``C`` (backward with create_graph)."""
    inner = _Plan(plan.adjoint, plan.step, plan.spec, plan.closure, plan.at, plan.at,
                  f_at=plan.out)
    h_star = list(_FixedPointNode.apply(inner, *plan.closure))
    # stand-ins for C that stay connected to C (views): autograd.grad with respect to them
    # stops there (partials), and the graph of the result still reaches C
    stand_ins = [c.view_as(c) for c in plan.closure]
    y = _step(plan, h_star, stand_ins)
    with torch.no_grad():
        z = plan.adjoint.solve(h_star, y, [gi.detach() for gi in g])
    z_leaf = [zi.detach().requires_grad_(True) for zi in z]
    jt_z = _grad(y, h_star, z_leaf, create_graph=True)
    rows = describe(y, None, plan.adjoint.batch_dim)
    work = torch.promote_types(y[0].dtype, torch.float32)

    def j(u: Tensor) -> Tensor:  # J u = d<J^T z, u>/dz
        return to_rows(_grad(list(jt_z), z_leaf, from_rows(u, rows, [t.dtype for t in y]),
                             create_graph=False), rows, work)

    def jt(u: Tensor) -> Tensor:
        return to_rows(_grad(y, h_star, from_rows(u, rows, [t.dtype for t in y]),
                             create_graph=False), rows, work)

    check_jvp(jt, j, to_rows(z, rows, work),
              "second_order=True differentiates it (the implicit gradient's derivative needs "
              "F's second derivatives); make that backward differentiable, or use "
              "method='bptt'")

    def solve_transposed(v: list[Tensor]) -> list[Tensor]:
        """``u = (I - J)^{-1} v``: the cotangent of ``z`` carried back through ``z = g + J^T z``."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fixed_point(second_order=True) gives first and second derivatives; a third "
                "(create_graph=True through a second-order backward) is not supported: use "
                "method='bptt' for derivatives of any order at O(steps) memory"
            )
        return _checked_solve(plan.adjoint, AdjointOperator(j, jt), v, rows, work,
                              "second order")

    z_node = _AdjointNode.apply(solve_transposed, z, *[gi + ji for gi, ji in zip(g, jt_z,
                                                                                  strict=True)])
    return _grad(y, stand_ins, list(z_node), create_graph=True)


class _AdjointNode(torch.autograd.Function):
    """``z`` (value: the solved adjoint) as a function of ``g + J^T z``: its backward solves
    ``(I - J) u = v`` for the cotangent ``v`` of ``z``."""

    @staticmethod
    def forward(ctx: Any, solve: Callable[[list[Tensor]], list[Tensor]], z: list[Tensor],
                *expr: Tensor) -> tuple[Tensor, ...]:
        ctx.solve, ctx.z = solve, z
        return tuple(zi.detach().clone() for zi in z)

    @staticmethod
    def backward(ctx: Any, *v: Tensor | None) -> tuple[Tensor | None, ...]:
        u = ctx.solve([torch.zeros_like(z) if vi is None else vi
                       for vi, z in zip(v, ctx.z, strict=True)])
        return (None, None, *u)


def _checked_solve(adjoint: Adjoint, op: AdjointOperator, v: list[Tensor], rows: Any,
                   work: torch.dtype, what: str) -> list[Tensor]:
    """Solve ``op u = v`` on rows, checked and recorded like the adjoint solve."""
    solution = adjoint._checked(op, to_rows(v, rows, work), work, what)
    return from_rows(solution.z, rows, [t.dtype for t in v])


def forward_mode_active() -> bool:
    """Whether forward-mode AD may be carrying tangents (``torch.func.jvp``, ``forward_ad``)."""
    return fwAD._current_level >= 0


def implicit_tangent(adjoint: Adjoint, leaves: list[Tensor]) -> list[Tensor]:
    """The state ``h*`` (the primal of ``leaves``) with the implicit tangent
    ``t = (I - J)^{-1} (dF/dtheta . v)``, solved by the method's solver, in place of the tangent
    the forward iterations carried. ``J t`` is the tangent of ``F(h* + eps t)`` less that of
    ``F(h*)``; no graph is kept."""
    primal = [fwAD.unpack_dual(x).primal for x in leaves]
    y = tree.flatten(adjoint.map_at_fixed_point(tree.unflatten(adjoint.spec, primal)))[0]
    b = [fwAD.unpack_dual(yi).tangent for yi in y]
    if all(bi is None for bi in b):
        return primal  # f reads nothing that carries a tangent
    b = [torch.zeros_like(p) if bi is None else bi for bi, p in zip(b, primal, strict=True)]
    rows = describe(primal, None, adjoint.batch_dim)
    work = torch.promote_types(primal[0].dtype, torch.float32)
    dtypes = [p.dtype for p in primal]

    def j(u: Tensor) -> Tensor:
        u = fwAD.unpack_dual(u).primal
        duals = [fwAD.make_dual(p, ui) for p, ui in zip(primal, from_rows(u, rows, dtypes),
                                                         strict=True)]
        out = tree.flatten(adjoint.map_at_fixed_point(tree.unflatten(adjoint.spec, duals)))[0]
        tangents = [fwAD.unpack_dual(o).tangent for o in out]
        return to_rows([bi.neg() if ti is None else ti - bi
                        for ti, bi in zip(tangents, b, strict=True)], rows, work)

    def jt(u: Tensor) -> Tensor:  # J^T u (CG's A^T), by reverse mode inside the transform
        _, pullback = torch.func.vjp(
            lambda *h: tuple(tree.flatten(adjoint.map_at_fixed_point(
                tree.unflatten(adjoint.spec, list(h))))[0]), *primal)
        out = pullback(tuple(from_rows(fwAD.unpack_dual(u).primal, rows, dtypes)))
        return to_rows([fwAD.unpack_dual(o).primal for o in out], rows, work)

    t = _checked_solve(adjoint, AdjointOperator(j, jt), b, rows, work, "forward mode")
    return [fwAD.make_dual(p, ti.to(p.dtype)) for p, ti in zip(primal, t, strict=True)]


def attach(h_in: list[Tensor], h_out: list[Tensor], adjoint: Adjoint, inputs: Sequence[Any],
           since: int) -> list[Tensor]:
    """The last state as a :class:`_FixedPointNode` of the tensors ``f`` reads (see module)."""
    if not any(o.requires_grad for o in h_out):
        return h_out
    closure = closure_tensors(
        h_out, h_in, inputs, since,
        lambda leaves: adjoint.map_at_fixed_point(tree.unflatten(adjoint.spec, leaves)))
    if not closure:
        return [o.detach() for o in h_out]
    plan = _Plan(adjoint, adjoint.map_at_fixed_point, adjoint.spec, closure,
                 [t.detach() for t in h_in], [o.detach() for o in h_out],
                 graph=(h_in, h_out))
    return list(_FixedPointNode.apply(plan, *closure))
