"""Forward solves of rbp.fixed_point: tolerance, Anderson, Broyden, per-sample stopping."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from dynamics import ALL, DT, exact_gradients, max_rel_error, method_gradients, tanh_rnn

import rbp
from rbp import forward

SOLVERS = ["iterate", "anderson", "broyden"]
REFERENCE = Path(__file__).parent / "data" / "fixed_point_v0.pt"


def dense_fixed_point(p) -> torch.Tensor:
    """h* to ~1e-15: Newton's method with the dense Jacobian, from a converged iterate."""
    h = p.h0.clone()
    with torch.no_grad():
        for _ in range(p.steps):
            h = p.f(h)
    for _ in range(20):
        jac = torch.autograd.functional.jacobian(p.f, h)
        with torch.no_grad():
            h = h - torch.linalg.solve(jac - torch.eye(len(h), dtype=DT), p.f(h) - h)
    with torch.no_grad():
        assert (p.f(h) - h).norm() <= 1e-13 * h.norm()
    return h


# ---------------------------------------------------------------- each solver, each dynamics


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("make", ALL, ids=lambda m: m.__name__)
def test_solver_reaches_dense_fixed_point_and_exact_gradient(make, solver):
    p = make()
    h_star = dense_fixed_point(p)
    for q in p.params:
        q.grad = None
    h, info = rbp.fixed_point(
        p.f, p.h0.clone(), 5000, "gmres", 200, tol=1e-13, solver=solver, return_info=True
    )
    assert info.tol_reached is True and info.solver == solver
    assert info.forward_steps < 5000
    # residual 1e-13 and rho <= 0.98: the error is at most ~50x the residual
    assert (h.detach() - h_star).norm() <= 1e-10 * h_star.norm()
    p.loss(h).backward()
    got = [q.grad for q in p.params]
    assert max_rel_error(got, exact_gradients(p)) <= 1e-9


def test_acceleration_pays_on_the_slow_problem():
    p = _slow = ALL[3]()
    counts = {}
    for solver in SOLVERS:
        _, info = rbp.fixed_point(
            _slow.f, p.h0, 5000, "neumann", tol=1e-10, solver=solver, return_info=True
        )
        counts[solver] = info.forward_steps
    assert counts["anderson"] * 5 < counts["iterate"]
    assert counts["broyden"] * 5 < counts["iterate"]


@pytest.mark.parametrize("damping", [0.3, 0.7])
def test_damped_iteration_has_the_same_fixed_point_and_gradient(damping):
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 2000, "gmres", 100, tol=1e-13, solver=rbp.Iterate(damping=damping),
        return_info=True,
    )
    assert info.tol_reached
    assert (h.detach() - dense_fixed_point(p)).norm() <= 1e-11
    p.loss(h).backward()
    assert max_rel_error([q.grad for q in p.params], exact_gradients(p)) <= 1e-9


def test_float32_anderson_reaches_its_tolerance():
    p = tanh_rnn(n=32)
    f32 = lambda h: p.f(h.double()).float()  # noqa: E731
    h, info = rbp.fixed_point(
        f32, p.h0.float(), 200, "neumann", tol=1e-5, solver="anderson", return_info=True
    )
    assert h.dtype == torch.float32 and info.tol_reached
    assert info.forward_residual <= 1e-5 * h.norm().item()


# ---------------------------------------------------------------- steps=T: today's behaviour


def _plain_unroll(p, steps: int) -> tuple[torch.Tensor, float]:
    """Version 0's forward written out: ``steps`` updates, and ``||h_T - h_T-1||``."""
    with torch.no_grad():
        h = prev = p.h0.clone()
        for _ in range(steps):
            prev, h = h, p.f(h)
    return h, (h - prev).pow(2).sum().sqrt().item()


def test_steps_without_tol_reproduce_version_0_exactly():
    """Outputs bit for bit equal to the plain T-step loop of version 0, and outputs and
    gradients equal to those recorded from HEAD 04b41d7 before the forward moved (to 1e-12:
    float64 matrix products round differently on another CPU, so bits are compared with the
    loop run here, not with the file)."""
    saved = torch.load(REFERENCE, weights_only=True)["records"]
    seen = 0
    for make in ALL:
        for steps in (37, None):
            p = make()
            t = p.steps if steps is None else steps
            plain, plain_diff = _plain_unroll(p, t)
            for method in rbp.METHODS:
                rec = saved[f"{p.name}|{t}|{method}"]
                for q in p.params:
                    q.grad = None
                h, info = rbp.fixed_point(
                    p.f, p.h0.clone(), t, method, 20, return_info=True,
                    checks=rbp.Checks(settle_tol=None, on_failure="ignore",
                                      max_backward_error=None),
                )
                assert torch.equal(h.detach(), plain), (p.name, t, method)
                assert info.final_difference == pytest.approx(plain_diff, rel=1e-12)
                assert max_rel_error([h.detach()], [rec["h"]]) <= 1e-12, (p.name, t, method)
                assert info.final_difference == pytest.approx(rec["final_difference"], rel=1e-9)
                assert info.forward_steps == t and info.tol_reached is None
                p.loss(h).backward()
                got = [q.grad if q.grad is not None else torch.zeros_like(q) for q in p.params]
                assert max_rel_error(got, rec["grads"]) <= 1e-12, (p.name, t, method)
                seen += 1
    assert seen == len(saved) == 60


