"""Every method against the exact implicit gradient from a dense float64 solve."""

from __future__ import annotations

import pytest
import torch
from dynamics import ALL, exact_gradients, max_rel_error, method_gradients

import rbp


@pytest.fixture(params=ALL, ids=lambda make: make.__name__)
def problem(request):
    return request.param()


@pytest.mark.parametrize("method", rbp.METHODS)
def test_long_limit_reaches_exact_gradient(problem, method):
    """Long unrolls / long series: every method reaches the exact dL/dw and dL/dx to 1e-8."""
    steps = problem.steps
    k = {"bptt": 1, "tbptt": steps, "cg": max(60, problem.series)}.get(method, problem.series)
    got = method_gradients(problem, method, steps=steps, truncate=k)
    want = exact_gradients(problem)
    assert max_rel_error(got, want) <= 1e-8


def test_rbp_uniform_init_converges_to_exact(problem):
    got = method_gradients(
        problem, rbp.linear.RBP(max_iter=problem.series, init="uniform"), steps=problem.steps
    )
    assert max_rel_error(got, exact_gradients(problem)) <= 1e-8


@pytest.mark.parametrize("method", ["neumann", "rbp", "tbptt"])
def test_truncation_is_an_approximation_that_improves_with_k(method):
    from dynamics import slow

    p = slow()
    want = exact_gradients(p)
    errors = [
        max_rel_error(
            method_gradients(p, rbp.linear.RBP(max_iter=k, init="zeros"), steps=p.steps), want
        )
        if method == "rbp"
        else max_rel_error(method_gradients(p, method, steps=p.steps, truncate=k), want)
        for k in (5, 50, 500)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-2  # a 5-step truncation of a slow map is visibly wrong


def test_gmres_beats_cg_on_slow_non_normal_dynamics():
    """At an equal budget, GMRES on (I - J^T) z = g is more accurate than CG on the normal eq."""
    gen = torch.Generator().manual_seed(7)
    n = 30
    a = torch.diag(torch.full((n,), 0.9, dtype=torch.float64)) + 0.8 * torch.diag(
        torch.ones(n - 1, dtype=torch.float64), 1
    )
    a = (a + 0.01 * torch.randn(n, n, generator=gen, dtype=torch.float64)).requires_grad_()
    from dynamics import Problem

    x = torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_()
    c = torch.randn(n, dtype=torch.float64, generator=gen)
    p = Problem(
        "nn",
        lambda h: torch.tanh(a @ h) + x,
        [a, x],
        torch.zeros(n, dtype=torch.float64),
        lambda h: (c * h).sum(),
        3000,
        0,
    )
    want = exact_gradients(p)
    err = {
        m: max_rel_error(
            method_gradients(
                p, m, steps=p.steps, truncate=15, checks=rbp.Checks(on_failure="ignore"),
            ), want
        )
        for m in ("cg", "gmres")
    }
    assert err["gmres"] < err["cg"]


@pytest.mark.parametrize("method", ["cg"])
def test_cg_forward_mode_jvp_matches_double_vjp(method):
    from dynamics import gru

    p = gru()
    a = method_gradients(p, rbp.linear.CGNormal(max_iter=10, jvp="double_vjp"), steps=p.steps)
    b = method_gradients(p, rbp.linear.CGNormal(max_iter=10, jvp="func"), steps=p.steps)
    assert max_rel_error(a, b) <= 1e-10


def test_float32_close_to_float64():
    from dynamics import tanh_rnn

    p = tanh_rnn()
    want = exact_gradients(p)
    w32 = p.params[0].detach().float().requires_grad_()
    x32 = p.params[1].detach().float().requires_grad_()
    h = rbp.fixed_point(lambda h: torch.tanh(w32 @ h + x32), torch.zeros(8), 200, "neumann", 60)
    c = torch.randn(8)  # any loss works; compare with the float64 run of the same loss
    (c * h).sum().backward()
    for q in p.params:
        q.grad = None
    h64 = rbp.fixed_point(p.f, p.h0.clone(), 200, "neumann", 60)
    (c.double() * h64).sum().backward()
    assert torch.allclose(w32.grad.double(), p.params[0].grad, atol=1e-5)
    assert torch.allclose(x32.grad.double(), p.params[1].grad, atol=1e-5)
    assert want  # exact solve ran on the same problem


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", rbp.METHODS)
def test_cuda_matches_cpu(method):
    from dynamics import tanh_rnn

    p = tanh_rnn()
    cpu = method_gradients(p, method, steps=200, truncate=60)
    w = p.params[0].detach().cuda().requires_grad_()
    x = p.params[1].detach().cuda().requires_grad_()
    torch.manual_seed(0)
    h = rbp.fixed_point(
        lambda h: torch.tanh(w @ h + x), p.h0.cuda(), 200, method, 60
    )
    p.loss(h.cpu()).backward()
    assert torch.allclose(w.grad.cpu(), cpu[0], atol=1e-6)
    assert torch.allclose(x.grad.cpu(), cpu[1], atol=1e-6)
