"""Each backward solver on its own, against a dense float64 solve of (I - J^T) z = b."""

from __future__ import annotations

import math

import pytest
import torch

import rbp
from rbp import linear
from rbp.diagnostics import Status

DT = torch.float64
N = 10


def _orth(gen: torch.Generator, n: int = N) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))[0]


def jacobians(kind: str, rows: int = 3, seed: int = 0) -> torch.Tensor:
    """(rows, N, N) Jacobians J of one kind; every row has rho(J) < 1."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        q = _orth(gen)
        if kind == "spd":  # I - J^T symmetric positive definite
            j = q @ torch.diag(torch.linspace(-0.5, 0.9, N, dtype=DT)) @ q.T
        elif kind == "nonsymmetric":
            j = torch.randn(N, N, dtype=DT, generator=gen)
            j = 0.8 * j / torch.linalg.eigvals(j).abs().max()
        elif kind == "nonnormal":  # rho = 0.5, ||J||_2 ~ 2: transient growth
            j = (
                q
                @ (
                    0.5 * torch.eye(N, dtype=DT)
                    + torch.diag(torch.full((N - 1,), 1.5, dtype=DT), 1)
                )
                @ q.T
            )
        elif kind == "nearsingular":  # smallest eigenvalue of I - J^T is 1e-4
            j = q @ torch.diag(torch.linspace(0.0, 1 - 1e-4, N, dtype=DT)) @ q.T
        else:
            raise AssertionError(kind)
        out.append(j)
    return torch.stack(out)


def operator(jac: torch.Tensor) -> linear.AdjointOperator:
    return linear.AdjointOperator(
        lambda v: torch.einsum("bij,bi->bj", jac, v), lambda v: torch.einsum("bij,bj->bi", jac, v)
    )


def dense(jac: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(jac.shape[-1], dtype=DT)
    return torch.linalg.solve(eye - jac.transpose(1, 2), b)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


KRYLOV = {
    "gmres": lambda k: linear.GMRES(max_iter=k),
    "cg": lambda k: linear.CGNormal(max_iter=3 * k),
}
SERIES = {
    "neumann": lambda k: linear.Neumann(max_iter=k),
    "rbp": lambda k: linear.RBP(max_iter=k),
}


@pytest.mark.parametrize("kind", ["spd", "nonsymmetric", "nonnormal", "nearsingular"])
@pytest.mark.parametrize("name", list(KRYLOV))
def test_krylov_solvers_match_dense_solve(kind, name):
    jac = jacobians(kind)
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))
    sol = KRYLOV[name](N).solve(operator(jac), b)
    tol = 1e-6 if kind == "nearsingular" else 1e-9
    assert rel(sol.z, dense(jac, b)) <= tol
    # judged on the true residual: round-off of an ill-conditioned system may keep it above
    # the convergence floor, never above what the dense solve shows
    assert sol.status in (Status.CONVERGED, Status.MAX_ITER)
    assert sol.error_estimate is not None and sol.error_estimate <= 1e-9  # true residual
    if kind == "spd":
        assert sol.status == Status.CONVERGED


@pytest.mark.parametrize("kind", ["spd", "nonsymmetric", "nonnormal"])
@pytest.mark.parametrize("name", list(SERIES))
def test_series_solvers_match_dense_solve(kind, name):
    jac = jacobians(kind)
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))
    sol = SERIES[name](400).solve(operator(jac), b)
    assert rel(sol.z, dense(jac, b)) <= 1e-9
    assert sol.status in (Status.CONVERGED, Status.MAX_ITER)
    assert sol.error_estimate <= 1e-9


@pytest.mark.parametrize("name", list(SERIES))
def test_series_error_estimate_tracks_truncation_error(name):
    """The tail estimate is within a factor of the true error of a truncated series."""
    jac = jacobians("spd")
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(2))
    want = dense(jac, b)
    for k in (10, 40):
        sol = SERIES[name](k).solve(operator(jac), b)
        true = ((sol.z - want).norm(dim=1) / sol.z.norm(dim=1)).tolist()
        for est, err in zip(sol.sample_errors, true, strict=True):
            assert err / 3 <= est <= 3 * err + 1e-15


def test_near_singular_series_reports_a_large_error():
    jac = jacobians("nearsingular")
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(3))
    sol = linear.Neumann(max_iter=20).solve(operator(jac), b)
    true = rel(sol.z, dense(jac, b))
    assert true > 0.5 and sol.error_estimate > 0.5


def test_rows_are_independent_systems():
    """A batched solve equals solving each row alone (per-sample Krylov spaces)."""
    jac = jacobians("nonnormal", rows=4, seed=5)
    b = torch.randn(4, N, dtype=DT, generator=torch.Generator().manual_seed(6))
    for make in (*KRYLOV.values(), *SERIES.values()):
        batched = make(6).solve(operator(jac), b)
        for i in range(4):
            alone = make(6).solve(operator(jac[i : i + 1]), b[i : i + 1])
            assert torch.allclose(batched.z[i], alone.z[0], rtol=1e-10, atol=1e-13)
            assert batched.sample_errors[i] == pytest.approx(alone.sample_errors[0], rel=1e-8)


def test_batched_gmres_beats_one_krylov_space_for_the_batch():
    """Per-row GMRES at K = 8 (of N = 10) is more accurate than GMRES on the block-diagonal
    whole (not a theorem at every K: at K = 6 on this seed the whole is ahead after the final
    Richardson step, which helps both)."""
    jac = jacobians("nonsymmetric", rows=4, seed=7)
    b = torch.randn(4, N, dtype=DT, generator=torch.Generator().manual_seed(8))
    want = dense(jac, b)
    per_row = linear.GMRES(max_iter=8).solve(operator(jac), b)
    block = torch.block_diag(*jac)
    whole_op = linear.AdjointOperator(lambda v: v @ block)
    whole = linear.GMRES(max_iter=8).solve(whole_op, b.reshape(1, -1))
    assert rel(per_row.z, want) < rel(whole.z.reshape(4, N), want)


def test_gmres_restart_and_tol():
    jac = jacobians("nonsymmetric")
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(9))
    restarted = linear.GMRES(max_iter=150, restart=4).solve(operator(jac), b)
    assert rel(restarted.z, dense(jac, b)) <= 1e-8
    early = linear.GMRES(max_iter=60, tol=1e-6).solve(operator(jac), b)
    assert early.status == Status.CONVERGED and early.iterations < 60
    assert early.error_estimate <= 1e-6


def test_tol_stops_series_per_row():
    jac = jacobians("spd")
    jac[0] *= 0.1  # row 0 converges much faster
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(10))
    sol = linear.Neumann(max_iter=2000, tol=1e-10, check_every=5).solve(operator(jac), b)
    assert sol.status == Status.CONVERGED and sol.iterations < 2000
    assert rel(sol.z, dense(jac, b)) <= 1e-8


# ---- statuses on bad systems ----


def test_singular_system_without_solution_is_breakdown_not_converged():
    """J = I: (I - J^T) z = b has no solution; Krylov solvers must not say converged."""
    jac = torch.eye(N, dtype=DT).expand(2, N, N).clone()
    b = torch.randn(2, N, dtype=DT, generator=torch.Generator().manual_seed(11))
    for solver in (linear.GMRES(max_iter=5), linear.CGNormal(max_iter=5)):
        sol = solver.solve(operator(jac), b)
        assert sol.status == Status.BREAKDOWN, solver
        assert max(sol.sample_residuals) == pytest.approx(1.0)
        assert sol.error_estimate == math.inf  # sigma_min(I - J^T) = 0: no error bound
        assert not sol.ok
    series = linear.Neumann(max_iter=5).solve(operator(jac), b)
    assert series.status == Status.GROWING and series.error_estimate == math.inf


def test_singular_but_consistent_system_converges():
    """A singular J whose range holds b: GMRES finds a solution (happy breakdown)."""
    jac = torch.diag(torch.tensor([1.0] + [0.5] * (N - 1), dtype=DT)).expand(1, N, N).clone()
    b = torch.ones(1, N, dtype=DT)
    b[0, 0] = 0.0
    sol = linear.GMRES(max_iter=N).solve(operator(jac), b)
    assert sol.status == Status.CONVERGED
    assert torch.allclose(operator(jac)(sol.z), b, atol=1e-12)


@pytest.mark.parametrize("make", [*KRYLOV.values(), *SERIES.values()])
def test_zero_residual_stops_at_once(make):
    calls = []

    def counting(jac):
        op = operator(jac)
        inner = op.vjp

        def vjp(v):
            calls.append(1)
            return inner(v)

        op.vjp = vjp
        return op

    b = torch.randn(2, N, dtype=DT)
    for jac, rhs in (
        (torch.zeros(2, N, N, dtype=DT), b),
        (jacobians("spd", 2), torch.zeros_like(b)),
    ):
        calls.clear()
        sol = make(100_000).solve(counting(jac), rhs)
        assert sol.status == Status.CONVERGED
        assert len(calls) <= 4  # not 1e5 useless products
        assert torch.allclose(sol.z, rhs)  # J = 0: z = b; b = 0: z = 0


@pytest.mark.parametrize("make", [*KRYLOV.values(), *SERIES.values()])
def test_nan_in_the_operator_is_diverged_not_a_crash(make):
    op = linear.AdjointOperator(lambda v: v * math.nan, lambda v: v * math.nan)
    sol = make(10).solve(op, torch.ones(2, N, dtype=DT))
    assert sol.status == Status.DIVERGED and not sol.ok


def test_status_names_and_messages():
    assert [s.value for s in Status] == [
        "converged",
        "max_iter",
        "growing",
        "stalled",
        "breakdown",
        "diverged",
    ]
    assert Status.CONVERGED == "converged" and f"{Status.MAX_ITER}" == "max_iter"
    assert all(s.message for s in Status)
    assert Status.MAX_ITER.ok and not Status.BREAKDOWN.ok


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: linear.Neumann(max_iter=0), "max_iter must be an integer >= 1"),
        (lambda: linear.Neumann(max_iter=2.5), "max_iter must be an integer"),
        (lambda: linear.Neumann(max_iter=2.5), r"got 2.5 \(float\)"),
        (lambda: linear.RBP(max_iter=True), "max_iter must be an integer"),
        (lambda: linear.GMRES(restart=2.5), "restart must be an integer"),
        (lambda: linear.GMRES(restart=0), "restart must be an integer >= 1"),
        (lambda: linear.CGNormal(tol=-1.0), "tol must be a finite number > 0"),
        (lambda: linear.CGNormal(tol=math.inf), "tol must be a finite number > 0"),
        (lambda: linear.Neumann(tol=True), "tol must be a finite number > 0"),
        (lambda: linear.RBP(init="random"), "init must be 'zeros' or 'uniform'"),
        (lambda: linear.GMRES(check_every=0), "check_every must be an integer >= 1"),
    ],
)
def test_bad_solver_options_are_refused_at_construction(make, match):
    # a wrong type is a TypeError, a wrong value a ValueError
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_cg_needs_forward_products():
    op = linear.AdjointOperator(lambda v: 0.5 * v)  # no jvp
    with pytest.raises(ValueError, match="J v"):
        linear.CGNormal().solve(op, torch.ones(1, 3, dtype=DT))


def test_float32_solve_stays_float32():
    jac = jacobians("spd").float()
    op = linear.AdjointOperator(lambda v: torch.einsum("bij,bi->bj", jac, v))
    sol = linear.GMRES(max_iter=N).solve(op, torch.ones(3, N))
    assert sol.z.dtype == torch.float32
    assert rel(sol.z.double(), dense(jac.double(), torch.ones(3, N, dtype=DT))) <= 1e-4


def test_public_names():
    assert rbp.linear.SOLVERS["gmres"] is linear.GMRES
    assert isinstance(linear.GMRES(), linear.Solver)


def _krylov(jac: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, dim) basis of span{b, J^T b, ..., (J^T)^(dim-1) b} for one row."""
    cols, v = [], b
    for _ in range(dim):
        cols.append(v)
        v = jac.T @ v  # J^T v (row convention: v @ J)
    return torch.stack(cols, 1)


