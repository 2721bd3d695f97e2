"""Method values: the strings as shortcuts, JFB and phantom gradients, user solvers, validation."""

from __future__ import annotations

import pytest
import torch
from dynamics import DT, exact_gradients, max_rel_error, method_gradients, tanh_rnn

import rbp
from rbp import linear, methods


def _grads(p, method, steps=200, **kwargs):
    return method_gradients(p, method, steps=steps, **kwargs)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bptt", rbp.BPTT()),
        ("tbptt", rbp.TBPTT(7)),
        ("neumann", rbp.Implicit(linear.Neumann(max_iter=7))),
        ("rbp", rbp.Implicit(linear.RBP(max_iter=7))),
        ("cg", rbp.Implicit(linear.CGNormal(max_iter=7))),
        ("gmres", rbp.Implicit(linear.GMRES(max_iter=7))),
    ],
)
def test_values_equal_their_string_shortcuts(name, value):
    p = tanh_rnn()
    by_name = _grads(p, name, truncate=7)
    by_value = _grads(p, value)
    assert max_rel_error(by_value, by_name) <= 1e-14


def test_a_bare_solver_value_is_an_implicit_method():
    p = tanh_rnn()
    a = _grads(p, linear.GMRES(max_iter=5))
    b = _grads(p, "gmres", truncate=5)
    assert max_rel_error(a, b) <= 1e-14


def _last_step_pieces(p):
    """h* (converged), g = dL/dh*, J at h*, and u -> u^T dF/dw."""
    with torch.no_grad():
        h = p.h0.clone()
        for _ in range(400):
            h = p.f(h)
    hs = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.loss(hs), hs)
    jac = torch.autograd.functional.jacobian(p.f, h)
    out = p.f(h)

    def pull(u):
        return list(torch.autograd.grad(out, p.params, u, retain_graph=True))

    return g, jac, pull


def test_jfb_is_g_transpose_dF_dw():
    p = tanh_rnn()
    g, _, pull = _last_step_pieces(p)
    got = _grads(p, rbp.JFB(), steps=400)
    assert max_rel_error(got, pull(g)) <= 1e-12


@pytest.mark.parametrize(("k", "damping"), [(1, 0.5), (4, 0.5), (6, 0.9)])
def test_phantom_gradient_equals_its_formula(k, damping):
    """z = lam sum_{i<k} (lam J^T + (1 - lam) I)^i g, then z^T dF/dw."""
    p = tanh_rnn()
    g, jac, pull = _last_step_pieces(p)
    a_t = damping * jac.T + (1 - damping) * torch.eye(len(g), dtype=DT)
    z, u = torch.zeros_like(g), g.clone()
    for _ in range(k):
        z += u
        u = a_t @ u
    got = _grads(p, rbp.Phantom(k, damping), steps=400)
    assert max_rel_error(got, pull(damping * z)) <= 1e-12


def test_phantom_equals_unrolled_damped_steps_at_a_fixed_point():
    """Back-propagating through k damped steps from h* gives the same gradient."""
    p = tanh_rnn()
    with torch.no_grad():
        h = p.h0.clone()
        for _ in range(400):
            h = p.f(h)
    k, lam = 5, 0.6
    for q in p.params:
        q.grad = None
    x = h
    for _ in range(k):
        x = lam * p.f(x) + (1 - lam) * x
    p.loss(x).backward()
    unrolled = [q.grad.clone() for q in p.params]
    got = _grads(p, rbp.Phantom(k, lam), steps=400)
    assert max_rel_error(got, unrolled) <= 1e-10


def test_phantom_without_damping_is_tbptt():
    p = tanh_rnn()
    assert max_rel_error(_grads(p, rbp.Phantom(6, 1.0)), _grads(p, "tbptt", truncate=6)) <= 1e-12


def test_jfb_and_phantom_are_inexact_but_never_flagged():
    p = tanh_rnn()
    want = exact_gradients(p)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jfb = _grads(p, rbp.JFB())
        ph = _grads(p, rbp.Phantom(3))
    assert max_rel_error(jfb, want) > 1e-2 and max_rel_error(ph, want) > 1e-2