def test_tol_with_plain_iteration_is_a_prefix_of_the_unroll():
    p = tanh_rnn()
    h, info = rbp.fixed_point(p.f, p.h0, 500, "neumann", tol=1e-9, return_info=True)
    k = info.forward_steps
    assert 1 < k < 500 and info.tol_reached
    unrolled = rbp.fixed_point(p.f, p.h0, k, "neumann")
    assert torch.equal(h.detach(), unrolled.detach())
    assert info.forward_residual <= 1e-9 * h.norm().item()


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_tol_modes(mode):
    p = tanh_rnn()
    scale = 1e3
    f = lambda h: scale * p.f(h / scale)  # noqa: E731  (same dynamics, state 1000x larger)
    _, info = rbp.fixed_point(
        f, p.h0, 500, "neumann", return_info=True, solver=rbp.Iterate(tol=1e-8, tol_mode=mode),
    )
    _, ref = rbp.fixed_point(
        p.f, p.h0, 500, "neumann", return_info=True, solver=rbp.Iterate(tol=1e-8, tol_mode=mode),
    )
    if mode == "relative":  # scale-free
        assert info.forward_steps == ref.forward_steps
    else:  # 1000x larger residuals need more steps to fall below the same absolute tol
        assert info.forward_steps > ref.forward_steps
        assert info.forward_residual <= 1e-8


def test_check_every_tests_only_every_n_steps():
    p = tanh_rnn()
    _, one = rbp.fixed_point(p.f, p.h0, 500, "neumann", tol=1e-9, return_info=True)
    h, five = rbp.fixed_point(
        p.f, p.h0, 500, "neumann", return_info=True, solver=rbp.Iterate(tol=1e-9, check_every=5),
    )
    assert five.forward_steps % 5 == 0
    assert one.forward_steps <= five.forward_steps < one.forward_steps + 5
    assert torch.equal(h.detach(), rbp.fixed_point(p.f, p.h0, five.forward_steps).detach())


# ---------------------------------------------------------------- per-sample stopping


