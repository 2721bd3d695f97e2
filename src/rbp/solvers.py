"""Linear solvers for the adjoint system ``A z = b`` with ``A = I - J^T``.

**Protocol.** A solver is a value with a method ``solve(matvec, b) -> Solution`` (a plain
callable ``solver(matvec, b)`` is accepted too):

* ``b`` is a ``(batch, n)`` tensor holding ``batch`` independent right-hand sides (``batch = 1``
  unless :func:`rbp.fixed_point` was given ``batch_dim``: then row ``i`` is sample ``i``'s
  ``g`` and J is block-diagonal, so every row is its own system);
* ``matvec(v) = A v = v - J^T v`` row by row, for ``v`` of the shape of ``b``. The operator the
  core passes also has ``matvec.vjp(v) = J^T v`` and ``matvec.rmatvec(v) = A^T v = v - J v``
  (``rmatvec`` only when forward products are available);
* the result is a :class:`Solution`, or any object with a ``z`` attribute of ``b``'s shape (or a
  bare tensor ``z``). The core then computes the true residual ``||A z - b|| / ||b||`` itself
  (one extra product) as the solve's error estimate.

A built-in solver never raises on a bad system: it reports a :class:`~rbp.diagnostics.Status`
and an a-posteriori error estimate, and the caller decides. Options are checked when the solver
is constructed. ``tol`` is relative to ``||b||`` per row; ``tol=None`` runs ``max_iter``
iterations (the paper's truncated algorithms). The stopping rule costs one host read per test:
with a tolerance (and always for the Krylov solvers, which also test for breakdown) it is
tested every ``check_every`` iterations; the series solvers without a tolerance test only after
their first products and every ``UNTOLERANCED_CHECK_EVERY`` (a zero increment, ``J = 0`` or
``g = 0``, or a NaN stops there; Neumann only for a series longer than that), then read the
device once at the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rbp.diagnostics import Status, check_count

Tensor = torch.Tensor
Matvec = Callable[[Tensor], Tensor]

# An increment this many times larger than ||b|| means the iteration has blown up.
DIVERGENCE_FACTOR = 1e6
# Increments used to estimate the contraction rate of a Neumann / RBP series.
RATE_WINDOW = 5


@dataclass
class Solution:
    """Result of a backward solve.

    ``z`` has ``b``'s shape; ``residuals`` are the solver's own residuals (Neumann / RBP: the
    increment; CG: the normal-equation residual; GMRES: the Givens estimate of the residual),
    as 2-norms over all rows: after every iteration, except that the series solvers without a
    ``tol`` measure only the first increments and the last ``RATE_WINDOW + 1`` (all of them
    when ``max_iter <= 2 RATE_WINDOW + 2``), saving a reduction per product.
    ``sample_errors`` is the a-posteriori
    error estimate of each row (see :class:`~rbp.diagnostics.BackwardInfo`), ``None`` when the
    solver gives none.
    """

    z: Tensor
    iterations: int
    residuals: list[float] = field(default_factory=list)
    status: Status = Status.MAX_ITER
    sample_errors: list[float] | None = None
    terms: int | None = None  # Neumann terms summed (Prop. 2 bound), if a series
    # the true relative residual ||A z - b|| / ||b|| per row, where measured (Krylov, user)
    sample_residuals: list[float] | None = None

    @property
    def ok(self) -> bool:
        return Status(self.status).ok

    @property
    def error_estimate(self) -> float | None:
        return None if self.sample_errors is None else max(self.sample_errors, default=0.0)


@runtime_checkable
class Solver(Protocol):
    """Anything with ``solve(matvec, b) -> Solution`` (see the module docstring)."""

    def solve(self, matvec: Matvec, b: Tensor) -> Any: ...


def is_solver(value: Any) -> bool:
    """Whether ``value`` has a ``solve`` method (cheaper than ``isinstance(value, Solver)``);
    a tensor is not one, though ``torch.Tensor`` still carries a ``solve`` attribute."""
    return not isinstance(value, Tensor) and callable(getattr(value, "solve", None))


class AdjointOperator:
    """``A v = v - J^T v`` on ``(batch, n)`` rows, with ``vjp = J^T`` and ``rmatvec = A^T``."""

    def __init__(self, vjp: Matvec, jvp: Matvec | None = None, estimate: bool = True) -> None:
        self.vjp = vjp
        self.jvp = jvp
        # False: the caller reads statuses only, so the built-in solvers skip the conditioning
        # and Ritz estimates of their error (their sample_errors are then residuals / the
        # mean-rate tail, as before those estimates existed)
        self.estimate = estimate

    def __call__(self, v: Tensor) -> Tensor:
        return v - self.vjp(v)

    def rmatvec(self, v: Tensor) -> Tensor:
        if self.jvp is None:
            raise ValueError("this operator has no forward products J v (rmatvec)")
        return v - self.jvp(v)


def _wide(t: Tensor) -> torch.dtype:
    """float64 for the small estimates, float32 on MPS (which has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _estimating(matvec: Matvec) -> bool:
    return bool(getattr(matvec, "estimate", True))


def _vjp_of(matvec: Matvec) -> Matvec:
    vjp = getattr(matvec, "vjp", None)
    return vjp if vjp is not None else (lambda v: v - matvec(v))


def _check_int(name: str, value: Any, low: int = 1) -> None:
    check_count(name, value, low)


def _check_tol(value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"tol must be a finite number > 0 or None, got {value!r}")


def _rows(b: Tensor) -> Tensor:
    if b.dim() != 2:
        raise ValueError(f"b must have shape (batch, n), got {tuple(b.shape)}")
    return b


def _tail(increments: list[float], znorm: float, eps: float, ritz: float | None = None,
          frozen_below: float | None = None) -> float:
    """Estimated ``||z_inf - z_K|| / ||z_K||`` of a geometric series from its increments.

    The rate ``q`` is the mean decay of the last ``RATE_WINDOW`` increments and the tail
    ``r_K q / (1 - q)``; infinite when ``q >= 1`` (the series does not converge), unless the
    increments are round-off noise far below ``||z_K||``. ``ritz``: the Ritz tail of the last
    increments (:func:`_ritz_tails`, absolute), which the estimate is at least: one mean rate
    misses a slow mode that the last increments hold under faster ones.
    """
    last = increments[-1]
    if not math.isfinite(last):
        return math.nan
    if last == 0.0 and frozen_below is not None:
        # a row frozen by tol: its increments end with the one it froze at (positive, at most
        # tol ||b||), then zeros; its estimate is the tail from that increment on, itself
        # included (Neumann does not add it). A row whose increment became exactly zero
        # (J^T v = 0) keeps 0.
        k = len(increments)
        while k > 0 and increments[k - 1] == 0.0:
            k -= 1
        if 1 < k < len(increments) and 0.0 < increments[k - 1] <= frozen_below:
            est = _tail(increments[:k], znorm, eps)
            q = _rate(increments[:k])
            est = est / q if 0.0 < q < 1.0 and math.isfinite(est) else est
            if ritz is not None and not math.isnan(ritz):  # the window ends at the freezing
                est = max(est, (ritz + increments[k - 1]) / max(znorm, 1e-300))
            return est
    if last == 0.0:
        return 0.0
    m = min(RATE_WINDOW, len(increments) - 1)
    prev = increments[-1 - m] if m >= 1 else 0.0
    q = (last / prev) ** (1.0 / m) if prev > 0 else math.inf
    tail = last * q / (1.0 - q) if q < 1 else math.inf
    if last <= 1e3 * eps * znorm or (q >= 1 and last <= math.sqrt(eps) * znorm):
        tail = last
    elif ritz is not None and not ritz <= tail:  # NaN (no Ritz estimate) keeps the tail
        tail = ritz if not math.isnan(ritz) else tail
    return tail / max(znorm, 1e-300)


def _window_gram(window: list[Tensor] | None) -> Tensor | None:
    """Gram matrix ``W W^T`` per row of the consecutive increments ``W = [v_{K-m} .. v_K]``
    (``m >= 2``), on the device: all :func:`_ritz_tails` needs, read with the solver's table."""
    if window is None or len(window) < 3:
        return None
    w = torch.stack(window, 1)  # (rows, m + 1, n)
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    return w @ w.mT


class _Window:
    """The last ``RATE_WINDOW + 1`` increments of a series, per row; a row that a tolerance
    froze keeps the increments up to the one it froze at (its Ritz tail is taken there).

    A ring of ``RATE_WINDOW + 1`` slots written in place: push ``t`` goes to slot
    ``t mod size`` for the rows still alive (one masked write of one slot per push), and each
    row's window is put in order once, when :meth:`tensors` reads it.
    """

    def __init__(self, first: Tensor | None = None) -> None:
        self.size = RATE_WINDOW + 1
        self.buf: Tensor | None = None      # (size, rows, n)
        self.taken: Tensor | None = None    # (rows,): pushes each row has taken
        self.count = 0
        if first is not None:
            self.push(first, None)

    def push(self, v: Tensor, alive: Tensor | None) -> None:
        """Append ``v``; ``alive``: the rows still iterating (None: all), the others keep theirs."""
        if self.buf is None:
            self.buf = v.new_zeros(self.size, *v.shape)
            self.taken = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
        slot = self.count % self.size
        if alive is None:
            self.buf[slot] = v
            self.taken += 1
        else:
            self.buf[slot] = torch.where(alive[:, None], v, self.buf[slot])
            self.taken += alive
        self.count += 1

    def tensors(self) -> list[Tensor]:
        """Each row's last ``min(pushes, size)`` increments, oldest first (zeros before a
        row's first push)."""
        if self.buf is None or self.taken is None:
            return []
        k = min(self.count, self.size)
        j = torch.arange(self.size - k, self.size, device=self.taken.device)
        push = self.taken[None, :] - self.size + j[:, None]          # (k, rows): push index
        slots = (push % self.size)[:, :, None].expand(k, *self.buf.shape[1:])
        out = self.buf.gather(0, slots)
        return list(torch.where((push >= 0)[:, :, None], out, 0.0))


def _rate(increments: list[float]) -> float:
    """The mean decay rate of the last ``RATE_WINDOW`` increments (as :func:`_tail` uses)."""
    m = min(RATE_WINDOW, len(increments) - 1)
    prev = increments[-1 - m]
    return (increments[-1] / prev) ** (1.0 / m) if prev > 0 else math.inf


def _ritz_tails(gram: list, znorms: list[float], eps: float) -> list[float]:
    """``||sum_{t>K} v_t||`` per row, extrapolated from the consecutive increments
    ``v_{K-m}, ..., v_K`` of ``v_{t+1} = J^T v_t`` whose Gram matrix is ``gram`` (host lists).

    On the span of ``V = [v_{K-m} .. v_{K-1}]``, ``J^T`` acts as the companion matrix ``C``
    whose last column ``c`` is the least-squares fit ``v_K ~ V c`` (the roots of its
    polynomial are Ritz values: the rates of the modes the window holds, a slow one included
    even when faster ones still dominate the increments). The tail is then
    ``V (I - C)^{-1} C c`` plus the unfitted part ``||v_K - V c||`` at the window's mean rate;
    infinite when a root is not inside the unit circle; NaN for a non-finite row. Directions of
    the window below its noise (singular values under ``sqrt(eps)`` of the largest, or under
    ``100 eps ||z||``: an increment formed as a difference of ``z``-sized vectors, as RBP's,
    carries that much round-off) are left out of the fit. ``m x m`` algebra in float64 numpy.
    """
    g = np.asarray(gram, dtype=np.float64)  # (rows, m + 1, m + 1)
    rows, size, _ = g.shape
    m = size - 1
    finite = np.isfinite(g).all(axis=(1, 2))
    if not finite.all():
        g = np.where(finite[:, None, None], g, np.eye(size))
    gm, rhs, last2 = g[:, :m, :m], g[:, :m, m], g[:, m, m]
    # least squares through the ridge-regularised normal equations: the ridge (relative
    # sqrt(eps) in singular values, or the round-off floor) drops the window's noise directions
    top = np.trace(gm, axis1=1, axis2=2)
    ridge = np.maximum(top * max(eps, 1e-12), (100 * eps * np.asarray(znorms)) ** 2)
    c = np.linalg.solve(gm + ridge[:, None, None] * np.eye(m), rhs[..., None])[..., 0]
    comp = np.zeros((rows, m, m))
    comp[:, 1:, :-1] = np.eye(m - 1)
    comp[:, :, -1] = c
    ok = np.abs(np.linalg.eigvals(comp)).max(axis=-1) < 1
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where((g[:, 0, 0] > 0) & (last2 > 0),
                        (last2 / np.where(g[:, 0, 0] > 0, g[:, 0, 0], 1.0)) ** (0.5 / m), 0.0)
    ok &= rate < 1
    a = np.eye(m) - comp
    if not ok.all():
        a = np.where(ok[:, None, None], a, np.eye(m))
    y = np.linalg.solve(a, comp @ c[..., None])  # (rows, m, 1)
    fitted = (y.transpose(0, 2, 1) @ gm @ y)[:, 0, 0]
    cg = (gm @ c[..., None])[..., 0]
    unfit = last2 - 2 * (c * rhs).sum(-1) + (c * cg).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.sqrt(np.maximum(fitted, 0.0)) + np.sqrt(np.maximum(unfit, 0.0)) * (
            rate / (1 - rate))
    tail = np.where(ok, tail, np.inf)
    return np.where(finite, tail, np.nan).tolist()


def _finish(
    z: Tensor,
    iterations: int,
    norms: list[Tensor] | Tensor,
    bnorm: Tensor,
    tol: float | None,
    *,
    true_errors: Tensor | None = None,
    lead: bool = False,
    terms: int | None = None,
    window: list[Tensor] | None = None,
) -> Solution:
    """One host read: per-iteration residuals, per-row errors and the status.

    ``norms``: per-row residuals of each iteration (a list of ``(rows,)`` tensors, or a
    ``(iterations, rows)`` tensor). Error estimates: ``true_errors`` (Krylov) or, if None, the
    geometric tail of the per-row increments ``norms`` (preceded by ``||b||`` when ``lead``:
    Neumann's ``v_0 = b``); ``window``: the last consecutive increments of a series, whose
    Ritz tail (:func:`_ritz_tails`) the series' error estimate is at least.
    """
    last = true_errors if true_errors is not None else torch.linalg.vector_norm(z, dim=1)
    if isinstance(norms, list):
        table_t = torch.stack([*norms, bnorm, last])
    else:
        table_t = torch.cat([norms, bnorm[None], last[None]])
    table, tails = _read(table_t, _window_gram(window), z.dtype)
    return _classify(z, iterations, table, tol, errors_given=true_errors is not None,
                     lead=lead, terms=terms, tails=tails)


def _read(
    table: Tensor, gram: Tensor | None, dtype: torch.dtype
) -> tuple[list[list[float]], list[float] | None]:
    """The norms ``table`` (ending with ``||z||`` per row) and, with a window ``gram``, the Ritz
    tails per row (NaN: not needed, see :func:`_needs_ritz`): one host read for both."""
    if gram is None:
        return table.tolist(), None
    rows = table.shape[1]
    flat = torch.cat([table.flatten(), gram.to(table.dtype).flatten()]).tolist()
    k = table.numel()
    out = [flat[i : i + rows] for i in range(0, k, rows)]
    size = gram.shape[-1]
    eps = torch.finfo(dtype).eps
    tails = [math.nan] * rows
    todo = []
    for r in range(rows):
        start = k + r * size * size
        g = [flat[start + i * size : start + (i + 1) * size] for i in range(size)]
        # (increments at round-off of ||z|| make the estimate the last increment anyway)
        if _needs_ritz([g[i][i] for i in range(size)]) and not (
                math.sqrt(max(g[-1][-1], 0.0)) <= 1e3 * eps * out[-1][r]):
            todo.append((r, g))
    if len(todo) <= RITZ_PYTHON_ROWS:  # plain Python: ~30 us a row; numpy's calls ~300 us
        for r, g in todo:  # in a backward (cold caches), whatever the number of rows
            tails[r] = _ritz_tail_row(g, out[-1][r], eps)
    elif todo:
        znorms = [out[-1][r] for r, _ in todo]
        found = _ritz_tails([g for _, g in todo], znorms, eps)
        for (r, _), tail in zip(todo, found, strict=True):
            tails[r] = tail
    return out, tails


RITZ_PYTHON_ROWS = 8


def _ritz_tail_row(g: list[list[float]], znorm: float, eps: float) -> float:
    """:func:`_ritz_tails` for one row in plain Python (same result): the ridge least-squares
    fit by Cholesky, the roots' position by the Schur-Cohn test, ``(I - C) y = C c`` by the
    companion matrix's O(m) recurrence."""
    m = len(g) - 1
    if not all(math.isfinite(x) for row in g for x in row):
        return math.nan
    ridge = max(sum(g[i][i] for i in range(m)) * max(eps, 1e-12), (100 * eps * znorm) ** 2)
    low = [[0.0] * m for _ in range(m)]  # Cholesky factor of G + ridge I
    for i in range(m):
        gi, li = g[i], low[i]
        for j in range(i + 1):
            lj = low[j]
            acc = gi[j] + (ridge if i == j else 0.0)
            for k in range(j):
                acc -= li[k] * lj[k]
            if i == j:
                if not acc > 0:
                    return math.nan
                li[i] = math.sqrt(acc)
            else:
                li[j] = acc / lj[j]
    rhs = [g[i][m] for i in range(m)]
    tmp = [0.0] * m
    for i in range(m):
        tmp[i] = (rhs[i] - sum(low[i][k] * tmp[k] for k in range(i))) / low[i][i]
    c = [0.0] * m
    for i in reversed(range(m)):
        c[i] = (tmp[i] - sum(low[k][i] * c[k] for k in range(i + 1, m))) / low[i][i]
    # every root of lambda^m - sum_i c_i lambda^i strictly inside the unit circle (Schur-Cohn)
    poly = [-x for x in c] + [1.0]
    while len(poly) > 1:
        k = poly[0] / poly[-1]
        if not abs(k) < 1:
            return math.inf
        d = len(poly) - 1
        poly = [poly[j + 1] - k * poly[d - 1 - j] for j in range(d)]
    # (I - C) y = C c with C e_i = e_{i+1} (i < m - 1), C e_{m-1} = c: y_i = R_i + S_i y_{m-1}
    top_c = c[m - 1]
    big_r = list(itertools.accumulate([c[0] * top_c] + [c[i - 1] + c[i] * top_c
                                                        for i in range(1, m)]))
    big_s = list(itertools.accumulate(c))
    last_y = big_r[-1] / (1.0 - big_s[-1])
    y = [big_r[i] + big_s[i] * last_y for i in range(m)]
    fitted = sum(y[i] * sum(g[i][j] * y[j] for j in range(m)) for i in range(m))
    unfit = g[m][m] - 2 * sum(c[i] * rhs[i] for i in range(m)) + sum(
        c[i] * sum(g[i][j] * c[j] for j in range(m)) for i in range(m))
    rate = _window_rate(g[0][0], g[m][m], m)
    if not rate < 1:
        return math.inf
    return math.sqrt(max(fitted, 0.0)) + math.sqrt(max(unfit, 0.0)) * rate / (1 - rate)


def _window_rate(first2: float, last2: float, m: int) -> float:
    """The window's mean decay rate from its first and last squared norms."""
    return (last2 / first2) ** (0.5 / m) if first2 > 0 and last2 > 0 else 0.0


# Consecutive decay ratios of the window that differ by more than this (relative) mean more
# than one rate is at work: only then can a Ritz extrapolation differ from the mean rate's.
RATIO_SPREAD = 1e-4


def _needs_ritz(squares: list[float]) -> bool:
    """Whether a window's increments (their squared norms) decay at more than one rate.

    A hidden slower mode of relative weight ``e`` in the last increment shifts the ratios by
    about ``e (rate_slow - rate_fast)`` across the window; it changes the tail by more than
    the mean-rate estimate itself only when ``e >~ 1 - rate_slow``, a spread far above this
    limit unless the slow mode is within ~1e-4 of 1. A single geometric decay (the common
    case) skips the small dense algebra.
    """
    if not all(x > 0 and math.isfinite(x) for x in squares):
        return any(x > 0 for x in squares[1:])  # a zero or NaN inside: let the fit decide
    ratios = [math.sqrt(b / a) for a, b in zip(squares, squares[1:], strict=False)]
    return max(ratios) - min(ratios) > RATIO_SPREAD * max(ratios)


def _classify(
    z: Tensor,
    iterations: int,
    table: list[list[float]],
    tol: float | None,
    *,
    errors_given: bool,
    lead: bool,
    terms: int | None,
    tails: list[float] | None = None,
) -> Solution:
    """The status and per-row errors from the host ``table``: the per-row residuals of each
    iteration, then ``||b||``, then the true errors (``errors_given``) or ``||z||``;
    ``tails``: the Ritz tail of each row (:func:`_ritz_tails`)."""
    rows = len(table[-1])
    k = len(table) - 2
    inc, bn, last_row = table[:k], table[k], table[k + 1]
    residuals = (
        [math.sqrt(sum(x * x for x in row)) for row in inc]
        if rows > 1
        else [abs(row[0]) for row in inc]
    )
    if errors_given:
        sample_errors = last_row
    else:
        eps = torch.finfo(z.dtype).eps
        sample_errors = [
            _tail(([bn[r]] if lead else []) + [row[r] for row in inc], last_row[r], eps,
                  None if tails is None else tails[r],
                  None if tol is None else tol * bn[r])
            if inc
            else 0.0
            for r in range(rows)
        ]
    gnorm = math.sqrt(sum(x * x for x in bn))
    if any(math.isnan(e) for e in sample_errors) or any(
        not math.isfinite(r) or r > DIVERGENCE_FACTOR * max(gnorm, 1e-30) for r in residuals
    ):
        status = Status.DIVERGED
    elif (
        not residuals
        or residuals[-1] == 0.0
        or (tol is not None and all(e <= tol for e in sample_errors))
    ):
        status = Status.CONVERGED
    elif len(residuals) > 1 and residuals[-1] >= residuals[0]:
        status = Status.GROWING
    else:
        status = Status.MAX_ITER
    return Solution(z, iterations, residuals, status, sample_errors, terms)


# Without a tolerance the only reason to stop early is an exact zero (or NaN): checked after the
# first products, then every this many.
UNTOLERANCED_CHECK_EVERY = 64


def _due(t: int, max_iter: int, every: int, tol: float | None, first: int = 1) -> bool:
    if t >= max_iter:
        return False
    return t == first or t % (every if tol is not None else UNTOLERANCED_CHECK_EVERY) == 0


def _tail_start(max_iter: int, tol: float | None) -> int:
    """First iteration whose increment norm a series solver records.

    With ``tol`` every increment is measured (the stopping rule needs them); without, only
    the first ones, those at checks, and the last ``RATE_WINDOW + 1`` (what the status and
    the error estimate use), which saves a reduction per product.
    """
    return 1 if tol is not None else max_iter - RATE_WINDOW


def _nothing_left(n: Tensor) -> bool:
    """No row has a non-zero increment left, or one is NaN (one host read)."""
    return not bool((n > 0).any())


def neumann(
    matvec: Matvec, b: Tensor, *, max_iter: int, tol: float | None = None, check_every: int = 10
) -> Solution:
    """Neumann-RBP (Alg. 2): ``z = sum_{t=0}^{K} (J^T)^t b`` with K = ``max_iter``.

    Converges iff the spectral radius of J is below one; K products, K+1 terms. Rows whose
    increment ``||(J^T)^t b||`` falls to ``tol ||b||`` stop growing (their increment is zeroed).
    Error estimate: the tail of the series, the larger of the mean-rate geometric tail of the
    increments and the Ritz extrapolation of the last ones (:func:`_ritz_tails`).
    """
    b = _rows(b)
    vjp = _vjp_of(matvec)
    if tol is None:
        return _neumann_untoleranced(vjp, b, max_iter, _estimating(matvec))
    bnorm = torch.linalg.vector_norm(b, dim=1)
    v, z = b, b.clone()
    norms: list[Tensor] = []  # increments' norms, read once at the end
    estimate = _estimating(matvec)
    window = _Window(b)  # the last increments (Ritz tail), kept per row up to its freezing
    limit = tol * bnorm
    alive: Tensor | None = None
    t = 0
    for t in range(1, max_iter + 1):
        v = vjp(v)
        if estimate:
            window.push(v, alive)
        due = _due(t, max_iter, check_every, tol)
        n = torch.linalg.vector_norm(v, dim=1)
        keep = n > limit
        alive = keep
        v = v * keep.unsqueeze(1)
        # recorded unmasked: the increment a row freezes at keeps its norm (the row's error
        # estimate is the tail from there), the zeros after it mark the row as frozen
        norms.append(n)
        n = n * keep
        if due and _nothing_left(n):
            z.add_(v)
            break
        z.add_(v)
    return _finish(z, t, norms, bnorm, tol, lead=True, terms=t + 1,
                   window=window.tensors() if estimate else None)


def _neumann_untoleranced(vjp: Matvec, b: Tensor, max_iter: int, estimate: bool = True
                          ) -> Solution:
    """Neumann without ``tol``: all ``max_iter`` products, stopping early only on an exact zero
    or NaN. A series longer than ``UNTOLERANCED_CHECK_EVERY`` tests after its first product and
    every ``UNTOLERANCED_CHECK_EVERY``; a shorter one never (the test is a host read per call,
    and running out a zero series costs at most that many products).

    The first and the last ``RATE_WINDOW + 1`` increments (what the status and the error
    estimate need) are kept and reduced in one call at the end with ``b`` and ``z``.
    """
    v, z = b, b.clone()
    kept: list[Tensor] = []
    steps: list[int] = []  # the t of each kept increment
    tail_from = _tail_start(max_iter, None)
    long = max_iter > UNTOLERANCED_CHECK_EVERY
    t = 0
    for t in range(1, max_iter + 1):
        v = vjp(v)
        z.add_(v)
        if t >= tail_from:
            kept.append(v)
            steps.append(t)
        elif t == 1 or t % UNTOLERANCED_CHECK_EVERY == 0:
            kept.append(v)
            steps.append(t)
            if long and _nothing_left(torch.linalg.vector_norm(v, dim=1)):
                break
    # the consecutive increments at the end (b is v_0), for the Ritz tail
    seq, ts = [b, *kept], [0, *steps]
    j = len(seq) - 1
    while j > 0 and ts[j - 1] == ts[j] - 1 and len(seq) - j <= RATE_WINDOW:
        j -= 1
    norms = torch.linalg.vector_norm(torch.stack([*kept, b, z]), dim=2)
    table, tails = _read(norms, _window_gram(seq[j:]) if estimate else None, z.dtype)
    return _classify(z, t, table, None, errors_given=False, lead=True, terms=t + 1,
                     tails=tails)


def fixed_point_iteration(
    matvec: Matvec,
    b: Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    z0: Tensor | None = None,
    check_every: int = 10,
) -> Solution:
    """Original RBP (Alg. 1): iterate ``z_i = J^T z_{i-1} + b`` from ``z0`` (zeros if None).

    Same convergence condition as Neumann; from ``z0 = 0`` it equals Neumann with one term
    fewer. The residual is the increment ``||z_i - z_{i-1}||``; rows whose increment falls to
    ``tol ||b||`` are frozen. Error estimate: as :func:`neumann`'s, from the steps.
    """
    b = _rows(b)
    vjp = _vjp_of(matvec)
    bnorm = torch.linalg.vector_norm(b, dim=1)
    eps = torch.finfo(b.dtype).eps
    settled = False
    z = torch.zeros_like(b) if z0 is None else z0.to(b).clone()
    norms: list[Tensor] = []
    limit = None if tol is None else tol * bnorm
    active = None
    i = 0
    tail_from = _tail_start(max_iter, tol)
    estimate = _estimating(matvec)
    window = _Window()  # the last steps (Ritz tail), kept per row up to its freezing
    for i in range(1, max_iter + 1):
        step = vjp(z) + b - z
        if active is not None:
            step = step * active.unsqueeze(1)
        if estimate and i >= tail_from - 1:
            window.push(step, active)
        z = z + step
        due = _due(i, max_iter, check_every, tol, first=2)
        if i <= 2 or i >= tail_from or due:
            n = torch.linalg.vector_norm(step, dim=1)
            norms.append(n)
            if limit is not None:
                active = n > limit
            # stop once z no longer changes: every row's step at round-off of ||z|| (a step
            # J^T z + b - z never reaches an exact zero, unlike a Neumann term)
            if due and _nothing_left(n - 4 * eps * torch.linalg.vector_norm(z, dim=1)):
                settled = True
                break
    sol = _finish(z, i, norms, bnorm, tol, lead=len(norms) == 1, terms=i,
                  window=window.tensors() if estimate else None)
    if settled and sol.status == Status.MAX_ITER:  # stopped early: z is exact to round-off
        sol.status = Status.CONVERGED
    return sol


def _true_errors(matvec: Matvec, z: Tensor, b: Tensor, bnorm: Tensor) -> Tensor:
    """``||A z - b|| / ||b||`` per row (0 where ``b = 0`` and ``A z = 0``)."""
    r = (matvec(z) - b).norm(dim=1)
    return torch.where(bnorm > 0, r / bnorm.clamp_min(torch.finfo(b.dtype).tiny), r)


def _polish(
    matvec: Matvec, z: Tensor, b: Tensor, bnorm: Tensor, cycle: tuple[Tensor, Tensor],
    estimate: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One free Richardson step after GMRES: ``z' = z + r = b + J^T z``, per row if it helps.

    ``r = b - A z`` is already spanned by the Krylov basis, so ``z'`` costs no product, and its
    residual is ``J^T r``: for a contractive J smaller than GMRES's own, and ``z'`` lies in a
    Krylov space one dimension larger (what a Neumann series of the same products reaches).
    The one product of the true residual decides per row: ``z'`` is kept where its true residual
    is at most GMRES's estimate ``||r||``; elsewhere (J expands r) ``z`` is, at one more product.
    Returns the solution, its true relative residuals, and ``||A r|| / ||r||`` per row (an
    upper estimate of ``sigma_min(A)`` along the residual, the direction the Krylov space has
    resolved least; ``A r = A z' - b + r`` costs no product; inf where ``r = 0``).
    """
    basis, coef = cycle
    r = torch.einsum("bk,kbn->bn", coef, basis)
    polished = z + r
    scale = torch.where(bnorm > 0, bnorm, 1.0)
    a_polished = matvec(polished)
    res = (a_polished - b).norm(dim=1)
    errors = torch.where(bnorm > 0, res / bnorm.clamp_min(torch.finfo(b.dtype).tiny), res)
    rn = r.norm(dim=1)
    probe = torch.where(rn > 0, (a_polished - b + r).norm(dim=1) / torch.where(rn > 0, rn, 1.0),
                        torch.inf)
    keep = errors <= estimate / scale
    if bool(keep.all()):
        return polished, errors, probe
    plain = _true_errors(matvec, z, b, bnorm)
    return torch.where(keep[:, None], polished, z), torch.where(keep, errors, plain), probe


def _error_from_residual(
    z: Tensor, b: Tensor, residuals: list[float], smin: Tensor | None
) -> list[float]:
    """Relative error estimates ``||z - z*|| / ||z||`` per row from the true relative residuals
    ``||A z - b|| / ||b||`` and an estimate ``smin`` of each row's ``sigma_min(A)``:
    ``||z - z*|| = ||A^{-1} r|| <= ||r|| / sigma_min(A)``. The Krylov estimates of
    ``sigma_min(A)`` (Ritz values) approach it from above as the space grows, so the estimate
    approaches this bound from below; ``smin = None`` (none available): the residual itself."""
    if smin is None:
        return list(residuals)
    scale = (b.norm(dim=1) / (smin.to(b.dtype) * z.norm(dim=1))).cpu().double().tolist()
    out = []
    for res, k in zip(residuals, scale, strict=True):
        if res == 0.0 or not math.isfinite(res):
            out.append(res)
        elif math.isnan(k):  # z = 0 and smin = 0
            out.append(math.inf)
        else:
            out.append(max(res, res * k))  # never below the residual
    return out


def _with_error_estimates(sol: Solution, b: Tensor, smin: Tensor | None) -> Solution:
    """Keep the true residuals in ``sample_residuals``; ``sample_errors`` become error estimates."""
    sol.sample_residuals = sol.sample_errors
    if sol.sample_errors is not None:
        sol.sample_errors = _error_from_residual(sol.z, b, sol.sample_errors, smin)
    return sol


def _hessenberg_smin(r: Tensor, cols: Tensor) -> Tensor:
    """Smallest singular value of each row's ``R`` (the triangular factor of the Arnoldi
    Hessenberg matrix ``H``, same singular values) over the first ``cols`` columns of that row
    (those built before its Krylov space stopped growing; the later ones are zero)."""
    j = r.shape[-1]
    r = torch.where(torch.isfinite(r), r, 0.0).to(_wide(r))
    idx = torch.arange(j, device=r.device)
    dead = idx[None, :] >= cols[:, None]  # (rows, j): a column built after breakdown
    big = r.abs().amax((1, 2), keepdim=True) + 1.0
    r = torch.where(dead[:, None, :], 0.0, r) + torch.diag_embed(dead * big[:, 0])
    return torch.linalg.svdvals(r)[:, -1]


def _krylov_status(
    sol: Solution, tol: float | None, broke: list[bool], dtype: torch.dtype
) -> Solution:
    """Judge a Krylov solve on its true residual rather than on its internal estimate.

    ``broke[i]``: row i's Krylov space stopped growing (or CG lost definiteness). That is an
    exact solve when the true residual is small (below ``sqrt(eps)``), and a breakdown on a
    singular system otherwise.
    """
    if sol.status == Status.DIVERGED:
        return sol
    errors = sol.sample_errors or [0.0]
    eps = torch.finfo(dtype).eps
    small = math.sqrt(eps)
    if any(b and e > small for b, e in zip(broke, errors, strict=False)):
        sol.status = Status.BREAKDOWN
    elif all(e <= max(1e3 * eps, tol or 0.0) for e in errors) or (
        all(broke) and all(e <= small for e in errors)
    ):
        sol.status = Status.CONVERGED
    elif sol.status == Status.CONVERGED:
        # the solver's own residual says solved but the true one does not: A is singular
        inconsistent = max(errors) > max(small, 100 * (tol or 0.0))
        sol.status = Status.BREAKDOWN if inconsistent else Status.MAX_ITER
    elif sol.status == Status.GROWING:
        sol.status = Status.STALLED
    return sol


def conjugate_gradient_normal(
    matvec: Matvec, b: Tensor, *, max_iter: int, tol: float | None = None, check_every: int = 10
) -> Solution:
    """CG-RBP: conjugate gradient on ``A A^T z = A b`` (``A = I - J^T``) from ``z = 0``, per row.

    Assumes ``I - J`` is invertible (the normal equations are then symmetric positive definite);
    their condition number is the square of ``A``'s. Needs ``matvec.rmatvec`` (``J v``); each
    iteration costs one ``J^T v`` and one ``J v``. Residual: the normal-equation one. Error
    estimate: the true relative residual ``||A z - b|| / ||b||`` (one more product; kept in
    ``sample_residuals``) times ``||b|| / (sigma ||z||)``, ``sigma`` the smaller of the Lanczos
    matrix's smallest Ritz value (its square root) and ``||A r|| / ||r||`` along the final
    residual (one more product), both upper estimates of ``sigma_min(A)``.
    """
    b = _rows(b)
    rmatvec = getattr(matvec, "rmatvec", None)
    if rmatvec is None:
        raise ValueError("CGNormal needs an operator with rmatvec(v) = (I - J) v")
    estimate = _estimating(matvec)
    bnorm = b.norm(dim=1)
    floor = (torch.finfo(b.dtype).eps * bnorm) ** 2
    z = torch.zeros_like(b)
    r = rmatvec(b)
    p = r.clone()
    rr = (r * r).sum(1)
    norms: list[Tensor] = []
    coefs: list[Tensor] = []  # (alpha, beta) per iteration: the Lanczos matrix of A^T A
    broke = torch.zeros_like(bnorm, dtype=torch.bool)
    i = 0
    for i in range(1, max_iter + 1):
        ap = rmatvec(matvec(p))
        p_ap = (p * ap).sum(1)
        # rows solved to round-off, or whose operator lost definiteness (I - J singular), freeze
        broke = broke | ((rr > floor) & ~(p_ap > 0))
        active = (rr > floor) & ~broke
        alpha = torch.where(active, rr / p_ap.clamp_min(1e-300), 0.0)
        z = z + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * ap
        rr_next = (r * r).sum(1)
        norms.append(rr_next.sqrt())
        beta = torch.where(active, rr_next / rr.clamp_min(1e-300), 0.0)
        if estimate:
            coefs.append(torch.stack([alpha, beta]))
        p = r + beta.unsqueeze(1) * p
        rr = rr_next
        if _due(i, max_iter, check_every, 0.0):  # Krylov: breakdown is worth a check
            done = rr <= floor
            if tol is not None:
                done = done | (norms[-1] <= tol * bnorm)
            if bool((done | broke).all()) or not bool(torch.isfinite(rr).all()):
                break
    resid = b - matvec(z)
    rn = resid.norm(dim=1)
    errors = torch.where(bnorm > 0, rn / bnorm.clamp_min(torch.finfo(b.dtype).tiny), rn)
    sol = _finish(z, i, norms, bnorm, tol, true_errors=errors)
    stalled = len(norms) >= 10 and sol.residuals[-1] > 0.999 * sol.residuals[-10]
    if sol.status == Status.MAX_ITER and stalled:
        sol.status = Status.STALLED
    sol = _krylov_status(sol, tol, broke.tolist(), b.dtype)
    if not estimate:
        return _with_error_estimates(sol, b, None)
    smin = _lanczos_smin(coefs)
    if sol.sample_errors is not None and max(sol.sample_errors) > 0:
        # ||A r|| / ||r|| along the final residual (one more product): the direction CG has
        # resolved least, where the Ritz value may not have reached sigma_min yet
        probe = torch.where(rn > 0, matvec(resid).norm(dim=1) / torch.where(rn > 0, rn, 1.0),
                            torch.inf).to(_wide(rn))
        smin = probe if smin is None else torch.minimum(smin, probe)
    return _with_error_estimates(sol, b, smin)


def _lanczos_smin(coefs: list[Tensor]) -> Tensor | None:
    """``sigma_min(A)`` per row estimated from CG's coefficients on ``A^T A``: the smallest
    eigenvalue of the Lanczos tridiagonal matrix ``T`` (diagonal ``1/a_j + b_{j-1}/a_{j-1}``,
    off-diagonal ``sqrt(b_j)/a_j``), a Ritz value that approaches ``sigma_min(A)^2`` from above.
    Iterations where a row was frozen (alpha = 0) are left out of its T."""
    if not coefs:
        return None
    ab = torch.stack(coefs)
    ab = ab.to(_wide(ab))  # (k, 2, rows)
    alpha, beta = ab[:, 0].T, ab[:, 1].T  # (rows, k)
    ok = alpha > 0
    # a row's T stops at its first frozen iteration
    ok = torch.cumprod(ok.to(torch.int8), dim=1).bool()
    safe = torch.where(ok, alpha, 1.0)
    diag = 1.0 / safe
    diag[:, 1:] += torch.where(ok[:, 1:], beta[:, :-1] / safe[:, :-1], 0.0)
    off = torch.where(ok[:, 1:], beta[:, :-1].clamp_min(0).sqrt() / safe[:, :-1], 0.0)
    big = diag.abs().amax(dim=1, keepdim=True) * 2 + 1.0  # frozen slots: eigenvalues far above
    diag = torch.where(ok, diag, big)
    t = torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    if not bool(torch.isfinite(t).all()):
        return None
    lam = torch.linalg.eigvalsh(t)[:, 0]
    any_ok = ok[:, 0]
    return torch.where(any_ok, lam.clamp_min(0).sqrt(), torch.nan)


def gmres(
    matvec: Matvec,
    b: Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    restart: int = 30,
    check_every: int = 10,
) -> Solution:
    """GMRES(restart) on ``(I - J^T) z = b`` from ``z = 0``, one Krylov space per row.

    Minimises each row's residual ``||b - A z||`` over its Krylov space (Arnoldi with classical
    Gram-Schmidt twice, Givens rotations kept as one orthogonal matrix per row), so it needs no
    symmetry and does not square the condition number; works whenever ``I - J`` is invertible,
    including ``rho(J) >= 1``. It ends with one Richardson step ``z + r = b + J^T z`` that costs
    no product (``r`` lies in the basis) and is kept per row where it lowers the true residual:
    K products then reach a Krylov space of dimension K + 1, as a K-term Neumann series does.
    One product per iteration (plus one per restart and one for the true residual at the end,
    two for rows whose last step is not kept); memory ``restart + 1`` vectors. A row whose
    Krylov space stops growing has found its solution, unless the true residual says otherwise
    (breakdown on a singular system). Error estimate: the true relative residual (kept in
    ``sample_residuals``) times ``||b|| / (sigma ||z||)``, ``sigma`` the smallest singular value
    of the cycles' Hessenberg matrices and ``||A r|| / ||r||`` along the last residual.
    """
    b = _rows(b)
    estimate = _estimating(matvec)
    rows, n = b.shape
    bnorm = b.norm(dim=1)
    eps = torch.finfo(b.dtype).eps
    z = torch.zeros_like(b)
    norms: list[Tensor] = []
    broke = torch.zeros(rows, dtype=torch.bool, device=b.device)
    done = 0
    smin = torch.full((rows,), math.inf, dtype=_wide(b), device=b.device)
    cycle: tuple[Tensor, Tensor] | None = None  # the last cycle's basis and residual in it
    while done < max_iter:
        r = b - matvec(z) if done else b
        cycle = None  # z already holds the last cycle; r is its residual
        beta = r.norm(dim=1)
        if done and bool((beta <= (tol or 0.0) * bnorm).all()):
            break
        m = min(restart, max_iter - done)
        basis = b.new_zeros(m + 1, rows, n)
        basis[0] = r / torch.where(beta > 0, beta, 1.0).unsqueeze(1)
        r_mat = b.new_zeros(rows, m, m)
        rot = torch.eye(m + 1, dtype=b.dtype, device=b.device).repeat(rows, 1, 1)
        alive = beta > 0
        cols = torch.zeros(rows, dtype=torch.long, device=b.device)  # columns built while alive
        j_end = 0
        for j in range(m):
            cols = cols + alive
            w = matvec(basis[j])
            done += 1
            v = basis[: j + 1]
            h = torch.einsum("kbn,bn->bk", v, w)
            w = w - torch.einsum("bk,kbn->bn", h, v)
            h2 = torch.einsum("kbn,bn->bk", v, w)
            w = w - torch.einsum("bk,kbn->bn", h2, v)
            h = h + h2
            h_next = w.norm(dim=1)
            col = torch.cat([h, h_next.unsqueeze(1)], 1)  # (rows, j + 2)
            col = torch.einsum("bik,bk->bi", rot[:, : j + 2, : j + 2], col)
            a, c = col[:, j], col[:, j + 1]
            rad = torch.hypot(a, c)
            cs = torch.where(rad > 0, a / rad.clamp_min(1e-300), 1.0)
            sn = torch.where(rad > 0, c / rad.clamp_min(1e-300), 0.0)
            col[:, j], col[:, j + 1] = rad, 0.0
            r_mat[:, : j + 1, j] = col[:, : j + 1]
            row_j, row_k = rot[:, j].clone(), rot[:, j + 1].clone()
            rot[:, j] = cs.unsqueeze(1) * row_j + sn.unsqueeze(1) * row_k
            rot[:, j + 1] = -sn.unsqueeze(1) * row_j + cs.unsqueeze(1) * row_k
            norms.append(beta * rot[:, j + 1, 0].abs())
            grew = h_next > 50 * eps * beta
            broke = broke | (alive & ~grew)
            alive = alive & grew
            basis[j + 1] = torch.where(
                alive.unsqueeze(1), w / torch.where(alive, h_next, 1.0).unsqueeze(1), 0.0
            )
            j_end = j + 1
            if _due(done, max_iter, check_every, 0.0):
                stop = ~alive
                if tol is not None:
                    stop = stop | (norms[-1] <= tol * bnorm)
                if bool(stop.all()) or not bool(torch.isfinite(norms[-1]).all()):
                    break
        if j_end and estimate:  # sigma_min of the cycle's Hessenberg matrix (R's: its QR)
            smin = torch.minimum(smin, _hessenberg_smin(r_mat[:, :j_end, :j_end], cols))
        diag = torch.diagonal(r_mat[:, :j_end, :j_end], dim1=1, dim2=2)
        rhs = beta.unsqueeze(1) * rot[:, :j_end, 0]
        usable = diag.abs() > 1e-300
        tri = r_mat[:, :j_end, :j_end] + torch.diag_embed(torch.where(usable, 0.0, 1.0))
        rhs = torch.where(usable, rhs, 0.0)
        y = torch.linalg.solve_triangular(tri, rhs.unsqueeze(2), upper=True).squeeze(2)
        z = z + torch.einsum("bk,kbn->bn", y, basis[:j_end])
        last = norms[-1]
        # the cycle's residual b - A z = V_{j+1} Q^T (g_{j+1} e_{j+1}), from the basis alone
        coef = (beta * rot[:, j_end, 0]).unsqueeze(1) * rot[:, j_end, : j_end + 1]
        cycle = (basis[: j_end + 1], coef)
        if not bool(torch.isfinite(last).all()):
            break
        if bool((~alive | (last <= (tol if tol is not None else 0.0) * bnorm)).all()):
            break
    if cycle is not None:
        z, errors, probe = _polish(matvec, z, b, bnorm, cycle, norms[-1])
        smin = torch.minimum(smin, probe.to(smin.dtype))
    else:
        errors = _true_errors(matvec, z, b, bnorm)
    sol = _finish(z, done, norms, bnorm, tol, true_errors=errors)
    if sol.status == Status.GROWING:  # GMRES residuals never grow; equal means no progress
        sol.status = Status.STALLED
    sol = _krylov_status(sol, tol, broke.tolist(), b.dtype)
    return _with_error_estimates(sol, b, smin if done and estimate else None)


# --------------------------------------------------------------------------- solver values


@dataclass(frozen=True)
class _Options:
    max_iter: int = 20
    tol: float | None = None
    check_every: int = 10

    def __post_init__(self) -> None:
        _check_int("max_iter", self.max_iter)
        _check_tol(self.tol)
        _check_int("check_every", self.check_every)


@dataclass(frozen=True)
class Neumann(_Options):
    """Neumann series ``sum_{t<=K} (J^T)^t g`` (Alg. 2). Assumes rho(J) < 1; O(1) memory."""

    name = "neumann"

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return neumann(
            matvec, b, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every
        )


@dataclass(frozen=True)
class RBP(_Options):
    """Fixed-point iteration ``z <- J^T z + g`` (Alg. 1). Assumes rho(J) < 1; O(1) memory.

    ``init``: ``"zeros"`` (default: the gradient is linear in the loss and zero for a zero
    loss) or ``"uniform"``, the paper's ``z_0 ~ U[0, 1]``.
    """

    init: str = "zeros"
    name = "rbp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("zeros", "uniform"):
            raise ValueError(f"init must be 'zeros' or 'uniform', got {self.init!r}")

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        z0 = torch.rand_like(b) if self.init == "uniform" else None
        return fixed_point_iteration(
            matvec, b, max_iter=self.max_iter, tol=self.tol, z0=z0, check_every=self.check_every
        )


@dataclass(frozen=True)
class CGNormal(_Options):
    """CG on the normal equations (CG-RBP). Assumes ``I - J`` invertible; needs ``J v``."""

    name = "cg"
    needs_jvp = True

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return conjugate_gradient_normal(
            matvec, b, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every
        )


@dataclass(frozen=True)
class GMRES(_Options):
    """GMRES(restart) on ``(I - J^T) z = g``. Assumes ``I - J`` invertible; O(restart) memory."""

    restart: int = 30
    name = "gmres"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("restart", self.restart)

    def solve(self, matvec: Matvec, b: Tensor) -> Solution:
        return gmres(
            matvec,
            b,
            max_iter=self.max_iter,
            tol=self.tol,
            restart=min(self.restart, self.max_iter),
            check_every=self.check_every,
        )


SOLVERS: dict[str, type[_Options]] = {
    "rbp": RBP,
    "neumann": Neumann,
    "cg": CGNormal,
    "gmres": GMRES,
}
