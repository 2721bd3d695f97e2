"""Hostile use of the core (issue 22): each test reproduces a case that was silently wrong or
crashed deep inside, checked against an exact reference (BPTT, dense float64 solves)."""

from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch

import rbp

DT = torch.float64


def _net(n: int = 8, scale: float = 0.1, seed: int = 0, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    w = (scale * torch.randn(n, n, generator=gen, dtype=dtype)).requires_grad_()
    return w, (lambda h: torch.tanh(h @ w + 1.0))


# ------------------------------------------------------------------ 1. torch.inference_mode


INFERENCE_CASES = {
    "unroll": {},
    "trace": {"checks": rbp.Checks(trace=True)},
    "tol": {"tol": 1e-10},
    "anderson": {"tol": 1e-10, "solver": "anderson"},
    "broyden": {"tol": 1e-10, "solver": "broyden"},
    "batch_dim": {"tol": 1e-10, "batch_dim": 0},
    "bptt": {"method": "bptt"},
}


@pytest.mark.parametrize("name", list(INFERENCE_CASES))
def test_inference_mode_runs_the_forward(name):
    _, f = _net()
    h0 = torch.zeros(4, 8, dtype=DT)
    with torch.no_grad():
        want = rbp.fixed_point(f, h0, 60, **INFERENCE_CASES[name])
    with torch.inference_mode():
        got = rbp.fixed_point(f, h0, 60, **INFERENCE_CASES[name])
    assert torch.equal(got, want)


def test_inference_mode_tuple_state_and_module():
    _, f = _net()
    h0 = torch.zeros(4, 8, dtype=DT)
    with torch.inference_mode():
        a, b = rbp.fixed_point(lambda s: (f(s[0]), 0.5 * s[1]), (h0, h0 + 1), 30)
    assert torch.allclose(a, rbp.fixed_point(f, h0, 30).detach()) and b.abs().max() < 1e-8
    layer = rbp.FixedPoint(torch.nn.GRUCell(8, 8), 30)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        got = layer(x, torch.zeros(4, 8))
    with torch.no_grad():
        want = layer(x, torch.zeros(4, 8))
    assert torch.equal(got, want)


def test_in_place_f_is_still_refused_outside_inference_mode():
    with pytest.raises(ValueError, match="in place"):
        rbp.fixed_point(lambda h: h.mul_(0.5), torch.ones(3), 5)


# ------------------------------------------------------------------ 2. autocast with the solvers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_autocast_with_accelerated_solvers(dtype, solver):
    """A float32 state whose f runs under CPU autocast (and casts back): the solver's own
    arithmetic stays float32, and the fixed point matches plain iteration's."""
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(16, 16, generator=gen)).requires_grad_()

    def f(h):
        return torch.tanh(torch.nn.functional.linear(h, w) + 1.0).to(h.dtype)

    h0 = torch.zeros(4, 16)
    with torch.autocast("cpu", dtype=dtype):
        want = rbp.fixed_point(f, h0, 200, tol=1e-2, checks=rbp.Checks(settle_tol=None))
        got = rbp.fixed_point(
            f, h0, 200, tol=1e-2, solver=solver, checks=rbp.Checks(settle_tol=None),
        )
    assert got.dtype == torch.float32
    assert (got - want).norm() <= 5e-2 * want.norm()
    got.sum().backward()
    assert torch.isfinite(w.grad).all()


# ------------------------------------------------------------------ 3. Broyden meets a NaN


@pytest.mark.parametrize("memory", [1, 2, 4])
def test_broyden_non_finite_iterate_is_a_divergence_error(memory):
    with pytest.raises(rbp.DivergenceError, match="not finite"):
        rbp.fixed_point(
            lambda h: 3 * torch.sqrt(h) - 4, torch.linspace(0.5, 2, 5, dtype=DT), 40,
            solver=rbp.Broyden(memory=memory, tol=1e-9, check_every=10),
        )


# ------------------------------------------------------------------ 4. the settle check per sample


def _rates_problem(rates):
    """``h_i <- a_i h_i + (1 - a_i) c_i``: sample i contracts at rate a_i to ``c_i`` (= 1)."""
    a = torch.tensor(rates, dtype=DT)[:, None]
    c = torch.ones(len(rates), 4, dtype=DT).requires_grad_()
    return c, (lambda h, a, c: a * h + (1 - a) * c), (a, c)