def _batch_problem(batch: int = 6, n: int = 5, seed: int = 0):
    """Row-independent ``tanh(s_b h W^T + x_b)``: sample b contracts at rate ~ s_b."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, dtype=DT, generator=gen)
    w = (w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(batch, n, dtype=DT, generator=gen).requires_grad_()
    s = torch.linspace(0.1, 0.95, batch, dtype=DT)[:, None]

    def f(h, x, s):
        return torch.tanh(s * (h @ w.T) + x)

    return f, w, x, s, torch.zeros(batch, n, dtype=DT)


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_stopping_equals_solving_each_sample_alone(solver):
    f, w, x, s, h0 = _batch_problem()
    with torch.no_grad():
        h, info = rbp.fixed_point(
            f, h0, 500, tol=1e-10, solver=solver, batch_dim=0, inputs=(x, s), return_info=True
        )
    steps = info.forward_steps
    assert isinstance(steps, list) and len(steps) == 6 and all(info.tol_reached)
    assert len(set(steps)) > 1  # the samples really stop at different steps
    for b in range(6):
        with torch.no_grad():
            alone, one = rbp.fixed_point(
                f, h0[b : b + 1], 500, tol=1e-10, solver=solver, batch_dim=0,
                inputs=(x[b : b + 1], s[b : b + 1]), return_info=True,
            )
        assert one.forward_steps == [steps[b]]
        assert torch.allclose(alone[0], h[b], rtol=0, atol=1e-13)
    assert info.row_updates == sum(steps) < 6 * max(steps)


def test_removed_rows_are_not_evaluated_again():
    f, w, x, s, h0 = _batch_problem()
    sizes = []

    def counting(h, x, s):
        sizes.append(h.shape[0])
        return f(h, x, s)

    with torch.no_grad():
        _, info = rbp.fixed_point(counting, h0, 500, tol=1e-10, batch_dim=0, inputs=(x, s),
                                  return_info=True)
    # one full call, one 2-sample independence check, then live rows only
    assert sizes[0] == 6 and sizes[1] == 2
    live = sizes[2:]
    assert live == sorted(live, reverse=True) and live[-1] == 1
    assert 6 + sum(live) == info.row_updates == sum(info.forward_steps)


def test_batch_dim_other_than_zero_and_tree_states():
    f, w, x, s, h0 = _batch_problem()

    def g(state, xt, st):  # samples along the last dim of every leaf and input
        h = torch.cat([state["a"], state["b"]], dim=0).T
        out = f(h, xt.T, st.T).T
        return {"a": out[:2], "b": out[2:]}

    with torch.no_grad():
        ref, ref_info = rbp.fixed_point(f, h0, 500, tol=1e-10, batch_dim=0, inputs=(x, s),
                                        solver="anderson", return_info=True)
        state0 = {"a": h0[:, :2].T.clone(), "b": h0[:, 2:].T.clone()}
        got, info = rbp.fixed_point(g, state0, 500, tol=1e-10, batch_dim=-1,
                                    inputs=(x.T, s.T), solver="anderson", return_info=True)
        bad = {"a": torch.zeros(2, 6, dtype=DT), "b": torch.zeros(3, 4, dtype=DT)}
        with pytest.raises(ValueError, match="leaf 1 has 4 samples, leaf 0 6"):
            rbp.fixed_point(g, bad, 500, tol=1e-10, batch_dim=-1, inputs=(x.T, s.T))
        with pytest.raises(ValueError, match="batch_dim=2 is out of range"):
            rbp.fixed_point(g, state0, 500, tol=1e-10, batch_dim=2, inputs=(x.T, s.T))
    assert info.forward_steps == ref_info.forward_steps
    assert torch.allclose(torch.cat([got["a"], got["b"]]).T, ref, atol=1e-13, rtol=0)


def test_per_sample_gradients_match_the_dense_implicit_gradient():
    f, w, x, s, h0 = _batch_problem(batch=4, n=3)
    h = rbp.fixed_point(f, h0, 500, "gmres", 60, tol=1e-13, solver="anderson", batch_dim=0,
                        inputs=(x, s))
    target = torch.linspace(-1, 1, 12, dtype=DT).reshape(4, 3)
    ((h - target) ** 2).sum().backward()
    got = [w.grad.clone(), x.grad.clone()]
    # dense: the whole batch as one system of 12 unknowns
    flat = lambda v: f(v.reshape(4, 3), x, s).reshape(-1)  # noqa: E731
    with torch.no_grad():
        v = h.detach().reshape(-1)
        for _ in range(3000):
            v = flat(v)
    jac = torch.autograd.functional.jacobian(flat, v)
    g = 2 * (v - target.reshape(-1))
    z = torch.linalg.solve(torch.eye(12, dtype=DT) - jac.T, g)
    want = torch.autograd.grad(flat(v), [w, x], z)
    assert max_rel_error(got, list(want)) <= 1e-9


def test_an_f_that_mixes_samples_is_refused():
    f, w, x, s, h0 = _batch_problem()

    def batch_norm_like(h, x, s):
        out = f(h, x, s)
        return out - out.mean(0, keepdim=True)

    with pytest.raises(ValueError, match="mixes samples.*batch_dim=None"):
        rbp.fixed_point(batch_norm_like, h0, 50, tol=1e-8, batch_dim=0, inputs=(x, s))
    closed = lambda h: torch.tanh(h @ w.T + x)  # noqa: E731  (x not passed as an input)
    with pytest.raises(ValueError, match="failed on a sub-batch.*inputs="):
        rbp.fixed_point(closed, h0, 50, tol=1e-8, batch_dim=0)
    with pytest.raises(ValueError, match=r"inputs\[0\] of shape \(5,\)"):
        rbp.fixed_point(f, h0, 50, tol=1e-8, batch_dim=0, inputs=(x[0], s))


# ---------------------------------------------------------------- safeguards


def test_singular_anderson_system_falls_back_and_is_counted():
    """m = 6 > n = 2: the Gram matrix of 6 residuals in R^2 is singular; ridge=0 keeps it so."""
    a = torch.tensor([[0.5, 0.3], [-0.2, 0.4]], dtype=DT, requires_grad=True)
    b = torch.tensor([1.0, -1.0], dtype=DT)
    f = lambda h: a @ h + b  # noqa: E731
    h, info = rbp.fixed_point(f, torch.zeros(2, dtype=DT), 200, "gmres", 10, tol=1e-12,
                              solver=rbp.Anderson(m=6, ridge=0.0), return_info=True)
    assert info.solver_fallbacks > 0 and info.tol_reached
    want = torch.linalg.solve(torch.eye(2, dtype=DT) - a.detach(), b)
    assert torch.allclose(h.detach(), want, atol=1e-11)


def test_anderson_on_a_zero_residual_does_not_crash():
    c = torch.tensor([0.5, 2.0], dtype=DT)
    h, info = rbp.fixed_point(lambda h: 0 * h + c, c.clone(), 10, "neumann", tol=1e-12,
                              solver="anderson", return_info=True)
    assert info.forward_steps == 1 and torch.equal(h, c)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_map_without_fixed_point_is_a_divergence_error(solver):
    """h^2 + h + 1 = h has no real root: iterates blow up (accelerated ones may wander)."""
    a = torch.ones(4, dtype=DT, requires_grad=True)
    f = lambda h: a * h * h + h + 1  # noqa: E731
    with pytest.raises(rbp.DivergenceError, match="not finite|did not reach tol"):
        rbp.fixed_point(
            f, torch.zeros(4, dtype=DT), 400, "neumann", tol=1e-8, solver=solver,
            checks=rbp.Checks(on_failure="raise"),
        )
    if solver == "iterate":
        with pytest.raises(rbp.DivergenceError, match="not finite"):
            rbp.fixed_point(
                f, torch.zeros(4, dtype=DT), 400, "neumann", tol=1e-8, solver=solver,
                checks=rbp.Checks(on_failure="ignore"),
            )


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_start_or_a_weight_with_nan_is_named(solver):
    """A NaN in h0 is named as such (not blamed on the map); one in a weight is listed among
    the causes."""
    w = torch.full((3,), 0.5, dtype=DT)
    f = lambda s: (torch.tanh(w * s[0] + 1.0), 0.5 * s[1])  # noqa: E731
    start = (torch.zeros(2, 3, dtype=DT), torch.tensor([[1.0], [float("nan")]], dtype=DT))
    with pytest.raises(rbp.DivergenceError, match=r"h0 leaf 1 holds NaN or inf \(1 of 2 "):
        rbp.fixed_point(f, start, 20, "neumann", tol=1e-8, solver=solver)
    w[1] = float("inf")
    with pytest.raises(rbp.DivergenceError, match="parameter or input of f holds NaN") as err:
        rbp.fixed_point(f, (start[0], torch.ones(2, 1, dtype=DT)), 20, "neumann", tol=1e-8,
                        solver=solver)
    assert "h0" not in str(err.value)


def test_accelerated_solvers_find_a_repelling_fixed_point_iteration_cannot():
    a = (3.0 * torch.eye(4, dtype=DT)).requires_grad_()
    f = lambda h: a @ h + 1  # noqa: E731  (h* = -1/2, |J| = 3: iteration explodes)
    with pytest.raises(rbp.DivergenceError, match="not finite"):
        rbp.fixed_point(f, torch.zeros(4, dtype=DT), 1000, "neumann", tol=1e-8)
    for solver in ("anderson", "broyden"):
        h, info = rbp.fixed_point(f, torch.zeros(4, dtype=DT), 50, "gmres", 10, tol=1e-12,
                                  solver=solver, return_info=True)
        assert info.tol_reached and torch.allclose(h.detach(), torch.full((4,), -0.5, dtype=DT))
        h.sum().backward()  # (I - 3I)^{-T} 1 = -1/2 per entry: dL/da_ij = z_i h_j
        assert torch.allclose(a.grad, torch.full((4, 4), 0.25, dtype=DT))
        a.grad = None


def test_unreached_tol_goes_through_on_failure():
    p = tanh_rnn()
    with pytest.warns(rbp.ConvergenceWarning, match="did not reach tol=1e-12"):
        _, info = rbp.fixed_point(
            p.f, p.h0, 5, "neumann", tol=1e-12, checks=rbp.Checks(settle_tol=None),
            return_info=True,
        )
    assert info.tol_reached is False and info.forward_steps == 5
    with pytest.raises(rbp.DivergenceError, match="did not reach tol"):
        rbp.fixed_point(p.f, p.h0, 5, "neumann", tol=1e-12, checks=rbp.Checks(on_failure="raise"))
    f, w, x, s, h0 = _batch_problem()
    with pytest.warns(rbp.ConvergenceWarning, match="for [1-5] of 6 samples"):
        rbp.fixed_point(
            f, h0, 12, "neumann", tol=1e-12, batch_dim=0, inputs=(x, s),
            checks=rbp.Checks(settle_tol=None),
        )


def test_best_iterate_returns_the_argmin_of_the_residual():
    """A rotation-like contraction: the residual oscillates, so the last iterate is not best."""
    a = torch.tensor([[0.0, 2.0], [-0.35, 0.0]], dtype=DT, requires_grad=True)
    b = torch.tensor([1.0, 0.0], dtype=DT)
    f = lambda h: a @ h + b  # noqa: E731  (residuals alternate x0.35, x2)
    h0 = torch.zeros(2, dtype=DT)
    steps = 7
    with torch.no_grad():
        hs, res = [h0], []
        for _ in range(steps):
            fh = f(hs[-1])
            res.append((fh - hs[-1]).norm().item())
            hs.append(fh)
    j = min(range(steps), key=res.__getitem__)
    assert j != steps - 1  # the construction works
    with pytest.warns(rbp.ConvergenceWarning, match="did not reach"):
        h, info = rbp.fixed_point(
            f, h0, steps, "gmres", 10, checks=rbp.Checks(settle_tol=None), return_info=True,
            solver=rbp.Iterate(tol=1e-14, best_iterate=True),
        )
    assert info.best_iterate is True
    assert torch.equal(h.detach(), hs[j + 1])  # F(h_j)
    assert info.forward_residual == pytest.approx(res[j], rel=1e-14)
    h.sum().backward()  # the backward linearises at h_j (linear map: same J anyway)
    assert a.grad is not None


# ---------------------------------------------------------------- bptt / tbptt through a solve


def test_bptt_and_tbptt_with_tol_equal_the_unroll_of_that_length():
    p = tanh_rnn()
    _, info = rbp.fixed_point(p.f, p.h0, 500, "bptt", tol=1e-8, return_info=True)
    k = info.forward_steps
    assert k < 500 and info.tol_reached
    for method, truncate in (("bptt", 20), ("tbptt", 7)):
        with_tol = method_gradients(p, method, steps=500, truncate=truncate, tol=1e-8)
        unrolled = method_gradients(p, method, steps=k, truncate=truncate)
        assert max_rel_error(with_tol, unrolled) <= 1e-13, method


def test_damped_bptt_back_propagates_through_the_damped_updates():
    p = tanh_rnn(n=4)
    got = method_gradients(p, "bptt", steps=30, solver=rbp.Iterate(damping=0.5))
    for q in p.params:
        q.grad = None
    h = p.h0
    for _ in range(29):
        h = 0.5 * p.f(h) + 0.5 * h
    p.loss(p.f(h)).backward()
    assert max_rel_error(got, [q.grad for q in p.params]) <= 1e-13


@pytest.mark.parametrize("method", ["bptt", "tbptt"])
def test_unrolled_methods_refuse_accelerated_solvers_clearly(method):
    p = tanh_rnn()
    with pytest.raises(ValueError, match="solver='iterate'.*implicit method"):
        rbp.fixed_point(p.f, p.h0, 50, method, 5, tol=1e-8, solver="anderson")
    with pytest.raises(ValueError, match="batch_dim"):
        rbp.fixed_point(p.f, p.h0[None], 50, method, 5, batch_dim=0)
    with pytest.raises(ValueError, match="best_iterate"):
        rbp.fixed_point(p.f, p.h0, 50, method, 5, solver=rbp.Iterate(tol=1e-8, best_iterate=True))


def test_time_varying_needs_plain_iteration():
    p = tanh_rnn()
    with pytest.raises(ValueError, match="time_varying=True.*solver='iterate'"):
        rbp.fixed_point(lambda h, t: p.f(h), p.h0, 50, time_varying=True, solver="anderson")
    h, info = rbp.fixed_point(lambda h, t: p.f(h), p.h0, 500, time_varying=True, tol=1e-9,
                              return_info=True)
    assert info.tol_reached


def test_no_grad_solve_returns_a_plain_tensor_without_an_extra_evaluation():
    p = tanh_rnn()
    calls = []
    with torch.no_grad():
        h, info = rbp.fixed_point(lambda h: calls.append(1) or p.f(h), p.h0, 500, tol=1e-9,
                                  solver="anderson", return_info=True)
    assert not h.requires_grad and len(calls) == info.forward_steps


def test_broyden_memory_is_bounded():
    x = torch.zeros(3, 7, dtype=DT)
    state = forward._BroydenState(rbp.Broyden(memory=4), x)
    fx = torch.randn(3, 7, dtype=DT)
    for _ in range(30):
        x, _ = state.step(x, 0.5 * x + fx)
    assert state.us.shape == state.vs.shape == (3, 4, 7)


@pytest.mark.parametrize("make", ALL, ids=lambda m: m.__name__)
def test_broyden_restarting_by_replay_reaches_the_dense_fixed_point(make):
    """memory=3 fills every few steps; each restart replays the last pairs from H = -I."""
    p = make()
    h_star = dense_fixed_point(p)
    h, info = rbp.fixed_point(p.f, p.h0.clone(), 5000, "gmres", 200, tol=1e-13,
                              solver=rbp.Broyden(memory=3), return_info=True)
    assert info.tol_reached is True and info.forward_steps > 3 + 1  # it restarted
    assert (h.detach() - h_star).norm() <= 1e-10 * h_star.norm()


def _dense_h(state) -> torch.Tensor:
    """``H = -I + U^T V`` of each row, as dense matrices."""
    us, vs = state.us[:, : state.k], state.vs[:, : state.k]
    eye = torch.eye(us.shape[2], dtype=us.dtype)
    return -eye + us.transpose(1, 2) @ vs


@pytest.mark.parametrize("memory", [3, 4])  # 3: the ring is out of order at every other one
def test_broyden_restart_is_good_broyden_over_the_last_pairs_and_h_g_is_exact(memory):
    """After each restart H equals good Broyden from -I over the ring's last ``replay`` pairs;
    the H g carried from step to step (not recomputed) equals the product with the dense H."""
    gen = torch.Generator().manual_seed(11)
    a = 0.3 * torch.randn(7, 7, dtype=DT, generator=gen)
    c = torch.randn(3, 7, dtype=DT, generator=gen)
    f = lambda x: torch.tanh(x @ a.T + c)  # noqa: E731
    cfg = rbp.Broyden(memory=memory, replay=2)
    x = torch.zeros(3, 7, dtype=DT)
    state = forward._BroydenState(cfg, x)
    xs, gs, restarts = [x], [f(x) - x], 0
    for step in range(11):
        if step == 6:  # drop a row: every buffer keeps the rows in order
            keep = torch.tensor([0, 2])
            state.keep(keep)
            xs, gs, c = [t[keep] for t in xs], [t[keep] for t in gs], c[keep]
        full = state.k == state.memory
        x, bad = state.step(xs[-1], xs[-1] + gs[-1])
        assert not bad.any()
        xs.append(x)
        gs.append(f(x) - x)
        dense = _dense_h(state)
        if full:  # rebuilt: good Broyden from -I over the last 2 secant pairs
            restarts += 1
            h = -torch.eye(7, dtype=DT).expand_as(dense).clone()
            for j in (-4, -3):
                dx, dg = xs[j + 1] - xs[j], gs[j + 1] - gs[j]
                h_dg = (h @ dg[:, :, None])[..., 0]
                vt = (dx[:, None, :] @ h)[:, 0]
                h = h + (dx - h_dg)[:, :, None] * vt[:, None, :] / (vt * dg).sum(1)[:, None,
                                                                                   None]
            # the pairs shrink as x converges: round-off in the small denominators grows
            assert torch.allclose(dense, h, rtol=0, atol=1e-11)
        # the step taken is -H g with the updated H
        assert torch.allclose(x - xs[-2], -(dense @ gs[-2][:, :, None])[..., 0], rtol=0,
                              atol=1e-12)
    assert restarts >= 2 and state.us.shape == (2, memory, 7) and state.dxs.shape == (2, 2, 7)


def test_anderson_gram_updated_in_place_equals_the_recomputed_one():
    """One new row and column per step in slot order, over > m steps and a row removal."""
    gen = torch.Generator().manual_seed(12)
    a = 0.5 * torch.randn(9, 9, dtype=DT, generator=gen)
    c = torch.randn(5, 9, dtype=DT, generator=gen)
    f = lambda x: torch.tanh(x @ a.T + c)  # noqa: E731
    x = torch.zeros(5, 9, dtype=DT)
    state = forward._AndersonState(rbp.Anderson(m=3, beta=0.7), x)
    for step in range(11):
        if step == 6:
            keep = torch.tensor([0, 1, 3])
            state.keep(keep)
            x = x[keep]
            c = c[keep]
        x, _ = state.step(x, f(x))
        mk = min(state.k, state.m)
        gs = state.gs[:, :mk]
        want = gs @ gs.transpose(1, 2)
        scale = want.abs().max()
        assert torch.allclose(state.gram[:, :mk, :mk], want, rtol=1e-12, atol=1e-12 * scale)
    assert state.k == 11 and state.gram.shape == (3, 3, 3)


def test_anderson_step_is_the_dense_constrained_least_squares_mix():
    """Each step returns sum_i a_i (x_i + beta g_i) with a = argmin a^T (G + r mu I) a subject to
    sum_i a_i = 1 (mu = mean diag G), solved densely here from the stored history (KKT system),
    before and after the ring buffer wraps and after a row removal."""
    gen = torch.Generator().manual_seed(3)
    a = 0.6 * torch.randn(6, 6, dtype=DT, generator=gen)
    c = torch.randn(4, 6, dtype=DT, generator=gen)
    f = lambda x: torch.tanh(x @ a.T + c)  # noqa: E731
    x = torch.randn(4, 6, dtype=DT, generator=gen)
    ridge = 1e-3  # large enough that the ridge visibly changes the mix
    state = forward._AndersonState(rbp.Anderson(m=3, beta=0.8, ridge=ridge), x)
    for step in range(9):
        if step == 5:
            keep = torch.tensor([0, 2, 3])
            state.keep(keep)
            x, c = x[keep], c[keep]
        fx = f(x)
        new, bad = state.step(x, fx)
        mk = min(state.k, state.m)
        if mk == 1:
            assert bad is None and torch.equal(new, x + 0.8 * (fx - x))
            x = new
            continue
        gs, ys = state.gs[:, :mk], state.ys[:, :mk]
        gram = gs @ gs.mT
        mu = gram.diagonal(dim1=1, dim2=2).mean(1)
        kkt = torch.zeros(len(x), mk + 1, mk + 1, dtype=DT)
        kkt[:, :mk, :mk] = gram + ridge * mu[:, None, None] * torch.eye(mk, dtype=DT)
        kkt[:, :mk, mk] = kkt[:, mk, :mk] = 1.0
        rhs = torch.zeros(len(x), mk + 1, dtype=DT)
        rhs[:, mk] = 1.0
        weights = torch.linalg.solve(kkt, rhs)[:, :mk]
        assert not bad.any()
        assert torch.allclose(new, (weights[:, :, None] * ys).sum(1), rtol=0, atol=1e-11)
        x = new


def test_anderson_fallback_row_takes_exactly_the_plain_step():
    """ridge=0, m > n: the Gram matrix is singular, the row's step is x + beta g, counted."""
    a = torch.tensor([[0.5, 0.3], [-0.2, 0.4]], dtype=DT)
    f = lambda x: x @ a.T + 1.0  # noqa: E731
    x = torch.zeros(2, 2, dtype=DT)
    state = forward._AndersonState(rbp.Anderson(m=4, beta=0.5, ridge=0.0), x)
    flags = []
    for _ in range(6):
        fx = f(x)
        new, bad = state.step(x, fx)
        plain = x + 0.5 * (fx - x)
        if bad is None:  # the first step: one point, nothing to mix
            assert torch.equal(new, plain)
        else:
            assert torch.equal(new[bad], plain[bad])
            flags.append(bad)
        x = new
    assert torch.stack(flags).any()


