"""The exact T-step paths: the paper's unroll of ``steps`` updates (the last ones with a graph)
and bptt / tbptt with a tolerance or damping."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

from rbp import tree
from rbp.forward.iterate import Iterate
from rbp.forward.report import _worst
from rbp.forward.result import Forward, _diff_norm, _norm, check_finite, measured, state_norm
from rbp.forward.rows import call_map, row_differences
from rbp.tree import State

Tensor = torch.Tensor


def unroll(
    step: Callable[[State, int], State],
    h0: State,
    steps: int,
    graph_steps: int,
    *,
    detach: bool,
    require_grad_input: bool,
    trace: bool,
    method: str,
    fast: Callable[[State], State] | None = None,
) -> tuple[Forward, list[float], float, list[float]]:
    """The paper's forward: ``steps`` updates, the last ``graph_steps`` of them with a graph.

    Returns the forward, the differences ``||h_t - h_{t-1}||`` (all with ``trace``, else the
    last), ``||h_T||`` and (with ``trace``) ``||h_t||`` at every step. ``detach`` cuts the graph
    to earlier steps; ``require_grad_input`` makes the input of the graph steps a leaf with
    ``requires_grad`` (what the implicit methods differentiate). ``fast(h)``, if given, is the
    same update as ``step(h, t)`` without checks: it runs the steps between the first, the first
    graph step and the last, which ``step`` runs with the structure and in-place checks (f is
    one map, so checking each step again would only cost time).
    """
    h0_leaves, spec = tree.flatten(h0, "h0")
    free_steps = steps - graph_steps
    checked = sorted({0, free_steps, steps - 1})
    norms: list[Tensor] = []
    scales: list[Tensor] = []

    def advance(h: State, lo: int, hi: int) -> tuple[State, State]:
        """Steps ``lo .. hi-1``: the last state, and the input of the last checked step (of
        step ``hi-1`` when that is checked, as the last step always is)."""
        prev = h
        if fast is None or trace:
            for t in range(lo, hi):
                prev, h = h, step(h, t)
                if t in checked:
                    tree.check_same_structure(spec, h0_leaves, h, t)
                if trace:
                    leaves = tree.flatten(h)[0]
                    norms.append(_diff_norm(leaves, tree.flatten(prev)[0]))
                    scales.append(state_norm(leaves))
            return h, prev
        t = lo  # unchecked runs go through fast in a tight loop; prev is only kept at a
        try:  # checked step, and hi-1 is one
            for c in [c for c in checked if lo <= c < hi]:
                for _ in range(c - t):
                    h = fast(h)
                    t += 1
                prev, h = h, step(h, c)
                tree.check_same_structure(spec, h0_leaves, h, c)
                t = c + 1
            for _ in range(hi - t):
                h = fast(h)
                t += 1
        except Exception:
            # f failed on the output of an unchecked step: name a changed shape or dtype there
            if t > lo:
                tree.check_same_structure(spec, h0_leaves, h, t - 1)
            raise
        return h, prev

    with torch.no_grad():
        h, _ = advance(h0, 0, free_steps)
    h_in: list[Tensor] = []
    if require_grad_input:
        h_in = [leaf.detach().requires_grad_() for leaf in tree.flatten(h)[0]]
        h = tree.unflatten(spec, h_in)
    elif detach:
        h = tree.unflatten(spec, [leaf.detach() for leaf in tree.flatten(h)[0]])
    h, prev = advance(h, free_steps, steps)
    out = tree.flatten(h)[0]
    # one host read for the last difference, ||h_T|| and (through them) finiteness
    prev_leaves = tree.flatten(prev)[0]
    if len(out) == 1 and not trace:  # as _diff_norm and _norm compute them, fewer ops
        diff_value, norm_value, rows = _last_norms(out[0], prev_leaves[0], require_grad_input)
        values = [diff_value, norm_value**2]
    else:
        with torch.no_grad():
            if not trace:
                norms.append(_diff_norm(out, prev_leaves))
            squares = [leaf.double().pow(2).sum().to(norms[-1].device) for leaf in out]
            values = torch.stack([*norms, *squares]).tolist()
        rows = row_differences(out, prev_leaves) if require_grad_input else None
    diffs, squares = values[: len(values) - len(out)], values[len(values) - len(out) :]
    scale = math.sqrt(sum(squares))
    if not (math.isfinite(diffs[-1]) and math.isfinite(scale)):
        check_finite(out, method, steps)
    trace_scales = torch.stack(scales).tolist() if scales else []
    return Forward(h, h_in, out, spec, rows=rows), diffs, scale, trace_scales


def _unroll_tensor(
    f: Callable[..., State],
    h0: Tensor,
    inputs: tuple,
    steps: int,
    graph_steps: int,
    *,
    detach: bool,
    require_grad_input: bool,
    method: str,
) -> tuple[Forward, float, float]:
    """:func:`unroll` for a bare-tensor state and one map, without a trace: the same updates,
    checks (steps 0, the first graph step and the last) and norms, in fewer Python layers.

    Returns the forward, ``||h_T - h_{T-1}||`` and ``||h_T||``.
    """
    free = steps - graph_steps
    last = steps - 1

    def checked(h: Tensor, t: int) -> Tensor:
        out = call_map(f, h, *inputs)
        tree.check_same_structure(tree.LEAF, [h0], out, t)
        return out

    h = h0
    t = 0
    try:
        with torch.no_grad():
            for t in range(free):
                h = checked(h, t) if t == 0 else f(h, *inputs)
        h_in: list[Tensor] = []
        if require_grad_input:
            h = h.detach().requires_grad_()
            h_in = [h]
        elif detach:
            h = h.detach()
        prev = h
        for t in range(free, steps):
            if t in (free, last):
                prev, h = h, checked(h, t)
            else:
                h = f(h, *inputs)
    except Exception:
        # f failed on the output of step t-1, which was not checked (to save time): if that
        # changed the state's shape or dtype, say so instead of the error from inside f
        if t > 0:
            tree.check_same_structure(tree.LEAF, [h0], h, t - 1)
        raise
    diff_value, norm_value, rows = _last_norms(h, prev, require_grad_input)
    if not (math.isfinite(diff_value) and math.isfinite(norm_value)):
        check_finite([h], method, steps)
    return Forward(h, h_in, [h], tree.LEAF, rows=rows), diff_value, norm_value


def _last_norms(
    h: Tensor, prev: Tensor, want_rows: bool = False
) -> tuple[float, float, tuple[Tensor, ...] | None]:
    """``||h - prev||`` and ``||h||`` on the host (one read each on CPU, one in all elsewhere),
    in the state's dtype (no float64 copy of the state) unless ``||h||`` overflows it; and
    (``want_rows``), for a state of two or more dims, the same per row of dim 0 (left on the
    device: the settle check reads their worst ratio, see :func:`row_differences`)."""
    o = h.detach()  # detached rather than under no_grad: one op fewer
    d = o - prev.detach()
    if want_rows and o.is_cpu and o.dim() >= 2 and 1 < o.shape[0] <= HOST_ROWS:
        return _last_norms_by_row(o, d)
    diff = torch.linalg.vector_norm(d)
    norm = torch.linalg.vector_norm(o)
    rows = None
    if want_rows and o.dim() >= 2 and o.shape[0] > 1:
        # a row's scale is at least the rms row norm: a near-zero row of one system (a node
        # of a graph, say) is not held to its own tiny norm
        rows = (torch.linalg.vector_norm(d.reshape(o.shape[0], -1), dim=1),
                torch.linalg.vector_norm(o.reshape(o.shape[0], -1), dim=1).clamp_min(
                    norm / math.sqrt(o.shape[0])))
    if o.is_cpu:  # two reads cost less than stacking them
        diff_value, norm_value = diff.item(), norm.item()
    elif rows is not None:  # the worst row ratio in the same read (no extra sync on a GPU)
        diff_value, norm_value, worst = torch.stack(
            [diff.double(), norm.double(), _worst(rows).double()]).tolist()
        rows = (rows[0], rows[1], worst)  # type: ignore[assignment]
    else:
        diff_value, norm_value = torch.stack([diff.double(), norm.double()]).tolist()
    if not math.isfinite(norm_value):
        norm_value = torch.linalg.vector_norm(o, dtype=torch.float64).item()
    return diff_value, norm_value, rows


# Up to this many rows on the CPU, the per-row norms are read to the host in one read and the
# whole-state norms and the worst row ratio are summed there: fewer ops than on the tensors.
HOST_ROWS = 32


def _last_norms_by_row(o: Tensor, d: Tensor) -> tuple[float, float, tuple[Tensor, Tensor, float]]:
    """:func:`_last_norms` with rows, for a few rows on the CPU: one host read of the per-row
    ``||d_i||`` and ``||o_i||`` (a half-precision state's in float32: no overflow); the
    whole-state norms are their root sum of squares, and the worst ratio (the settle check's,
    see :func:`~rbp.forward.report.worst_ratio`) comes along."""
    b = o.shape[0]
    wide = None if o.dtype in (torch.float32, torch.float64) else torch.float32  # no copy
    rows = torch.stack([torch.linalg.vector_norm(d.reshape(b, -1), dim=1, dtype=wide),
                        torch.linalg.vector_norm(o.reshape(b, -1), dim=1, dtype=wide)])
    drows, nrows = rows.tolist()
    diff_value, norm_value = math.hypot(*drows), math.hypot(*nrows)
    floor = norm_value / math.sqrt(b)  # a row's scale is at least the rms row norm
    if floor > 0:  # a row that did not move is settled (0 / scale = 0)
        worst = max(x / (n if n > floor else floor) for x, n in zip(drows, nrows, strict=True))
    else:  # every row is zero: one that moved is infinitely far from settled
        worst = math.inf if diff_value > 0 else 0.0
    return diff_value, norm_value, (rows[0], rows[1].clamp_min(floor), worst)


def _unroll_to_tol(
    step: Callable[[State, int], State],
    h0: State,
    steps: int,
    method: str,
    graph_steps: int | None,
    tol: float | None,
    tol_mode: str,
    solver: Iterate,
    check_every: int,
    trace: bool,
) -> Forward:
    """bptt / tbptt with a tolerance or damping: stop at tol, back-propagate through the updates.

    ``graph_steps=None`` (bptt) keeps the graph of every update, from ``h0``; tbptt keeps the
    last ``graph_steps`` inputs (no graph) and recomputes those updates with a graph once it
    stops: memory O(K), the same gradient as keeping their graph all along.
    """
    assert isinstance(solver, Iterate)
    damping = solver.damping
    h0_leaves, spec = tree.flatten(h0, "h0")
    bptt = graph_steps is None  # through every update, into h0
    window: deque[tuple[int, list[Tensor]]] = deque(maxlen=graph_steps)
    leaves = list(h0_leaves)
    norms: list[float] = []
    scales: list[float] = []
    reached = False
    k = 0
    for k in range(steps):
        if not bptt:
            window.append((k, [leaf.detach() for leaf in leaves]))
        with torch.set_grad_enabled(bptt):
            out = step(tree.unflatten(spec, leaves), k)
            out_leaves = tree.check_same_structure(spec, h0_leaves, out, k)
        last = k + 1 == steps
        check = tol is not None and (last or (k + 1) % check_every == 0)
        if trace or check or last:
            diff = _diff_norm(out_leaves, leaves).item()
            norms.append(diff)
            if trace:
                scales.append(state_norm(out_leaves).item())
            if not math.isfinite(diff):
                check_finite(out_leaves, method, k + 1)
            if check:
                reached = diff <= (tol * _norm(out_leaves) if tol_mode == "relative" else tol)
            if last or reached:
                break
        with torch.set_grad_enabled(bptt):
            leaves = [o if damping == 0.0 else torch.lerp(o, h, damping)
                      for o, h in zip(out_leaves, leaves, strict=True)]
    h_in = leaves
    if not bptt:
        start, leaves = window[0]
        for j in range(start, k + 1):
            out = step(tree.unflatten(spec, leaves), j)
            out_leaves = tree.flatten(out)[0]
            if j < k:
                leaves = [o if damping == 0.0 else torch.lerp(o, h, damping)
                          for o, h in zip(out_leaves, leaves, strict=True)]
        h_in = leaves
    check_finite(out_leaves, method, k + 1)
    diff = _diff_norm(out_leaves, h_in).item()
    record = measured(solver.name, diff, _norm(out_leaves), norms if trace else [], k + 1, diff,
                      k + 1, tol_reached=reached if tol is not None else None,
                      trace_scales=scales)
    return Forward(tree.unflatten(spec, out_leaves), [], out_leaves, spec, measured=record)