@pytest.mark.parametrize("options", [{}, {"batch_dim": 0}, {"batch_dim": 0, "tol": 1e-3},
                                     {"solver": "anderson", "tol": 1e-9, "steps": 3}])
def test_one_slow_sample_among_fast_ones_is_reported(options):
    """One sample at 0.995 among 199 at 0.3, 40 steps: the batch ratio is below settle_tol,
    the slow sample is 82 % away from its fixed point and its gradient as wrong."""
    options = dict(options)
    steps = options.pop("steps", 40)
    c, f, inputs = _rates_problem([0.3] * 120 + [0.995] + [0.3] * 79)
    h, info = rbp.fixed_point(
        f, torch.zeros(200, 4, dtype=DT), steps,
        checks=rbp.Checks(settle_tol=1e-3, on_failure="ignore"), return_info=True, inputs=inputs,
        **options,
    )
    if "solver" not in options:
        assert info.relative_final_difference < 1e-3  # the whole-batch ratio says nothing
        h.sum().backward()
        assert abs(h[120] - 1).max() > 0.8  # 84 % away from h* = 1
        assert abs(c.grad[120] - 1).min() > 0.5  # d h*_i / d c_i = 1: the gradient is far off
    with pytest.warns(rbp.ConvergenceWarning, match=r"1 of 200 .*row 120"):
        rbp.fixed_point(
            f, torch.zeros(200, 4, dtype=DT), steps, checks=rbp.Checks(settle_tol=1e-3),
            inputs=inputs, **options,
        )


@pytest.mark.parametrize("host_rows", [0, 64])
def test_settle_check_reads_rows_the_same_on_the_host_and_on_the_tensors(monkeypatch, host_rows):
    """Few rows on the CPU are read to the host in one read (``HOST_ROWS``), more are reduced
    on the tensors: the same worst row ratio, the same slow row named, the same whole norms."""
    monkeypatch.setattr(importlib.import_module("rbp.forward.unroll"), "HOST_ROWS", host_rows)
    rates = [0.3] * 5 + [0.97] + [0.3] * 4
    _, f, inputs = _rates_problem(rates)
    with pytest.warns(rbp.ConvergenceWarning, match=r"1 of 10 rows.*row 5"):
        h, info = rbp.fixed_point(f, torch.zeros(10, 4, dtype=DT), 40, inputs=inputs,
                                  return_info=True)
    rate = torch.tensor(rates, dtype=DT)
    step = rate**39 * (1 - rate)  # |h_40 - h_39| per element, with h_t = 1 - rate^t
    rows = 2 * (1 - rate**40)  # ||h_40|| per row; a row's scale is at least their rms
    scale = rows.clamp_min(rows.norm() / len(rates) ** 0.5)
    assert info.worst_relative_difference == pytest.approx(float((2 * step / scale).max()),
                                                           rel=1e-12)
    assert info.final_difference == pytest.approx(float(2 * step.norm()), rel=1e-12)
    assert info.relative_final_difference == pytest.approx(
        info.final_difference / float(h.norm()), rel=1e-12)


@pytest.mark.parametrize("rows", [4, 100])
def test_settle_norms_of_a_half_precision_state_beyond_its_range(rows):
    """A float16 state whose norms exceed float16's range (65504) is measured, not crashed on:
    the norms are formed wider than the state."""
    w = torch.tensor(0.5, requires_grad=True)
    h0 = torch.full((rows, 3), 6e4, dtype=torch.float16)
    h, info = rbp.fixed_point(lambda h: 0.5 * h + w.half() * 3e4, h0, 3, "neumann", 3,
                              checks=rbp.Checks(on_failure="ignore"), return_info=True)
    # h_t = 3e4 (1 + 2^-t): ||h_3|| = 3.375e4 sqrt(3 rows) > 65504, each element moved 3750
    assert info.final_difference == pytest.approx(3750 * (3 * rows) ** 0.5, rel=1e-2)
    assert info.relative_final_difference == pytest.approx(3750 / 33750, rel=1e-2)
    assert info.worst_relative_difference == pytest.approx(3750 / 33750, rel=1e-2)