def test_solver_values_check_their_options():
    for bad, match in [
        (lambda: rbp.Anderson(m=0), r"Anderson\(m=...\) must be an integer >= 1"),
        (lambda: rbp.Anderson(beta=1.5), r"Anderson\(beta=...\) must be in \(0, 1\]"),
        (lambda: rbp.Anderson(ridge=-1.0), r"Anderson\(ridge=...\) must be >= 0"),
        (lambda: rbp.Anderson(beta=float("nan")), "must be finite"),
        (lambda: rbp.Iterate(damping=1.0), r"damping=...\) must be in \[0, 1\)"),
        (lambda: rbp.Iterate(damping=True), "must be a real number"),
        (lambda: rbp.Broyden(memory=2.5), r"Broyden\(memory=...\) must be an integer"),
        (lambda: rbp.Broyden(replay=0), r"Broyden\(replay=...\) must be an integer >= 1"),
        (lambda: rbp.Broyden(memory=4, replay=5), r"replay=...\) must be at most memory=4"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            bad()
    p = tanh_rnn()
    with pytest.raises(ValueError, match="unknown solver 'newton'.*rbp.Anderson"):
        rbp.fixed_point(p.f, p.h0, 5, solver="newton")


def test_torch_func_grad_works_through_bptt_and_vmap_is_refused_clearly():
    p = tanh_rnn()
    w, x = p.params

    def loss(w_, tol):
        f = lambda h: torch.tanh(w_ @ h + x)  # noqa: E731
        return p.loss(rbp.fixed_point(f, p.h0, 300, "bptt", tol=tol))

    for tol in (None, 1e-10):
        got = torch.func.grad(loss)(w.detach(), tol)
        (want,) = torch.autograd.grad(loss(w, tol), w)
        assert torch.allclose(got, want, rtol=1e-13, atol=0)
    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap.*batch_dim"):
        torch.func.vmap(lambda h: rbp.fixed_point(p.f, h, 5, "bptt"))(torch.zeros(3, 8, dtype=DT))


@pytest.mark.parametrize("solver", ["iterate", "anderson"])
def test_in_place_f_is_refused(solver):
    p = tanh_rnn()

    def f(h):
        h.mul_(0.5)
        return p.f(h)

    with pytest.raises(ValueError, match="modified its input state in place"):
        rbp.fixed_point(f, p.h0.clone(), 20, "neumann", tol=1e-6 if solver != "iterate" else None,
                        solver=solver)


@pytest.mark.parametrize("method", rbp.METHODS)
def test_f_without_parameters_gives_a_constant_state(method):
    c = torch.randn(4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = rbp.fixed_point(lambda h: 0.5 * torch.tanh(h) + c, torch.zeros(4, dtype=DT), 80,
                            method, 5)
    assert not h.requires_grad


@pytest.mark.parametrize("method", rbp.METHODS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_f_returning_a_parameter_itself_passes_its_gradient(method, solver):
    """``f`` returns a leaf that requires grad (no graph behind it): the state is that leaf,
    and its gradient arrives (it was detached as a constant by the implicit methods)."""
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    if solver != "iterate" and method in ("bptt", "tbptt"):
        return  # they back-propagate through the plain iteration only
    h = rbp.fixed_point(lambda h: (x, 0.5 * h[1]), (torch.zeros(3, 5, dtype=DT),
                        torch.ones(2, dtype=DT)), 60, method, 5,
                        tol=None if solver == "iterate" else 1e-10, solver=solver)
    assert h[0].requires_grad
    (2 * h[0]).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0), rtol=1e-10)


@pytest.mark.parametrize("method", rbp.IMPLICIT_METHODS)
def test_parameter_used_only_after_step_0_still_gets_its_gradient(method):
    # step 0 uses no parameter (h0 = 0 takes the first branch), later steps do: the cheap test
    # at step 0 must not make the state a constant
    w = torch.tensor(0.5, dtype=DT, requires_grad=True)
    c = torch.ones(3, dtype=DT)

    def f(h):
        return c if bool((h == 0).all()) else w * torch.tanh(h) + c

    h = rbp.fixed_point(f, torch.zeros(3, dtype=DT), 200, method, 100)
    assert h.requires_grad
    h.sum().backward()
    # h* = w tanh(h*) + 1 per entry: dh*/dw = tanh(h*) / (1 - w (1 - tanh(h*)^2))
    hs = h.detach()[0]
    expected = 3 * torch.tanh(hs) / (1 - 0.5 * (1 - torch.tanh(hs) ** 2))
    assert torch.allclose(w.grad, expected, rtol=1e-8)


def test_best_iterate_per_sample_is_each_samples_argmin():
    f, w, x, s, h0 = _batch_problem(batch=3, n=4)
    with torch.no_grad():
        hs, res = [h0], []
        for _ in range(6):
            fh = f(hs[-1], x, s)
            res.append((fh - hs[-1]).norm(dim=1))
            hs.append(fh)
        res_t = torch.stack(res)  # (steps, batch)
        h, info = rbp.fixed_point(
            f, h0, 6, batch_dim=0, inputs=(x, s), checks=rbp.Checks(on_failure="ignore"),
            return_info=True,
            solver=rbp.Iterate(tol=1e-300, tol_mode="absolute", best_iterate=True),
        )
    best = res_t.argmin(0)
    for b in range(3):
        assert torch.equal(h[b], hs[best[b] + 1][b])
        assert info.forward_residual[b] == pytest.approx(res_t[best[b], b].item(), rel=1e-14)


@pytest.mark.parametrize("tol", [None, 1e-8])
def test_non_finite_start_is_a_divergence_error(tol):
    p = tanh_rnn()
    h0 = p.h0.clone()
    h0[0] = float("nan")
    with pytest.raises(rbp.DivergenceError, match=r"h0 holds NaN or inf \(1 of "):
        rbp.fixed_point(lambda h: 0.5 * h, h0, 20, "neumann", tol=tol, solver="anderson"
                        if tol else "iterate")


@pytest.mark.parametrize("tol", [None, 1e-8])
def test_a_meta_start_is_named(tol):
    h0 = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="h0 is on the meta device, which holds no values"):
        rbp.fixed_point(lambda h: 0.5 * h, h0, 5, "neumann", tol=tol)


def test_low_precision_states_run_every_solver():
    w = 0.1 * torch.randn(8, 8)
    for dtype in (torch.bfloat16, torch.float16):
        for solver in [*SOLVERS, rbp.Broyden(memory=2)]:  # memory=2: rebuilt at step 3
            with torch.no_grad():
                h, info = rbp.fixed_point(lambda h, d=dtype: torch.tanh(h @ w.to(d).T + 1),
                                          torch.zeros(4, 8, dtype=dtype), 100, tol=1e-2,
                                          solver=solver, batch_dim=0, return_info=True)
            assert h.dtype == dtype and all(info.tol_reached)


def test_one_step_budget_with_tol():
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 1, "neumann", tol=1e-3, solver="broyden",
        checks=rbp.Checks(on_failure="ignore", settle_tol=None), return_info=True,
    )
    assert info.forward_steps == 1 and info.tol_reached is False
    assert torch.equal(h.detach(), p.f(p.h0).detach())


