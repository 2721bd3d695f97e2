"""SHINE: the backward reuses the Broyden forward's inverse-Jacobian estimate (rbp.linear.SHINE).

The map ``F(h) = tanh(h W^T + x U^T) + c`` with a per-sample bias ``c``: ``dF/dc = I``, so the
gradient of ``c`` is the adjoint ``z`` itself, compared with a dense float64 solve of
``(I - J_i^T) z_i = g_i`` per sample.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rbp
from rbp import linear
from rbp.diagnostics import DivergenceError

DT = torch.float64
N, B = 12, 4


def problem(seed: int = 0, nonnormal: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(N, N, dtype=DT, generator=gen))[0]
    if nonnormal:  # rho(W) = 0.6, ||W|| ~ 1.8
        s = 0.6 * torch.eye(N, dtype=DT)
        idx = torch.arange(0, N - 1, 2)
        s[idx, idx + 1] = 1.5
        w = q @ s @ q.T
    else:
        w = 0.9 * q
    u = torch.randn(N, 5, dtype=DT, generator=gen) / 5 ** 0.5
    # samples of different sizes converge after different numbers of steps (rows leave early)
    x = torch.randn(B, 5, dtype=DT, generator=gen) * torch.linspace(0.2, 2.0, B, dtype=DT)[:, None]
    c = (0.3 * torch.randn(B, N, dtype=DT, generator=gen)).requires_grad_()
    target = torch.randn(B, N, dtype=DT, generator=gen)
    return {"w": w, "u": u, "x": x, "c": c, "target": target}


def f(h: torch.Tensor, x: torch.Tensor, c: torch.Tensor, p: dict) -> torch.Tensor:
    return torch.tanh(h @ p["w"].T + x @ p["u"].T) + c


def exact_z(p: dict) -> torch.Tensor:
    """The adjoint per sample at the converged fixed point, by a dense solve."""
    h = torch.zeros(B, N, dtype=DT)
    with torch.no_grad():
        for _ in range(5000):
            h_next = f(h, p["x"], p["c"], p)
            if (h_next - h).norm() <= 1e-15 * h_next.norm():
                break
            h = h_next
    jac = torch.func.vmap(torch.func.jacrev(lambda hr, xr, cr: f(hr, xr, cr, p)))(
        h, p["x"], p["c"].detach())
    g = h - p["target"]
    eye = torch.eye(N, dtype=DT)
    return torch.linalg.solve(eye - jac.transpose(1, 2), g[..., None])[..., 0]


def shine_z(p: dict, method, batch_dim: int | None = 0, rows=slice(None), **options):
    """``z`` (the gradient of c) and the info of one fixed_point call on the samples ``rows``."""
    c = p["c"].detach()[rows].clone().requires_grad_()
    x, target = p["x"][rows], p["target"][rows]
    h, info = rbp.fixed_point(
        lambda h, x, c: f(h, x, c, p), torch.zeros_like(c), 300, method=method,
        solver=rbp.Broyden(), tol=1e-12, batch_dim=batch_dim, inputs=(x, c), return_info=True,
        checks=rbp.Checks(**options) if options else None)
    (0.5 * (h - target).pow(2).sum()).backward()
    return c.grad, info


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("use", ["precondition", "init"])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_shine_with_gmres_reaches_the_exact_gradient(use, batch_dim):
    p = problem()
    want = exact_z(p)
    method = rbp.Implicit(linear.SHINE(refine=2 * B * N, use=use, tol=1e-12))
    got, info = shine_z(p, method, batch_dim=batch_dim)
    assert rel(got, want) <= 1e-8
    record = info.backward[0]
    assert record.method == "shine" and record.status.ok
    assert record.error_estimate <= 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shine_preconditioned_gmres_needs_fewer_products_than_gmres(seed):
    """Per sample, on a non-normal J: to a relative residual of 1e-10, GMRES preconditioned by
    the forward's estimate takes fewer iterations (one product each) than GMRES from zero."""
    p = problem(seed, nonnormal=True)
    want = exact_z(p)
    counts = {}
    for name, solver in (
        ("shine", linear.SHINE(refine=3 * N, tol=1e-10, check_every=1)),
        ("gmres", linear.GMRES(max_iter=3 * N, tol=1e-10, check_every=1)),
    ):
        got, info = shine_z(p, rbp.Implicit(solver))
        assert rel(got, want) <= 1e-8, name
        counts[name] = info.backward[0].iterations
    assert counts["shine"] < counts["gmres"], counts