def test_settled_batch_gives_no_warning():
    _, f, inputs = _rates_problem([0.3] * 10 + [0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rbp.fixed_point(f, torch.zeros(11, 4, dtype=DT), 200, inputs=inputs)
        rbp.fixed_point(f, torch.zeros(11, 4, dtype=DT), 400, tol=1e-8, batch_dim=0,
                        inputs=inputs)


def test_absolute_tol_met_at_zero_fixed_point_is_no_false_alarm():
    w = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = rbp.fixed_point(
            lambda h: w * h, torch.ones(3, 2, dtype=DT), 200,
            solver=rbp.Iterate(tol=1e-9, tol_mode="absolute"),
        )
        rbp.fixed_point(
            lambda h: w * h, torch.ones(3, 2, dtype=DT), 200, batch_dim=0,
            solver=rbp.Iterate(tol=1e-9, tol_mode="absolute"),
        )
    h.sum().backward()
    assert w.grad.abs() < 1e-8  # h* = 0: no dependence on w
    with pytest.warns(rbp.ConvergenceWarning, match="not settled"):  # the relative one does
        rbp.fixed_point(
            lambda h: w * h, torch.ones(3, 2, dtype=DT), 20, checks=rbp.Checks(on_failure="warn"),
            solver=rbp.Iterate(tol=1e-9, tol_mode="absolute"),
        )


def test_forward_messages_do_not_name_an_unchosen_backward_method():
    _, f = _net()
    with pytest.warns(rbp.ConvergenceWarning) as caught:
        rbp.fixed_point(
            f, torch.zeros(8, dtype=DT), 2, tol=1e-12, checks=rbp.Checks(settle_tol=None),
        )
    assert all(str(w.message).startswith("fixed_point: the forward") for w in caught)
    with pytest.warns(rbp.ConvergenceWarning) as caught:  # the settle check is the forward's
        rbp.fixed_point(f, torch.zeros(8, dtype=DT), 2)
    assert all(str(w.message).startswith("fixed_point: the forward") for w in caught)
    with pytest.raises(rbp.DivergenceError, match="^fixed_point: the forward state is not"):
        rbp.fixed_point(lambda h: 3 * torch.sqrt(h) - 4, torch.ones(3, dtype=DT), 40,
                        tol=1e-9, solver="broyden")


# ------------------------------------------------------------------ 7. JFB / phantom, unstable


@pytest.mark.parametrize("method", [rbp.JFB(), rbp.Phantom(4)])
def test_jfb_and_phantom_report_an_unstable_fixed_point(method):
    """Broyden solves h = 2h - c (J = 2, a repelling fixed point h* = c): d sum(h*)/dc = 3,
    JFB says -3. Reported, not returned silently."""
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
    h, info = rbp.fixed_point(lambda h: 2 * h - c, torch.zeros(3, dtype=DT), 20, method,
                              tol=1e-10, solver="broyden", return_info=True)
    assert torch.allclose(h, c)
    with pytest.warns(rbp.ConvergenceWarning, match="unstable"):
        h.sum().backward()
    assert info.backward[0].stability_rate == pytest.approx(2.0)
    assert not torch.allclose(c.grad, torch.ones(3, dtype=DT))  # meaningless indeed
    with pytest.raises(rbp.DivergenceError, match="unstable"):
        rbp.fixed_point(
            lambda h: 2 * h - c, torch.zeros(3, dtype=DT), 20, method, tol=1e-10, solver="broyden",
            checks=rbp.Checks(on_failure="raise"),
        ).sum().backward()


@pytest.mark.parametrize("method", [rbp.JFB(), rbp.Phantom(4)])
def test_jfb_and_phantom_at_a_stable_fixed_point_are_quiet(method):
    w, f = _net(scale=0.3)
    h, info = rbp.fixed_point(f, torch.zeros(8, dtype=DT), 200, method, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h.sum().backward()
    assert info.backward[0].stability_rate < 1


# ------------------------------------------------------------------ 8. spectral radius estimate


@pytest.mark.parametrize("seed", range(6))
def test_spectral_radius_estimate_is_right_or_reported(seed):
    """A Gaussian J scaled to rho = 1.05 (eigenvalues filling a disc: slow power iteration):
    20 products gave 0.915 or 0.746, silently. Now within 2 % or a ConvergenceWarning."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 40, generator=gen, dtype=DT)
    a = a * (1.05 / torch.linalg.eigvals(a).abs().max())
    w = a.clone().requires_grad_()
    for iters in (20, 400):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, rho = rbp.jacobian_penalty(lambda h: w @ h, torch.zeros(40, dtype=DT),
                                          spectral_radius=True, radius_iters=iters)
        warned = any("has not converged" in str(c.message) for c in caught)
        assert warned or rho == pytest.approx(1.05, rel=0.02), (iters, rho)


def test_spectral_radius_of_a_separated_spectrum_converges_quietly():
    w = torch.diag(torch.tensor([1.05] + [0.5] * 9, dtype=DT)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rho = rbp.jacobian_penalty(lambda h: w @ h, torch.ones(10, dtype=DT),
                                      spectral_radius=True, radius_iters=20)
    assert rho == pytest.approx(1.05, rel=1e-3)


# ------------------------------------------------------------------ 9. the graph-walk cache


def test_two_closures_of_one_factory_are_judged_each_on_its_own():
    """The returned state requires grad only when f uses something that does."""
    w = torch.eye(4, dtype=DT).mul(0.5).requires_grad_()

    def make(weight):
        def f(h):
            return torch.tanh(h @ weight + 1.0) if weight is not None else 0.5 * h + 1.0
        return f

    for first, second in ((w, None), (None, w)):
        h1 = rbp.fixed_point(make(first), torch.zeros(4, dtype=DT), 80)
        h2 = rbp.fixed_point(make(second), torch.zeros(4, dtype=DT), 80)
        assert h1.requires_grad == (first is not None)
        assert h2.requires_grad == (second is not None)
    # the same closure switching its parameter off through a cell
    weight = w

    def g(h):
        return torch.tanh(h @ weight + 1.0) if weight is not None else 0.5 * h + 1.0

    assert rbp.fixed_point(g, torch.zeros(4, dtype=DT), 80).requires_grad
    weight = None
    assert not rbp.fixed_point(g, torch.zeros(4, dtype=DT), 80).requires_grad


# ------------------------------------------------------------------ 10. the sample-mixing check


def _mixing_maps():
    gen = torch.Generator().manual_seed(7)
    w = (0.3 * torch.randn(5, 5, generator=gen, dtype=DT)).requires_grad_()
    return {
        "batch mean": lambda h, x: torch.tanh(h @ w + 0.5 * h.mean(0, keepdim=True) + x),
        "batch flip": lambda h, x: torch.tanh(h.flip(0) @ w + x),
        "batch norm": lambda h, x: torch.tanh((h - h.mean(0)) @ w + x),
    }


@pytest.mark.parametrize("name", list(_mixing_maps()))
def test_sample_mixing_through_h_is_refused_even_from_equal_rows(name):
    f = _mixing_maps()[name]
    x = torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="f mixes samples"):
        rbp.fixed_point(f, torch.zeros(6, 5, dtype=DT), 100, tol=1e-10, batch_dim=0,
                        inputs=(x,))


@pytest.mark.parametrize("seed", range(5))
def test_random_f_is_refused_as_random(seed):
    torch.manual_seed(seed)
    w = (0.1 * torch.randn(64, 64, dtype=DT)).requires_grad_()

    def f(h):
        return torch.nn.functional.dropout(torch.tanh(h @ w + 1.0), p=0.2, training=True)

    with pytest.raises(ValueError, match="f is random"):
        rbp.fixed_point(f, torch.zeros(6, 64, dtype=DT), 100, tol=1e-10, batch_dim=0)


def test_independent_samples_pass_the_check_and_match_the_batch_solve():
    w = (0.3 * torch.randn(5, 5, dtype=DT, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(10))
    f = lambda h, x: torch.tanh(h @ w + x)  # noqa: E731
    a = rbp.fixed_point(f, torch.zeros(6, 5, dtype=DT), 200, tol=1e-12, batch_dim=0,
                        inputs=(x,))
    b = rbp.fixed_point(f, torch.zeros(6, 5, dtype=DT), 200, tol=1e-12, inputs=(x,))
    assert torch.allclose(a, b, atol=1e-10)


# ------------------------------------------------------------------ 11. sizes and budgets


def test_huge_solver_memory_is_sized_by_the_steps():
    """Anderson(m=10**8) / Broyden(memory=10**8) with steps=5 allocated 80 GB; the buffers
    hold what 5 evaluations can use, and the iterates are those of the default memory."""
    _, f = _net(n=16, scale=0.3)
    h0 = torch.zeros(3, 16, dtype=DT)
    for big, small in ((rbp.Anderson(m=10**8), rbp.Anderson(m=5)),
                       (rbp.Broyden(memory=10**8), rbp.Broyden(memory=50))):
        got = rbp.fixed_point(
            f, h0, 5, solver=big, tol=1e-12, checks=rbp.Checks(on_failure="ignore"),
        )
        want = rbp.fixed_point(
            f, h0, 5, solver=small, tol=1e-12, checks=rbp.Checks(on_failure="ignore"),
        )
        assert torch.equal(got, want)


def test_rbp_with_a_huge_truncate_stops_when_z_stops_changing():
    from rbp import linear

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=DT))
    jac = 0.9 * q
    b = torch.randn(2, 20, dtype=DT, generator=gen)
    sol = linear.RBP(max_iter=10**6).solve(linear.AdjointOperator(lambda v: v @ jac), b)
    want = torch.linalg.solve(torch.eye(20, dtype=DT) - jac.T, b.T).T
    assert sol.iterations < 1000 and sol.status == "converged"
    assert ((sol.z - want).norm() / want.norm()).item() < 1e-13


def test_compiled_step_with_cg_names_jvp_func():
    torch._dynamo.reset()
    w, _ = _net(scale=0.3)

    def step(h):
        return torch.tanh(h @ w + 1.0)

    h = rbp.fixed_point(
        torch.compile(step, backend="aot_eager"), torch.zeros(8, dtype=DT), 30, "cg", 5,
        checks=rbp.Checks(settle_tol=None),
    )
    with pytest.raises(RuntimeError, match="double backward.*jvp='func'"):
        h.sum().backward()
    torch._dynamo.reset()


class _OnceTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (once_differentiable)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_once_differentiable_step_is_refused_where_j_v_is_needed(dtype):
    """J v by a double vjp through a once-differentiable backward comes out as zeros with no
    error from torch; CG-RBP and second order would be silently wrong. Both say so; GMRES,
    which needs only J^T v, gives the exact gradient through the same step."""
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(6, 6, generator=gen, dtype=dtype)).requires_grad_()
    x = torch.randn(3, 6, generator=gen, dtype=dtype)

    def run(act, method):
        return rbp.fixed_point(lambda h, w: act(h @ w + x), torch.zeros(3, 6, dtype=dtype), 200,
                               method=method, inputs=(w,))

    h = run(_OnceTanh.apply, rbp.linear.CGNormal(max_iter=60))
    with pytest.raises(RuntimeError, match=r"J v is wrong.*once_differentiable.*jvp='func'"):
        h.sum().backward()
    h = run(_OnceTanh.apply, rbp.Implicit(rbp.linear.GMRES(max_iter=60), second_order=True))
    with pytest.raises(RuntimeError, match=r"J v is wrong.*second_order=True.*'bptt'"):
        torch.autograd.grad(h.sum(), w, create_graph=True)   # said before a wrong graph is made
    # the same step where only J^T v is needed, and the differentiable tanh with CG: exact
    (g_once,) = torch.autograd.grad(run(_OnceTanh.apply, "gmres").sum(), w)
    (g_cg,) = torch.autograd.grad(run(torch.tanh, rbp.linear.CGNormal(max_iter=60)).sum(), w)
    (g_ref,) = torch.autograd.grad(run(torch.tanh, "bptt").sum(), w)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g_once, g_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_cg, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ["autocast", "bfloat16", "float16", "mixed"])
def test_reduced_precision_is_no_false_alarm_for_cg_or_gmres(precision):
    """A map run in bfloat16 / float16 (or under autocast, or with a float32 leaf beside a
    float64 one) is as precise as its products: CG's J v test and GMRES's breakdown test
    allow for that (both raised on valid solves), while a once-differentiable step is still
    refused in bfloat16."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    w = (0.125 * torch.randn(n, n, generator=gen)).requires_grad_()
    x = torch.randn(4, n, generator=gen)
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision, torch.float32)
    checks = rbp.Checks(on_failure="raise")

    def run(method, act=torch.tanh, k=20):
        if precision == "mixed":  # one state, float32 and float64 leaves
            def f(s, xs):
                a = act(s[0] @ w.T + xs)
                return a, 0.5 * s[1] + a.double()
            h0 = (torch.zeros(4, n), torch.zeros(4, n, dtype=torch.float64))
        else:
            def f(h, xs):
                return act(h @ w.to(low).T + xs)
            h0 = torch.zeros(4, n, dtype=low)
        per_sample = method != "bptt" and precision != "mixed"
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast"
               else contextlib.nullcontext())
        with ctx:
            h = rbp.fixed_point(f, h0, 60, method, k, checks=checks, inputs=(x.to(h0[0].dtype if
                                isinstance(h0, tuple) else low),),
                                batch_dim=0 if per_sample else None)
        leaf = h[0] if isinstance(h, tuple) else h
        return torch.autograd.grad(leaf.float().sum(), w)[0]

    ref = run("bptt")
    for method in ("cg", "gmres"):   # K = 20 >= n: GMRES exhausts each sample's space
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = run(method)
        assert (g - ref).norm() / ref.norm() < (1e-3 if precision == "mixed" else 5e-2)
    if precision == "bfloat16":
        with pytest.raises(RuntimeError, match="J v is wrong"):
            run(rbp.linear.CGNormal(max_iter=20), act=_OnceTanh.apply)


def test_readme_like_batch_reports_its_slow_samples_and_a_tiny_row_is_no_alarm():
    """32 samples contracting at 0.1 .. 0.99, 100 steps: the slow samples are reported without
    batch_dim too. A settled state with one row near zero (a graph node, say) is not."""
    _, f, inputs = _rates_problem(torch.linspace(0.1, 0.99, 32).tolist())
    with pytest.warns(rbp.ConvergenceWarning, match="of 32 rows"):
        rbp.fixed_point(f, torch.zeros(32, 4, dtype=DT), 100, inputs=inputs)
    c = torch.ones(8, 4, dtype=DT).requires_grad_()
    mask = torch.ones(8, 1, dtype=DT)
    mask[0] = 0.0  # row 0's fixed point is 0: it decays by half each step, relative change 1
    h0 = torch.zeros(8, 4, dtype=DT)
    h0[0] = 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rbp.fixed_point(lambda h: 0.5 * h + 0.5 * c * mask, h0, 60)


@pytest.mark.parametrize("method", ["bptt", "neumann"])
@pytest.mark.parametrize("tuple_state", [False, True])
def test_shape_change_at_an_unchecked_step_is_named(method, tuple_state):
    w = (0.1 * torch.randn(4, 4, dtype=DT)).requires_grad_()
    count = [0]

    def g(h):
        count[0] += 1
        out = torch.tanh(h @ w + 1.0)
        return torch.cat([out, out], 1) if count[0] == 3 else out  # step 2 doubles the width

    f = (lambda s: (g(s[0]), s[1])) if tuple_state else g
    h0 = (torch.zeros(2, 4, dtype=DT), torch.zeros(1, dtype=DT)) if tuple_state else torch.zeros(
        2, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"changed the shape of state.* at step 2"):
        rbp.fixed_point(f, h0, 10, method)


def test_inference_mode_support_adds_no_graph_break_under_compile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    w, f = _net(scale=0.3)
    run = torch.compile(lambda h0: rbp.fixed_point(
        f, h0, 10, "neumann", 5, checks=rbp.Checks(settle_tol=None),
    ),
                        backend="aot_eager")
    run(torch.zeros(8, dtype=DT)).sum().backward()
    reasons = " ".join(str(k) for k in counters["graph_break"])
    assert "is_inference" not in reasons
    torch._dynamo.reset()


def _norm_run(method, backward_inside):
    """A weight-normalised tanh DEQ solved inside cached_norm; the loss's gradient in V."""
    torch.manual_seed(1)
    x = torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    lin = rbp.weight_norm(torch.nn.Linear(5, 5).double(), scale=0.3)
    with rbp.cached_norm(lin):
        h = rbp.fixed_point(lambda h: torch.tanh(lin(h) + x), torch.zeros(3, 5, dtype=DT),
                            300 if method == "bptt" else 200, method,
                            **({} if method == "bptt" else {"tol": 1e-14}))
        if backward_inside:
            h.square().sum().backward()
    if not backward_inside:
        h.square().sum().backward()
    return lin.parametrizations.weight.original1.grad


def test_a_backward_that_runs_f_again_refuses_a_changed_f():
    """second_order=True (and cg with jvp='func') run f again in the backward: a weight
    recomputed outside cached_norm, a new dropout mask or eval() in between made the
    gradient silently wrong (0 for V, or off by O(1)); now a RuntimeError says so. Inside
    the block it is exact."""
    so = rbp.Implicit(rbp.linear.GMRES(max_iter=30, tol=1e-13), second_order=True)
    ref = _norm_run("bptt", False)
    assert torch.allclose(_norm_run(so, True), ref, atol=1e-10)
    with pytest.raises(RuntimeError, match="no longer read: f changed in between"):
        _norm_run(so, False)
    w0 = (0.12 * torch.randn(5, 5, dtype=DT, generator=torch.Generator().manual_seed(2)))
    w0.requires_grad_()
    x = torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    drop = rbp.VariationalDropout(0.4)
    cg_func = rbp.Implicit(rbp.linear.CGNormal(max_iter=40, jvp="func"))
    for method, who in ((so, "second_order=True"), (cg_func, r"cg \(jvp='func'\)")):
        for change in (lambda: drop.reset(x), drop.eval):
            drop.train()
            w = w0 * 1.0  # a non-leaf read by f
            with drop.fixed(x):
                h = rbp.fixed_point(lambda h, w=w: torch.tanh(drop(h) @ w.T + x),
                                    torch.zeros_like(x), 200, method, tol=1e-14)
                change()
                with pytest.raises(RuntimeError, match=who + r": the backward runs f again.*"
                                   r"differs from the forward's"):
                    torch.autograd.grad(h.square().sum(), w0)


def test_a_dropout_mask_for_another_batch_never_broadcasts():
    drop = rbp.VariationalDropout(0.5)
    drop.reset(torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"mask has shape \(1, 6\), drawn for another input"):
        drop(torch.ones(8, 6))
    two_d = rbp.VariationalDropout2d(0.5)
    two_d.reset(torch.zeros(2, 3, 4, 4))
    assert two_d(torch.ones(2, 3, 4, 4)).shape == (2, 3, 4, 4)  # spatial dims shared
    with pytest.raises(ValueError, match="drawn for another input"):
        two_d(torch.ones(1, 3, 4, 4))
    drop.eval()
    drop.reset(torch.zeros(2, 6))  # all ones: no dropout in training, so refused there
    drop.train()
    with pytest.raises(RuntimeError, match="drawn in eval mode"):
        drop(torch.ones(2, 6))


def test_norm_options_are_checked_before_the_module_is_touched():
    from torch.nn.utils import parametrize

    lin = torch.nn.Linear(3, 4)
    for options, error in (({"scale": -1}, ValueError), ({"learn_scale": "no"}, TypeError),
                           ({"dim": 2}, ValueError)):
        with pytest.raises(error):
            rbp.weight_norm(lin, **options)
        assert not parametrize.is_parametrized(lin, "weight")
    with pytest.raises(TypeError, match="learn_scale must be True or False"):
        rbp.spectral_norm(torch.nn.Linear(3, 3), learn_scale="no")
    last = rbp.weight_norm(torch.nn.Linear(3, 4), dim=-1, scale=2.0)  # the last dim, as 1
    assert torch.allclose(last.weight.norm(dim=0), torch.full((3,), 2.0))


def test_second_order_at_an_unsettled_state_is_no_false_alarm():
    """At a state that has not settled, h* = h_{T-1} differs from F(h_{T-1}): the check that
    f is unchanged compares with the forward's F(h_{T-1}), not with h* (it raised here)."""
    g = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(5, 5, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(3, 5, generator=g, dtype=DT)
    so = rbp.Implicit(rbp.linear.GMRES(max_iter=30, tol=1e-13), second_order=True)
    h = rbp.fixed_point(lambda h: torch.tanh(h @ w.T + x), torch.zeros(3, 5, dtype=DT), 4, so,
                        checks=rbp.Checks(on_failure="ignore"))
    (gw,) = torch.autograd.grad(h.square().sum(), w, create_graph=True)
    (hw,) = torch.autograd.grad(gw.square().sum(), w)
    assert torch.isfinite(hw).all() and hw.abs().sum() > 0
