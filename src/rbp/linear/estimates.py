"""A-posteriori error estimates of the series solvers: the geometric and Ritz tails of the
increments, the status of a solve and the one host read that decides it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from rbp.diagnostics import Status
from rbp.linear.protocol import DIVERGENCE_FACTOR, RATE_WINDOW, Solution, Tensor


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