@pytest.mark.parametrize("batch_dim", [0, None])
def test_pure_shine_reports_its_true_residual(batch_dim):
    """refine=0: z = -H^T g, and its error estimate is ||(I - J^T) z - g|| / ||g|| exactly."""
    p = problem()
    got, info = shine_z(p, rbp.Implicit(linear.SHINE()), batch_dim=batch_dim,
                        max_backward_error=None)
    # the true residual, densely, at the fixed point fixed_point linearised at
    h = torch.zeros(B, N, dtype=DT)
    with torch.no_grad():
        for _ in range(5000):
            h = f(h, p["x"], p["c"], p)
    jac = torch.func.vmap(torch.func.jacrev(lambda hr, xr, cr: f(hr, xr, cr, p)))(
        h, p["x"], p["c"].detach())
    g = h - p["target"]
    res = got - torch.einsum("bij,bi->bj", jac, got) - g
    record = info.backward[0]
    assert record.iterations == 0
    if batch_dim is None:
        true = (res.norm() / g.norm()).item()
        assert record.error_estimate == pytest.approx(true, rel=1e-6)
    else:
        true = (res.norm(dim=1) / g.norm(dim=1)).tolist()
        assert record.sample_errors == pytest.approx(true, rel=1e-6)
        assert record.error_estimate == pytest.approx(max(true), rel=1e-6)
    assert record.relative_residual == pytest.approx(record.error_estimate)
    # inexact here: the estimate is good along the forward's steps, not along g
    assert rel(got, exact_z(p)) > 1e-3


def test_pure_shine_is_flagged_by_max_backward_error():
    p = problem()
    with pytest.raises(DivergenceError, match="max_backward_error"):
        shine_z(p, rbp.Implicit(linear.SHINE()), max_backward_error=1e-3, on_failure="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, info = shine_z(p, rbp.Implicit(linear.SHINE()), max_backward_error=1e-3,
                            fallback=linear.GMRES(max_iter=60, tol=1e-12))
    assert info.backward[0].fell_back_to == "gmres"
    assert any("fell back" in str(w.message) for w in caught)
    assert rel(got, exact_z(p)) <= 1e-8


@pytest.mark.parametrize("solver", [linear.SHINE(), linear.SHINE(refine=6),
                                    linear.SHINE(refine=6, use="init")])
def test_per_sample_equals_one_by_one(solver):
    """batch_dim=0 (rows leave the forward at different steps) gives each sample the z it gets
    alone: each sample's final estimate is kept when it leaves. (Up to round-off in the forward,
    batched or not, which the last secant pairs of an estimate amplify: a sample given another
    sample's estimate would be off by O(1).)"""
    p = problem()
    tol = 1e-5
    together, info = shine_z(p, rbp.Implicit(solver), max_backward_error=None)
    assert len(set(info.forward_steps)) > 1  # the samples did leave at different steps
    for i in range(B):
        alone, one = shine_z(p, rbp.Implicit(solver), batch_dim=None, rows=slice(i, i + 1),
                             max_backward_error=None)
        assert one.forward_steps == info.forward_steps[i]
        assert rel(together[i], alone[0]) <= tol


