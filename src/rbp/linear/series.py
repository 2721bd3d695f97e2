"""The series solvers: Neumann (Alg. 2) and the fixed-point iteration of original RBP (Alg. 1)."""

from __future__ import annotations

import torch

from rbp.diagnostics import Status
from rbp.linear.estimates import _classify, _finish, _read, _Window, _window_gram
from rbp.linear.protocol import RATE_WINDOW, Matvec, Solution, Tensor, _estimating, _rows, _vjp_of

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