def test_user_solver_is_called_with_the_documented_signature_and_used():
    seen = {}

    class Dense:
        name = "dense"

        def solve(self, matvec, b):
            seen["shape"] = tuple(b.shape)
            seen["vjp"] = callable(getattr(matvec, "vjp", None))
            n = b.shape[1]
            eye = torch.eye(n, dtype=b.dtype)
            a = torch.stack([matvec(e.expand(b.shape[0], n)) for e in eye], dim=2)  # A per row
            return torch.linalg.solve(a, b)  # a bare tensor z is accepted

    p = tanh_rnn()
    h, info = rbp.fixed_point(p.f, p.h0, 200, rbp.Implicit(Dense()), return_info=True)
    p.loss(h).backward()
    got = [q.grad.clone() for q in p.params]
    assert seen == {"shape": (1, 8), "vjp": True}
    assert max_rel_error(got, exact_gradients(p)) <= 1e-10
    record = info.backward[0]
    assert record.method == "dense" and record.status == "converged"
    assert record.error_estimate <= 1e-12  # the core measured the true residual


def test_user_callable_returning_a_bad_result_is_refused():
    p = tanh_rnn()
    h = rbp.fixed_point(p.f, p.h0, 200, rbp.Implicit(lambda matvec, b: b[:, :3]))
    with pytest.raises(TypeError, match="must return a Solution"):
        p.loss(h).backward()


def test_user_solver_that_is_wrong_is_reported():
    p = tanh_rnn()
    h = rbp.fixed_point(
        p.f, p.h0, 200, rbp.Implicit(lambda matvec, b: 0.5 * b),
        checks=rbp.Checks(on_failure="raise"),
    )
    with pytest.raises(rbp.DivergenceError, match="max_backward_error"):
        p.loss(h).backward()


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: rbp.TBPTT(0), ValueError, "TBPTT k must be an integer >= 1"),
        (lambda: rbp.TBPTT(2.0), TypeError, "TBPTT k must be an integer"),
        (lambda: rbp.Phantom(0), ValueError, "Phantom k must be an integer >= 1"),
        (lambda: rbp.Phantom(3, 0.0), ValueError, r"damping must be a number in \(0, 1\]"),
        (lambda: rbp.Phantom(3, float("nan")), ValueError, "damping"),
        (lambda: rbp.Phantom(3, True), ValueError, "damping"),
        (lambda: rbp.Implicit("gmres"), TypeError, "a name is fixed_point.s method=, not a solver"),
    ],
)
def test_bad_method_values_are_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": 3}, TypeError, "method must be a name"),
        ({"method": "adjoint"}, ValueError, "unknown method 'adjoint'"),
        ({"method": rbp.TBPTT(20), "steps": 5}, ValueError, "truncate <= steps"),
        ({"method": rbp.linear.RBP(max_iter=5), "truncate": 6}, ValueError, "applies to"),
    ],
)
def test_bad_method_arguments_of_fixed_point(kwargs, error, match):
    p = tanh_rnn()
    args = {"steps": 10, **kwargs}
    with pytest.raises(error, match=match):
        rbp.fixed_point(p.f, p.h0, **args)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: rbp.Checks(fallback="bptt"), ValueError, "fallback must be"),
        (lambda: rbp.Checks(fallback=rbp.JFB()), ValueError, "fallback must be"),
        (lambda: rbp.Checks(max_backward_error=-1.0), ValueError, "max_backward_error"),
        (lambda: rbp.Checks(max_backward_error=True), TypeError, "max_backward_error"),
    ],
)
def test_bad_checks_are_refused_when_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_fallback_accepts_a_solver_value():
    a = (1.3 * torch.eye(4, dtype=DT)).requires_grad_()
    x = torch.ones(4, dtype=DT, requires_grad=True)
    h = rbp.fixed_point(
        lambda h: a @ h + x, torch.zeros(4, dtype=DT), 1, "neumann", 10,
        checks=rbp.Checks(settle_tol=None, fallback=linear.GMRES(max_iter=10)),
    )
    with pytest.warns(rbp.ConvergenceWarning, match="fell back to gmres"):
        h.sum().backward()
    assert torch.allclose(x.grad, torch.full((4,), -1 / 0.3, dtype=DT))


