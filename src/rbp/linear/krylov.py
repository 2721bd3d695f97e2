"""The Krylov solvers: CG on the normal equations (CG-RBP) and GMRES, each with an error
estimate from the Krylov process (the residual over an estimate of ``sigma_min(I - J^T)``)."""

from __future__ import annotations

import math

import torch

from rbp.diagnostics import Status
from rbp.linear.estimates import _finish
from rbp.linear.protocol import Matvec, Solution, Tensor, _estimating, _rows, _wide
from rbp.linear.series import _due


def _true_errors(matvec: Matvec, z: Tensor, b: Tensor, bnorm: Tensor) -> Tensor:
    """``||A z - b|| / ||b||`` per row (0 where ``b = 0`` and ``A z = 0``)."""
    r = (matvec(z) - b).norm(dim=1)
    return torch.where(bnorm > 0, r / bnorm.clamp_min(torch.finfo(b.dtype).tiny), r)


def _polish(
    matvec: Matvec, z: Tensor, b: Tensor, bnorm: Tensor, cycle: tuple[Tensor, Tensor],
    estimate: Tensor, precondition: Matvec | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One free Richardson step after GMRES: ``z' = z + r = b + J^T z``, per row if it helps.

    ``r = b - A z`` is already spanned by the Krylov basis, so ``z'`` costs no product, and its
    residual is ``J^T r``: for a contractive J smaller than GMRES's own, and ``z'`` lies in a
    Krylov space one dimension larger (what a Neumann series of the same products reaches).
    The one product of the true residual decides per row: ``z'`` is kept where its true residual
    is at most GMRES's estimate ``||r||``; elsewhere (J expands r) ``z`` is, at one more product.
    Returns the solution, its true relative residuals, and ``||A r|| / ||r||`` per row (an
    upper estimate of ``sigma_min(A)`` along the residual, the direction the Krylov space has
    resolved least; ``A r = A z' - b + r`` costs no product; inf where ``r = 0``). With a right
    preconditioner ``M`` (``z`` in the space of ``A z = b``, ``r`` in the preconditioned one):
    the step is ``M r``, and the probe ``||A M r|| / ||M r||``.
    """
    basis, coef = cycle
    r = torch.einsum("bk,kbn->bn", coef, basis)
    step = r if precondition is None else precondition(r)  # (A step = A z' - b + r either way)
    polished = z + step
    scale = torch.where(bnorm > 0, bnorm, 1.0)
    a_polished = matvec(polished)
    res = (a_polished - b).norm(dim=1)
    errors = torch.where(bnorm > 0, res / bnorm.clamp_min(torch.finfo(b.dtype).tiny), res)
    rn = step.norm(dim=1)
    probe = torch.where(rn > 0, (a_polished - b + r).norm(dim=1) / torch.where(rn > 0, rn, 1.0),
                        torch.inf)
    keep = errors <= estimate / scale
    if bool(keep.all()):
        return polished, errors, probe
    plain = _true_errors(matvec, z, b, bnorm)
    return torch.where(keep[:, None], polished, z), torch.where(keep, errors, plain), probe


def _against_gram(r: Tensor, mapped: Tensor, cols: Tensor) -> Tensor:
    """``R L^{-T}`` per row, ``L L^T`` the Gram matrix of ``M V`` (``mapped``: the cycle's
    basis ``V`` mapped by the preconditioner): its singular values are ``||R c|| / ||M V c||``
    at their extremes, so its smallest estimates ``sigma_min(A)`` over the space ``M V`` searched.
    Columns built after a row's breakdown (zero in ``V``) get an identity block."""
    j = r.shape[-1]
    wide = _wide(r)
    mv = mapped.transpose(0, 1).to(wide)  # (rows, j, n): M V, kept from the Arnoldi products
    gram = mv @ mv.mT
    idx = torch.arange(j, device=r.device)
    dead = idx[None, :] >= cols[:, None]
    keep = ~(dead[:, :, None] | dead[:, None, :])
    gram = torch.where(keep, gram, 0.0) + torch.diag_embed(dead.to(wide))
    low, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0  # a numerically singular Gram matrix (M nearly rank-deficient on V)
    low = torch.where(bad[:, None, None], torch.eye(j, dtype=wide, device=r.device), low)
    out = torch.linalg.solve_triangular(low, r.to(wide).mT, upper=False)  # L^{-1} R^T
    return out.mT.to(r.dtype)  # R L^{-T}: the same singular values, R's dead columns kept


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
    sol: Solution, tol: float | None, broke: list[bool], dtype: torch.dtype,
    product_eps: float | None = None,
) -> Solution:
    """Judge a Krylov solve on its true residual rather than on its internal estimate.

    ``broke[i]``: row i's Krylov space stopped growing (or CG lost definiteness). That is an
    exact solve when the true residual is small (below ``sqrt(eps)``, ``eps`` the unit
    round-off of the vectors or, if larger, of the products: ``product_eps``), and a
    breakdown on a singular system otherwise.
    """
    if sol.status == Status.DIVERGED:
        return sol
    errors = sol.sample_errors or [0.0]
    eps = max(torch.finfo(dtype).eps, product_eps or 0.0)
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
    sol = _krylov_status(sol, tol, broke.tolist(), b.dtype, getattr(matvec, "eps", None))
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


def _orthogonalise(v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice: ``w`` minus its projection on the orthonormal rows of
    ``v`` (``(k, rows, n)``), and the projection's coefficients ``(rows, k)``."""
    h = torch.einsum("kbn,bn->bk", v, w)
    w = w - torch.einsum("bk,kbn->bn", h, v)
    h2 = torch.einsum("kbn,bn->bk", v, w)
    w = w - torch.einsum("bk,kbn->bn", h2, v)
    return h + h2, w


def _rotate_in(rot: Tensor, r_mat: Tensor, h: Tensor, h_next: Tensor, j: int) -> None:
    """Column ``j`` of the Hessenberg matrix, ``(h, h_next)``, through the rotations so far
    (``rot``, one orthogonal matrix per row) and a new Givens rotation that zeroes its last
    entry: column ``j`` of the triangular ``r_mat``; ``rot`` takes the new rotation. In place."""
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


def _least_squares(tri: Tensor, rhs: Tensor) -> Tensor:
    """The cycle's coefficients ``y`` from ``R y = beta Q e_1`` per row, ``R`` upper triangular;
    a zero pivot (a column built after the row's Krylov space stopped growing) gives 0."""
    usable = torch.diagonal(tri, dim1=1, dim2=2).abs() > 1e-300
    tri = tri + torch.diag_embed(torch.where(usable, 0.0, 1.0))
    rhs = torch.where(usable, rhs, 0.0)
    return torch.linalg.solve_triangular(tri, rhs.unsqueeze(2), upper=True).squeeze(2)


def gmres(
    matvec: Matvec,
    b: Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    restart: int = 30,
    check_every: int = 10,
    z0: Tensor | None = None,
    precondition: Matvec | None = None,
) -> Solution:
    """GMRES(restart) on ``(I - J^T) z = b`` from ``z = 0`` (or ``z0``: one more product, for
    its residual), one Krylov space per row.

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

    ``precondition``: a right preconditioner ``M ~ A^{-1}`` (no product: e.g. SHINE's
    ``-H^T``; one application per iteration and one for the last step): GMRES then runs on
    ``A M y = b`` and returns ``z = M y`` (``z0`` is refused with it); the residuals are those
    of ``A z = b``, and ``sigma`` estimates ``sigma_min(A)`` over
    the space searched, ``min ||A M V c|| / ||M V c||`` (a generalised singular value of the
    Hessenberg matrix against the Gram matrix of ``M V``), and ``||A M r|| / ||M r||``.
    """
    b = _rows(b)
    if precondition is not None and z0 is not None:
        raise ValueError("gmres: z0 and precondition together are not supported")
    estimate = _estimating(matvec)
    rows, n = b.shape
    bnorm = b.norm(dim=1)
    eps = torch.finfo(b.dtype).eps
    z = torch.zeros_like(b) if z0 is None else z0
    norms: list[Tensor] = []
    broke = torch.zeros(rows, dtype=torch.bool, device=b.device)
    done = 0
    first = z0 is not None  # the first cycle starts from the residual of z0
    smin = torch.full((rows,), math.inf, dtype=_wide(b), device=b.device)
    cycle: tuple[Tensor, Tensor] | None = None  # the last cycle's basis and residual in it
    while done < max_iter:
        r = b - matvec(z) if done or first else b
        cycle = None  # z already holds the last cycle; r is its residual
        beta = r.norm(dim=1)
        if (done or first) and bool((beta <= (tol or 0.0) * bnorm).all()):
            break
        first = False
        m = min(restart, max_iter - done)
        basis = b.new_zeros(m + 1, rows, n)
        # with a preconditioner: M v_j, so that z = z + M V y and the estimate need no more
        mapped = basis if precondition is None else b.new_zeros(m, rows, n)
        basis[0] = r / torch.where(beta > 0, beta, 1.0).unsqueeze(1)
        r_mat = b.new_zeros(rows, m, m)
        rot = torch.eye(m + 1, dtype=b.dtype, device=b.device).repeat(rows, 1, 1)
        alive = beta > 0
        cols = torch.zeros(rows, dtype=torch.long, device=b.device)  # columns built while alive
        j_end = 0
        for j in range(m):
            cols = cols + alive
            if precondition is None:
                w = matvec(basis[j])
            else:
                mapped[j] = precondition(basis[j])
                w = matvec(mapped[j])
            done += 1
            h, w = _orthogonalise(basis[: j + 1], w)
            h_next = w.norm(dim=1)
            _rotate_in(rot, r_mat, h, h_next, j)
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
            r_cycle = r_mat[:, :j_end, :j_end]
            if precondition is not None:  # against the Gram matrix of M V: sigma_min in z
                r_cycle = _against_gram(r_cycle, mapped[:j_end], cols)
            smin = torch.minimum(smin, _hessenberg_smin(r_cycle, cols))
        y = _least_squares(r_mat[:, :j_end, :j_end], beta.unsqueeze(1) * rot[:, :j_end, 0])
        z = z + torch.einsum("bk,kbn->bn", y, mapped[:j_end])
        last = norms[-1]
        # the cycle's residual b - A z = V_{j+1} Q^T (g_{j+1} e_{j+1}), from the basis alone
        coef = (beta * rot[:, j_end, 0]).unsqueeze(1) * rot[:, j_end, : j_end + 1]
        cycle = (basis[: j_end + 1], coef)
        if not bool(torch.isfinite(last).all()):
            break
        if bool((~alive | (last <= (tol if tol is not None else 0.0) * bnorm)).all()):
            break
    if cycle is not None:
        z, errors, probe = _polish(matvec, z, b, bnorm, cycle, norms[-1], precondition)
        smin = torch.minimum(smin, probe.to(smin.dtype))
    else:
        errors = _true_errors(matvec, z, b, bnorm)
    sol = _finish(z, done, norms, bnorm, tol, true_errors=errors)
    if sol.status == Status.GROWING:  # GMRES residuals never grow; equal means no progress
        sol.status = Status.STALLED
    sol = _krylov_status(sol, tol, broke.tolist(), b.dtype, getattr(matvec, "eps", None))
    return _with_error_estimates(sol, b, smin if done and estimate else None)
