"""Second derivatives (create_graph through ``Implicit(solver, second_order=True)``) and forward
mode (``torch.func.jvp``, ``forward_ad``) through the implicit methods, against BPTT's own
second derivatives on converged problems and against finite differences, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from dynamics import DT, gru, max_rel_error, tanh_rnn

import rbp

SOLVERS = {
    "gmres": lambda: rbp.linear.GMRES(max_iter=60, tol=1e-13),
    "neumann": lambda: rbp.linear.Neumann(max_iter=200),
    "cg": lambda: rbp.linear.CGNormal(max_iter=80, tol=1e-14),
    "rbp": lambda: rbp.linear.RBP(max_iter=200),
}


def second_order(name: str) -> rbp.Implicit:
    return rbp.Implicit(SOLVERS[name](), second_order=True)


def hvp(p, method, v, steps=None):
    """``d/dw <dL/dw, v>`` through the fixed point, for every parameter."""
    h = rbp.fixed_point(p.f, p.h0, steps or p.steps, method)
    grads = torch.autograd.grad(p.loss(h), p.params, create_graph=True)
    inner = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
    return list(torch.autograd.grad(inner, p.params, allow_unused=True, materialize_grads=True))


def directions(p, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(q.shape, dtype=DT, generator=gen) for q in p.params]


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("problem", [tanh_rnn, gru])
def test_hessian_vector_products_equal_bptt(name, problem):
    p = problem()
    v = directions(p)
    exact = hvp(p, "bptt", v, steps=2 * p.steps)
    assert max_rel_error(hvp(p, second_order(name), v), exact) < 1e-9


def test_first_order_equals_the_default_path():
    p = tanh_rnn()
    plain = torch.autograd.grad(p.loss(rbp.fixed_point(p.f, p.h0, p.steps, "gmres", 40)),
                                p.params)
    method = rbp.Implicit(rbp.linear.GMRES(max_iter=40), second_order=True)
    node = torch.autograd.grad(p.loss(rbp.fixed_point(p.f, p.h0, p.steps, method)), p.params)
    assert max_rel_error(list(node), list(plain)) < 1e-13


@pytest.mark.parametrize("as_input", [True, False])
def test_gradient_penalty_with_an_encoder(as_input):
    """A DEQ with an encoder outside f (its output passed as an input, or read through the
    closure): a penalty on the input gradient, differentiated into the encoder's weights, as
    BPTT gives it."""
    gen = torch.Generator().manual_seed(1)
    enc = torch.randn(5, 3, dtype=DT, generator=gen).requires_grad_()
    w = (0.4 * torch.randn(5, 5, dtype=DT, generator=gen) / 2).requires_grad_()
    data = torch.randn(4, 3, dtype=DT, generator=gen).requires_grad_()

    def penalty(method, steps):
        x = data @ enc.T  # computed before the call: passed as an input
        if as_input:
            h = rbp.fixed_point(lambda h, x: torch.tanh(h @ w.T + x),
                                torch.zeros(4, 5, dtype=DT), steps, method, inputs=(x,))
        else:
            h = rbp.fixed_point(lambda h: torch.tanh(h @ w.T + x), torch.zeros(4, 5, dtype=DT),
                                steps, method)
        (g_data,) = torch.autograd.grad(h.pow(2).sum(), data, create_graph=True)
        return torch.autograd.grad(g_data.pow(2).sum(), [enc, w])

    exact = penalty("bptt", 300)
    got = penalty(second_order("gmres"), 150)
    assert max_rel_error(list(got), list(exact)) < 1e-9


def test_hypergradient_of_a_hypergradient():
    """One SGD step on w through the fixed point, then the validation loss's gradient with
    respect to the learning rate and to an input scale, differentiated once more."""
    p = tanh_rnn(n=6, seed=3)
    w, x = p.params

    def meta(method, steps):
        lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
        h = rbp.fixed_point(p.f, p.h0, steps, method)
        (gw,) = torch.autograd.grad(p.loss(h), w, create_graph=True)
        w2 = w - lr * gw
        h2 = rbp.fixed_point(lambda h: torch.tanh(w2 @ h + x), p.h0, steps, method)
        (dlr,) = torch.autograd.grad(p.loss(h2), lr, create_graph=True)
        return torch.autograd.grad(dlr, [lr, x])

    exact = meta("bptt", 400)
    got = meta(second_order("gmres"), 200)
    assert max_rel_error(list(got), list(exact)) < 1e-8


def test_tuple_state_per_sample():
    gen = torch.Generator().manual_seed(2)
    a = (0.3 * torch.randn(4, 4, dtype=DT, generator=gen)).requires_grad_()
    b = (0.3 * torch.randn(4, 4, dtype=DT, generator=gen)).requires_grad_()
    x = torch.randn(3, 4, dtype=DT, generator=gen)

    def f(s, xs):
        u, v = s
        return torch.tanh(u @ a.T + xs), torch.tanh(u @ b.T + 0.5 * v)

    def grads(method, steps, **kw):
        u, v = rbp.fixed_point(f, (torch.zeros(3, 4, dtype=DT), torch.zeros(3, 4, dtype=DT)),
                               steps, method, inputs=(x,), **kw)
        (ga,) = torch.autograd.grad((u * v).sum() + v.pow(2).sum(), a, create_graph=True)
        return torch.autograd.grad(ga.pow(2).sum(), [a, b])

    exact = grads("bptt", 300)
    got = grads(second_order("gmres"), 150, batch_dim=0)
    assert max_rel_error(list(got), list(exact)) < 1e-9


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_memory_does_not_grow_with_the_forward_steps():
    p = tanh_rnn()
    sizes = {}
    for steps in (100, 400):
        h = rbp.fixed_point(p.f, p.h0, steps, second_order("gmres"))
        (gw, _) = torch.autograd.grad(p.loss(h), p.params, create_graph=True)
        sizes[steps] = (_graph_size(h), _graph_size(gw))
    assert sizes[100] == sizes[400]
    bptt = [_graph_size(rbp.fixed_point(p.f, p.h0, s, "bptt")) for s in (100, 400)]
    assert bptt[1] > 3 * bptt[0]  # the unrolled graph, for contrast


def test_the_second_order_solve_is_recorded_and_checked():
    p = tanh_rnn()
    h, info = rbp.fixed_point(p.f, p.h0, p.steps, second_order("gmres"), return_info=True)
    (gw, _) = torch.autograd.grad(p.loss(h), p.params, create_graph=True)
    torch.autograd.grad(gw.sum(), p.params[0])
    names = [r.method for r in info.backward]
    assert names[0] == "gmres" and "gmres (second order)" in names
    assert all(r.status.ok for r in info.backward)
    # a series that cannot converge (rho(J) > 1) is reported in the second-order solve too
    w = (1.5 * torch.eye(3, dtype=DT)).requires_grad_()
    h = rbp.fixed_point(lambda h: 0.0 * h + w @ torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT),
                        5, rbp.Implicit(rbp.linear.Neumann(max_iter=5), second_order=True))
    (gw,) = torch.autograd.grad(h.pow(2).sum(), w, create_graph=True)  # J = 0: fine
    assert torch.isfinite(torch.autograd.grad(gw.sum(), w)[0]).all()


def test_refusals_name_what_works():
    p = tanh_rnn()
    h = rbp.fixed_point(p.f, p.h0, p.steps, "gmres")
    with pytest.raises(RuntimeError, match="second_order=True"):
        torch.autograd.grad(p.loss(h), p.params, create_graph=True)
    with pytest.raises(TypeError, match="second_order"):
        rbp.Implicit(rbp.linear.GMRES(), second_order=1)
    with pytest.raises(ValueError, match="SHINE"):
        rbp.Implicit(rbp.linear.SHINE(refine=5), second_order=True)
    # third derivatives
    h = rbp.fixed_point(p.f, p.h0, p.steps, second_order("gmres"))
    (gw, _) = torch.autograd.grad(p.loss(h), p.params, create_graph=True)
    with pytest.raises(RuntimeError, match="third"):
        torch.autograd.grad(gw.sum(), p.params, create_graph=True)


def test_module_with_second_order():
    torch.manual_seed(0)
    cell = torch.nn.Linear(4, 4).to(DT)
    with torch.no_grad():
        cell.weight.mul_(0.3)
    layer = rbp.FixedPoint(lambda x, h: torch.tanh(cell(h) + x), 100, second_order("gmres"))
    x = torch.randn(2, 4, dtype=DT, requires_grad=True)
    h = layer(x, torch.zeros(2, 4, dtype=DT))
    (gx,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.pow(2).sum(), cell.weight)
    h = rbp.fixed_point(lambda h: torch.tanh(cell(h) + x), torch.zeros(2, 4, dtype=DT), 200,
                        "bptt")
    (gx,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(gx.pow(2).sum(), cell.weight)
    assert max_rel_error([gw], [ref]) < 1e-9


# ---- forward mode ----


def _jvp_problem(seed=0, n=5):
    gen = torch.Generator().manual_seed(seed)
    w = 0.6 * torch.randn(n, n, dtype=DT, generator=gen) / n**0.5
    v = torch.randn(n, n, dtype=DT, generator=gen)
    x = torch.randn(n, dtype=DT, generator=gen)
    return w, v, x


def _finite_difference(fn, w, v, eps=1e-6):
    return (fn(w + eps * v) - fn(w - eps * v)) / (2 * eps)


@pytest.mark.parametrize("method", ["gmres", "cg", "neumann", "rbp"])
def test_torch_func_jvp_matches_finite_differences(method):
    w, v, x = _jvp_problem()

    def fn(w):
        return rbp.fixed_point(lambda h: torch.tanh(w @ h + x), torch.zeros(5, dtype=DT), 300,
                               method, 100)

    fd = _finite_difference(fn, w, v)
    primal, tangent = torch.func.jvp(fn, (w,), (v,))
    assert torch.equal(primal, fn(w))
    assert ((tangent - fd).norm() / fd.norm()).item() < 1e-8


def test_jvp_is_the_implicit_tangent_at_the_returned_state():
    """After a few forward steps, the tangent is (I - J)^{-1} dF/dw v at the state returned
    (a dense solve), not the tangent of the unrolled iterations."""
    w, v, x = _jvp_problem(seed=1)

    def fn(w, method):
        return rbp.fixed_point(lambda h: torch.tanh(w @ h + x), torch.zeros(5, dtype=DT), 6,
                               method, 60, checks=rbp.Checks(on_failure="ignore"))

    h = fn(w, "bptt")
    jac = torch.autograd.functional.jacobian(lambda h: torch.tanh(w @ h + x), h)
    _, b = torch.func.jvp(lambda w: torch.tanh(w @ h + x), (w,), (v,))
    exact = torch.linalg.solve(torch.eye(5, dtype=DT) - jac, b)
    primal, implicit = torch.func.jvp(lambda w: fn(w, "gmres"), (w,), (v,))
    _, unrolled = torch.func.jvp(lambda w: fn(w, "bptt"), (w,), (v,))
    assert torch.equal(primal, h)
    assert ((implicit - exact).norm() / exact.norm()).item() < 1e-10
    assert ((unrolled - exact).norm() / exact.norm()).item() > 1e-4


def test_forward_ad_dual_tensors_batch_and_tuple_state():
    w, v, x = _jvp_problem(seed=2)
    xb = torch.randn(3, 5, dtype=DT)

    def fn(w):
        return rbp.fixed_point(
            lambda s, xs: (torch.tanh(s[0] @ w.T + xs), 0.5 * s[1] + s[0]),
            (torch.zeros(3, 5, dtype=DT), torch.zeros(3, 5, dtype=DT)), 300, "gmres", 60,
            batch_dim=0, inputs=(xb,), solver="anderson", tol=1e-12)

    fd = [(a - b) / 2e-6 for a, b in zip(fn(w + 1e-6 * v), fn(w - 1e-6 * v), strict=True)]
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(w, v))
        tangents = [fwAD.unpack_dual(o).tangent for o in out]
    assert max_rel_error(tangents, fd) < 1e-7


def test_forward_mode_reports_a_failed_tangent_solve():
    w = torch.tensor([[0.5]], dtype=DT)

    def fn(w):  # J = 0.5 at every h: contractive forward; a 2-term series is far off
        return rbp.fixed_point(lambda h: w @ h + 1.0, torch.zeros(1, dtype=DT), 200,
                               rbp.Implicit(rbp.linear.Neumann(max_iter=1)),
                               checks=rbp.Checks(on_failure="raise", max_backward_error=1e-6))

    with pytest.raises(rbp.DivergenceError, match="forward mode"):
        torch.func.jvp(fn, (w,), (torch.ones(1, 1, dtype=DT),))


def test_an_unsettled_forward_is_reported_under_jvp_as_without():
    """The tangent, like the gradient, is taken at the returned state: an unsettled forward is
    reported under torch.func.jvp too (it was skipped there: a tangent 18 % off, no word)."""
    w, v, x = _jvp_problem(seed=3)

    def fn(w):
        return rbp.fixed_point(lambda h: torch.tanh(w @ h + x), torch.zeros(5, dtype=DT), 3,
                               "gmres", 20, checks=rbp.Checks(on_failure="raise"))

    with pytest.raises(rbp.DivergenceError, match="has not settled"):
        fn(w.clone().requires_grad_())
    with pytest.raises(rbp.DivergenceError, match="has not settled"):
        torch.func.jvp(fn, (w,), (v,))
    with pytest.raises(rbp.DivergenceError, match="has not settled"), fwAD.dual_level():
        fn(fwAD.make_dual(w, v))


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap"])
def test_reverse_transforms_stay_refused_and_name_jvp(transform):
    w, _, x = _jvp_problem()

    def fn(w):
        return rbp.fixed_point(lambda h: torch.tanh(w @ h + x), torch.zeros(5, dtype=DT), 50,
                               "gmres")

    call = {"grad": lambda: torch.func.grad(lambda w: fn(w).sum())(w),
            "jacrev": lambda: torch.func.jacrev(fn)(w),
            "vmap": lambda: torch.func.vmap(fn)(torch.stack([w, w]))}[transform]
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        call()