def test_forward_bench_quick_writes_its_table(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "forward_bench.py"
    spec = importlib.util.spec_from_file_location("forward_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "forward_bench", bench)  # dataclasses look it up
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rbp_rows = [r for r in saved["rows"] if r["solver"] in ("rbp anderson", "rbp broyden")]
    assert len(rbp_rows) == 2 * 5 * 2 * 2
    for r in rbp_rows:
        # the benchmark re-evaluates F at the returned state; in float32 at tol 1e-6 that
        # check sits within ~1e-7 (a few ulps) of the solver's own, so allow 10 % there
        slack = 1.1 if r["dtype"] == "float32" else 1.0
        assert r["max_rel_res"] <= r["tol"] * slack, r
    slow = {r["solver"]: r["evals"] for r in saved["rows"]
            if r["problem"] == "slow" and r["dtype"] == "float64" and r["tol"] == 1e-6}
    assert slow["rbp broyden"] * 4 < slow["rbp iterate"]
    # evaluations are counted alike: rbp's calls add only its 2-sample independence check
    for r in saved["rows"]:
        assert r["evals"] == r["calls"] - (1 if r["solver"].startswith("rbp") else 0)
    assert 0.85 < saved["plain_rate"]["conv-deq"] < 0.99  # the slowly contracting conv cell
    # round-off floors: a few ulps of each dtype, and the rows below them flagged
    floors = saved["round_off_floor"]
    assert len(floors) == 5 * 2
    assert all(0 < v < 1e-12 for k, v in floors.items() if k.endswith("/float64")), floors
    assert all(1e-9 < v < 1e-5 for k, v in floors.items() if k.endswith("/float32")), floors
    for r in saved["rows"]:
        assert r["below_floor"] == (r["tol"] < floors[f"{r['problem']}/{r['dtype']}"])
    assert len(saved["broyden_memory"]) == 5 * 2 * 2  # every problem, dtype and tol
    for r in saved["broyden_memory"]:
        if r["evals"] <= r["memory"]:  # the memory never filled: one and the same solve
            assert r["evals"] == r["evals_restart"] == r["evals_no_restart"]
    per_sample = [r for r in saved["per_sample"] if r["solver"] == "rbp iterate, batch_dim=0"]
    assert all(r["row_updates"] < r["evals"] * 8 for r in per_sample)


@pytest.mark.parametrize("when", ["first", "graph", "last"])
def test_checked_steps_catch_in_place_and_shape_changes(when):
    """The unroll checks the first step, the first graph step and the last one."""
    p = tanh_rnn()
    steps = 12
    calls = []
    at = {"first": 0, "graph": steps - 3, "last": steps - 1}[when]  # tbptt, K=3

    def f(h):
        calls.append(1)
        if len(calls) - 1 == at:
            if when == "last":
                return p.f(h)[:-1]
            h.mul_(0.5)
        return p.f(h)

    kind = ValueError
    match = "changed the shape" if when == "last" else "modified its input state in place"
    with pytest.raises(kind, match=match):
        rbp.fixed_point(f, p.h0.clone(), steps, "tbptt", 3)


def test_time_varying_and_inputs_take_the_same_path_as_closures():
    p = tanh_rnn()
    c = torch.randn(8, dtype=DT)
    want = rbp.fixed_point(
        lambda h: p.f(h) + 0.1 * c, p.h0, 30, "neumann", checks=rbp.Checks(settle_tol=None),
    )
    got = rbp.fixed_point(
        lambda h, x: p.f(h) + 0.1 * x, p.h0, 30, "neumann", inputs=(c,),
        checks=rbp.Checks(settle_tol=None),
    )
    tv = rbp.fixed_point(
        lambda h, t: p.f(h) + 0.1 * c, p.h0, 30, "neumann", time_varying=True,
        checks=rbp.Checks(settle_tol=None),
    )
    assert torch.equal(want.detach(), got.detach()) and torch.equal(want.detach(), tv.detach())


@pytest.mark.parametrize("method", rbp.METHODS)
@pytest.mark.parametrize("grad", [True, False])
def test_tensor_state_path_equals_the_general_path(method, grad):
    # a bare tensor takes a leaner unroll than a tuple state: same updates, info and gradients
    p = tanh_rnn()
    runs = []
    for wrap in (False, True):
        for q in p.params:
            q.grad = None
        f = (lambda h: (p.f(h[0]),)) if wrap else p.f
        h0 = (p.h0,) if wrap else p.h0
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore", rbp.ConvergenceWarning)
            h, info = rbp.fixed_point(f, h0, 30, method, 7, return_info=True)
            h = h[0] if wrap else h
            if grad:
                p.loss(h).backward()
        runs.append((h.detach(), info, [q.grad for q in p.params]))
    (h_a, info_a, g_a), (h_b, info_b, g_b) = runs
    assert torch.equal(h_a, h_b) and h_a.requires_grad == h_b.requires_grad
    for name in ("final_difference", "relative_final_difference", "forward_steps",
                 "forward_residual", "row_updates"):
        assert getattr(info_a, name) == pytest.approx(getattr(info_b, name), rel=1e-12)
    assert info_a.solver == info_b.solver
    assert [r.iterations for r in info_a.backward] == [r.iterations for r in info_b.backward]
    for a, b in zip(g_a, g_b, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=0)


def test_a_frozen_map_gives_a_constant_state_after_a_trained_one():
    # the graph walk is skipped while the weight it found last time still requires grad; once
    # that weight is frozen the walk runs again and the state is a constant
    w = torch.tensor(0.5, dtype=DT, requires_grad=True)
    c = torch.ones(3, dtype=DT)

    def f(h):
        return w * torch.tanh(h) + c

    assert rbp.fixed_point(f, torch.zeros(3, dtype=DT), 60, "neumann", 40).requires_grad
    w.requires_grad_(False)
    assert not rbp.fixed_point(f, torch.zeros(3, dtype=DT), 60, "neumann", 40).requires_grad
    w.requires_grad_(True)
    h = rbp.fixed_point(f, torch.zeros(3, dtype=DT), 60, "neumann", 40)
    h.sum().backward()
    hs = h.detach()[0]
    expected = 3 * torch.tanh(hs) / (1 - 0.5 * (1 - torch.tanh(hs) ** 2))
    assert torch.allclose(w.grad, expected, rtol=1e-8)


@pytest.mark.parametrize("bad_step", [0, 29])
def test_tensor_state_path_checks_the_first_and_last_step(bad_step):
    p = tanh_rnn()
    calls = []

    def f(h):
        calls.append(1)
        out = p.f(h)
        return out.float() if len(calls) - 1 == bad_step else out

    with pytest.raises(TypeError, match=f"dtype of state at step {bad_step}"):
        rbp.fixed_point(f, p.h0, 30, "neumann", 5)


def test_a_long_anderson_history_works_as_well_in_float32_as_in_float64():
    # the Gram matrix and its ridge are float64-sized: a float32-sized ridge and conditioning
    # limit made many steps of a 25-deep history plain steps (here 46 steps against 32)
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=gen))
    w = q @ torch.diag(torch.linspace(-0.5, 0.98, 64, dtype=torch.float64)) @ q.T
    x = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    steps = {}
    for dt in (torch.float32, torch.float64):
        wd, xd = w.to(dt), x.to(dt)
        with torch.no_grad():
            _, info = rbp.fixed_point(lambda h, wd=wd, xd=xd: h @ wd.T + xd,
                                      torch.zeros(4, 64, dtype=dt), 500,
                                      tol=1e-5, solver=rbp.Anderson(m=25), return_info=True)
        assert info.tol_reached
        steps[dt] = info.forward_steps
    assert steps[torch.float32] <= 1.2 * steps[torch.float64] < 100