def _best_residual(jac: torch.Tensor, b: torch.Tensor, dim: int) -> float:
    """min over the dim-dimensional Krylov space of ||(I - J^T) y - b|| (dense least squares)."""
    a = torch.eye(N, dtype=DT) - jac.T
    ak = a @ _krylov(jac, b, dim)
    y = torch.linalg.lstsq(ak, b[:, None]).solution
    return (ak @ y - b[:, None]).norm().item()


@pytest.mark.parametrize("kind", ["spd", "nonsymmetric", "nonnormal"])
def test_gmres_final_step_reaches_one_more_krylov_dimension(kind: str):
    """After K products GMRES returns a point of the (K + 1)-dim Krylov space (as a K-term
    Neumann series does) whose residual is no larger than the best of the K-dim space."""
    k = 5
    jac = jacobians(kind, rows=3, seed=11)
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(12))
    sol = linear.GMRES(max_iter=k).solve(operator(jac), b)
    for i in range(3):
        basis = _krylov(jac[i], b[i], k + 1)
        coef = torch.linalg.lstsq(basis, sol.z[i][:, None]).solution
        assert (basis @ coef)[:, 0].sub(sol.z[i]).norm() <= 1e-8 * sol.z[i].norm()
        true = ((torch.eye(N, dtype=DT) - jac[i].T) @ sol.z[i] - b[i]).norm().item()
        assert sol.sample_residuals[i] == pytest.approx(true / b[i].norm().item(), rel=1e-9)
        best = _best_residual(jac[i], b[i], k)
        assert true <= best * (1 + 1e-9)
        if kind != "nonnormal":  # rho(J) <= 0.9 here: the last step strictly helps
            assert true < 0.95 * best


def test_gmres_final_step_is_dropped_where_j_expands_the_residual():
    """J = 3 Q (rho = 3: I - J^T invertible, J^T r longer than r): the step would raise the
    residual, so GMRES keeps its own minimiser over the K-dim space."""
    gen = torch.Generator().manual_seed(13)
    q = torch.linalg.qr(torch.randn(N, N, dtype=DT, generator=gen)).Q
    jac = (3.0 * q)[None]
    b = torch.randn(1, N, dtype=DT, generator=gen)
    sol = linear.GMRES(max_iter=4).solve(operator(jac), b)
    true = ((torch.eye(N, dtype=DT) - jac[0].T) @ sol.z[0] - b[0]).norm().item()
    assert true == pytest.approx(_best_residual(jac[0], b[0], 4), rel=1e-8)