@pytest.mark.parametrize("solver", ["anderson", "iterate", rbp.Anderson(m=3)])
def test_refused_without_a_broyden_forward(solver):
    p = problem()
    for options in ({"method": rbp.Implicit(linear.SHINE())},
                    {"method": "gmres", "checks": rbp.Checks(fallback=linear.SHINE(refine=3))}):
        with pytest.raises(ValueError, match="Broyden"):
            rbp.fixed_point(lambda h: f(h, p["x"], p["c"], p), torch.zeros(B, N, dtype=DT), 50,
                            solver=solver, tol=1e-8, **options)
    with pytest.raises(ValueError, match="Broyden"):
        rbp.FixedPoint(lambda x, h: torch.tanh(h + x), steps=50,
                       method=rbp.Implicit(linear.SHINE()), solver=solver)
    with pytest.raises(ValueError, match="Broyden"):  # the default forward: plain iteration
        rbp.fixed_point(lambda h: 0.5 * h, torch.ones(3), 5, method=linear.SHINE())


def test_solve_without_an_estimate_is_refused():
    b = torch.ones(2, 3, dtype=DT)
    op = linear.AdjointOperator(lambda v: 0.5 * v)
    with pytest.raises(ValueError, match="inverse-Jacobian estimate"):
        linear.SHINE().solve(op, b)


@pytest.mark.parametrize(("options", "error"), [
    ({"refine": -1}, ValueError), ({"refine": 1.5}, TypeError), ({"refine": True}, TypeError),
    ({"refine": 3, "use": "both"}, ValueError), ({"refine": 3, "use": 1}, TypeError),
    ({"refine": 3, "tol": 0.0}, ValueError), ({"refine": 3, "restart": 0}, ValueError),
    ({"refine": 3, "check_every": 0}, ValueError),
    ({"tol": 1e-6}, ValueError), ({"use": "init"}, ValueError), ({"restart": 5}, ValueError),
])
def test_bad_options_are_refused(options, error):
    with pytest.raises(error):
        linear.SHINE(**options)


def test_fixed_point_module_with_shine():
    torch.manual_seed(0)
    cell = torch.nn.Linear(N, N, dtype=DT)
    with torch.no_grad():
        cell.weight.mul_(0.5)

    def step(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(cell(h) + x)

    x = torch.randn(B, N, dtype=DT) * torch.linspace(0.2, 2.0, B, dtype=DT)[:, None]
    grads = []
    for solver in (linear.SHINE(refine=40, tol=1e-12), linear.GMRES(max_iter=40, tol=1e-12)):
        layer = rbp.FixedPoint(step, steps=100, method=rbp.Implicit(solver),
                               solver=rbp.Broyden(), tol=1e-12, batch_dim=0)
        layer(x, torch.zeros(B, N, dtype=DT)).sum().backward()
        grads.append(cell.weight.grad.clone())
        cell.weight.grad = None
        assert layer.last_info.backward[0].method == solver.name
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)


def test_gmres_with_an_exact_preconditioner_converges_at_once():
    gen = torch.Generator().manual_seed(3)
    jac = 0.5 * torch.randn(2, N, N, dtype=DT, generator=gen) / N ** 0.5
    a = torch.eye(N, dtype=DT) - jac.transpose(1, 2)
    inv = torch.linalg.inv(a)
    op = linear.AdjointOperator(lambda v: torch.einsum("bij,bi->bj", jac, v))
    b = torch.randn(2, N, dtype=DT, generator=gen)
    sol = linear.gmres(op, b, max_iter=5, tol=1e-12, check_every=1,
                        precondition=lambda v: torch.einsum("bij,bj->bi", inv, v))
    want = torch.linalg.solve(a, b[..., None])[..., 0]
    assert sol.iterations == 1 and rel(sol.z, want) <= 1e-12
    assert sol.error_estimate <= 1e-12


def test_restarted_preconditioned_gmres_and_shine_as_fallback():
    p = problem(1, nonnormal=True)
    want = exact_z(p)
    got, info = shine_z(p, rbp.Implicit(linear.SHINE(refine=80, restart=6, tol=1e-12)))
    assert rel(got, want) <= 1e-8 and info.backward[0].status.ok
    # a Neumann series of 2 terms is reported, and SHINE+GMRES re-solves it
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got, info = shine_z(p, rbp.Implicit(linear.Neumann(max_iter=2)),
                            fallback=linear.SHINE(refine=40, tol=1e-12))
    assert info.backward[0].fell_back_to == "shine"
    assert rel(got, want) <= 1e-8