def test_resolve_names():
    assert methods.resolve("tbptt", truncate=3) == rbp.TBPTT(3)
    value = methods.from_name("gmres", 10, restart=4)
    assert value.solver == linear.GMRES(max_iter=10, restart=4)
    assert methods.from_name("gmres", 10) == methods.resolve("gmres", truncate=10)
    assert methods.from_name("rbp", 3, init="uniform").solver == linear.RBP(3, init="uniform")
    assert methods.from_name("tbptt", 4) == rbp.TBPTT(4)
    assert methods.resolve("rbp", truncate=2).solver.init == "zeros"
    assert repr(rbp.Phantom(3, 0.25)) == "Phantom(k=3, damping=0.25)"


def test_string_options_with_a_value_are_refused():
    p = tanh_rnn()
    with pytest.raises(ValueError, match="applies to the string method names only"):
        rbp.fixed_point(p.f, p.h0, 10, rbp.Implicit(linear.GMRES()), truncate=40)
    # the value's own K is not ignored: accepted (from_name(name, k, ...) passed on with k)
    rbp.fixed_point(p.f, p.h0, 10, rbp.Implicit(linear.GMRES(max_iter=40)), truncate=40)
    for name in ("backward_tol", "rbp_init", "restart"):  # options of the values now
        with pytest.raises(TypeError, match=name):
            rbp.fixed_point(p.f, p.h0, 10, rbp.Implicit(linear.GMRES()), **{name: 5})


def test_user_solution_without_errors_gets_the_true_residual_and_bad_status_is_refused():
    from rbp.diagnostics import Status

    p = tanh_rnn()
    claims = linear.Solution  # a user solver that says "converged" after doing nothing

    h, info = rbp.fixed_point(
        p.f, p.h0, 200, rbp.Implicit(lambda m, b: claims(b, 1, [], Status.CONVERGED)),
        checks=rbp.Checks(on_failure="ignore"), return_info=True,
    )
    p.loss(h).backward()
    assert info.backward[0].error_estimate > 1e-2  # measured, not taken on trust

    class Odd:
        z = None
        status = "fine"

    def odd(matvec, b):
        r = Odd()
        r.z = b
        return r

    h = rbp.fixed_point(p.f, p.h0, 200, rbp.Implicit(odd))
    with pytest.raises(TypeError, match="returned status 'fine'"):
        p.loss(h).backward()


def test_string_methods_resolve_once_per_option_set():
    a = methods.resolve("neumann", truncate=7)
    assert a is methods.resolve("neumann", truncate=7)  # frozen value, cached
    assert a != methods.resolve("neumann", truncate=8)
    assert methods.from_name("gmres", 7, restart=3).solver.restart == 3
    with pytest.raises(TypeError, match="tol must be a finite number"):
        methods.from_name("rbp", 3, tol=[1e-3])  # unhashable: still a clear message


@pytest.mark.parametrize("method", [rbp.TBPTT(4), "tbptt"])
def test_tbptt_through_every_step_is_bptt_into_h0_too(method):
    """truncate == steps back-propagates through every update, so it reaches h0 (an encoder's
    weights) exactly as BPTT does; one step shorter it does not."""
    g = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(5, 5, generator=g, dtype=DT)).requires_grad_()
    a = torch.randn(5, 5, generator=g, dtype=DT, requires_grad=True)  # h0 = tanh(x a)
    x = torch.randn(3, 5, generator=g, dtype=DT)

    def grads(m, k=4):
        h = rbp.fixed_point(lambda h: torch.tanh(h @ w.T + x), torch.tanh(x @ a), 4, m, k)
        return torch.autograd.grad(h.square().sum(), (w, a), allow_unused=True)

    ref = grads("bptt")
    got = grads(method)
    assert all(torch.allclose(u, v, rtol=1e-13, atol=0) for u, v in zip(got, ref, strict=True))
    assert grads("tbptt", 3)[1] is None
