"""The one loop that runs any forward solver on the rows of ``X``: per-row stopping, the best
iterate, the stopping test, and removal of the rows that stop (see :mod:`rbp.forward.protocol`
for what a solver supplies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rbp.forward.iterate import Iterate
from rbp.forward.protocol import ForwardSolver, _row_norm
from rbp.forward.result import divergence
from rbp.forward.rows import RowMap

Tensor = torch.Tensor


@dataclass
class RowSolve:
    """Result of :func:`solve`: per row, the stopping iterate ``x``, ``F(x)`` and statistics."""

    x: Tensor  # (b, n) where each row stopped (or its best iterate)
    fx: Tensor  # (b, n) F(x), computed without a graph
    evaluations: list[int]  # evaluations of F spent on each row
    residual: list[float]  # ||F(x) - x|| per row
    scale: list[float]  # ||F(x)|| per row
    reached: list[bool]  # the tolerance held at x
    best: list[bool]  # x is an earlier, lower-residual iterate than the last one
    fallbacks: int  # row-iterations where the accelerated step was replaced by a plain step
    row_updates: int  # sum over iterations of the number of live rows
    trace: list[float]  # ||F(x_k) - x_k|| over the live rows, per iteration (if asked)
    scale_trace: list[float]  # ||F(x_k)|| over the same rows (if asked)
    # the solver's final inverse-Jacobian estimate per row, if its state gives one
    # (``state.inverse_estimate()``: Broyden's, for the SHINE backward)
    estimate: Any = None


def solve(
    fmap: RowMap,
    x0: Tensor,
    solver: ForwardSolver,
    *,
    max_evals: int,
    tol: float | None,
    tol_mode: str = "relative",
    check_every: int = 1,
    best_iterate: bool = False,
    trace: bool = False,
    fx0: Tensor | None = None,
    what: str = "forward",
) -> RowSolve:
    """Run ``solver`` on the rows of ``x0`` until each row's residual meets ``tol`` or
    ``max_evals`` evaluations of F are spent.

    ``fmap(x, rows)`` evaluates F on the live rows ``rows`` (``None``: all rows, in order). The
    stopping rule is tested (one host synchronisation) every ``check_every`` iterations and at
    the last; a row that meets it is written out and removed. Non-finite residuals raise
    :class:`DivergenceError`. Runs without a graph.
    """
    with torch.no_grad():
        return _solve(fmap, x0, solver, max_evals, tol, tol_mode, check_every, best_iterate,
                      trace, fx0, what)


class _Best:
    """Per live row, the lowest-residual iterate seen: ``x``, ``F(x)``, its residual and index."""

    def __init__(self, x: Tensor, fx: Tensor) -> None:
        self.x, self.fx, self.res = x.clone(), fx.clone(), _row_norm(fx - x)
        self.k = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def update(self, x: Tensor, fx: Tensor, res: Tensor, k: int) -> None:
        better = res < self.res
        self.x = torch.where(better[:, None], x, self.x)
        self.fx = torch.where(better[:, None], fx, self.fx)
        self.res = torch.where(better, res, self.res)
        self.k = torch.where(better, k, self.k)

    def keep(self, rows: Tensor) -> None:
        self.x, self.fx, self.res, self.k = (t[rows] for t in (self.x, self.fx, self.res, self.k))


class _Out:
    """What each row returns, written when it stops."""

    def __init__(self, x0: Tensor) -> None:
        b, device = x0.shape[0], x0.device
        self.x, self.fx = torch.empty_like(x0), torch.empty_like(x0)
        self.res, self.scale = x0.new_zeros(b), x0.new_zeros(b)
        self.evals = torch.zeros(b, dtype=torch.long, device=device)
        self.best = torch.zeros(b, dtype=torch.bool, device=device)
        self.reached = torch.zeros(b, dtype=torch.bool, device=device)

    def write(self, idx: Tensor, rows: Tensor, at: tuple[Tensor, ...], k: int) -> None:
        """Rows ``idx`` of the live ones (``rows`` of the output) stop at
        ``at = (x, F(x), residual, scale, is an earlier iterate, met tol)`` after ``k + 1``
        evaluations."""
        x, fx, res, scale, flag, met = at
        self.x[rows], self.fx[rows] = x[idx], fx[idx]
        self.res[rows], self.scale[rows] = res[idx], scale[idx]
        self.evals[rows] = k + 1
        self.best[rows] = flag[idx]
        self.reached[rows] = met[idx]

    def result(self, fallbacks: Tensor, row_updates: int, norms: list[Tensor],
               scales: list[Tensor]) -> RowSolve:
        return RowSolve(
            x=self.x,
            fx=self.fx,
            evaluations=self.evals.tolist(),
            residual=self.res.double().tolist(),
            scale=self.scale.double().tolist(),
            reached=self.reached.tolist(),
            best=self.best.tolist(),
            fallbacks=int(fallbacks),
            row_updates=row_updates,
            trace=torch.stack(norms).double().tolist() if norms else [],
            scale_trace=torch.stack(scales).double().tolist() if scales else [],
        )


def _met(res: Tensor, scale: Tensor, tol: float | None, tol_mode: str) -> Tensor:
    """The stopping test per row: ``||F(x) - x|| <= tol * ||F(x)||`` (or ``<= tol``)."""
    if tol is None:
        return torch.zeros_like(res, dtype=torch.bool)
    return res <= (tol * scale if tol_mode == "relative" else res.new_tensor(tol))


def _stopping_point(
    x: Tensor, fx: Tensor, res: Tensor, scale: Tensor, met: Tensor, best: _Best | None, k: int,
    tol: float | None, tol_mode: str,
) -> tuple[Tensor, ...]:
    """Where the rows that stop now return: the current iterate, or their best one."""
    if best is None:
        return x, fx, res, scale, torch.zeros_like(met), met
    scale_ = _row_norm(best.fx)
    if tol is not None:
        met = best.res <= (tol * scale_ if tol_mode == "relative" else tol)
    return best.x, best.fx, best.res, scale_, best.k != k, met


def _refuse_non_finite(res: Tensor, what: str, k: int) -> None:
    if not bool(torch.isfinite(res).all()):
        raise divergence(what, k + 1, ", or use a safer solver")


def _solve(
    fmap: RowMap,
    x0: Tensor,
    cfg: ForwardSolver,
    max_evals: int,
    tol: float | None,
    tol_mode: str,
    check_every: int,
    best_iterate: bool,
    trace: bool,
    fx0: Tensor | None,
    what: str,
) -> RowSolve:
    device = x0.device
    out = _Out(x0)
    live: Tensor | None = None  # None: all rows, in order
    x = x0
    fx = fmap(x, None) if fx0 is None else fx0
    state = cfg.init(x, max_evals)
    autocast = not isinstance(cfg, Iterate) and _autocast_enabled(device.type)
    best = _Best(x, fx) if best_iterate else None
    fallbacks = x0.new_zeros((), dtype=torch.long)
    row_updates = n_live = x0.shape[0]
    norms: list[Tensor] = []
    scales: list[Tensor] = []
    k = 0  # x is the k-th iterate; k + 1 evaluations spent on each live row
    while True:
        g = fx - x
        res = _row_norm(g)
        if trace:
            norms.append(torch.linalg.vector_norm(res))
            scales.append(torch.linalg.vector_norm(fx))
        if best is not None:
            best.update(x, fx, res, k)
        last = k + 1 >= max_evals
        if last or (tol is not None and (k + 1) % check_every == 0):
            _refuse_non_finite(res, what, k)
            scale = _row_norm(fx)
            met = _met(res, scale, tol, tol_mode)
            done = torch.ones_like(met) if last else met
            if bool(done.any()):
                idx = done.nonzero()[:, 0]
                at = _stopping_point(x, fx, res, scale, met, best, k, tol, tol_mode)
                out.write(idx, idx if live is None else live[idx], at, k)
                keep = (~done).nonzero()[:, 0]
                n_live = int(keep.numel())
                if n_live == 0:
                    break
                live = keep if live is None else live[keep]
                x, fx, g = x[keep], fx[keep], g[keep]
                state.keep(keep)
                if best is not None:
                    best.keep(keep)
        if autocast:  # the solver's own arithmetic stays in the state's dtype; f keeps autocast
            with torch.autocast(device.type, enabled=False):
                x, bad = state.step(x, fx, g)
        else:
            x, bad = state.step(x, fx, g)  # bad: the rows that fell back (None: none can)
        if bad is not None:
            fallbacks = fallbacks + bad.sum()
        k += 1
        fx = fmap(x, live)
        row_updates += n_live
    rs = out.result(fallbacks, row_updates, norms, scales)
    estimate = getattr(state, "inverse_estimate", None)
    rs.estimate = estimate() if callable(estimate) else None
    return rs


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch >= 2.4 API, else the old one)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: one flag per device kind
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())
