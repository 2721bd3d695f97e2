"""The paper's Propositions 1 and 2, numerically, in float64."""

from __future__ import annotations

import pytest
import torch
from dynamics import DT, converge, gru, hopfield_clamped, method_gradients, tanh_rnn

import rbp


@pytest.mark.parametrize("make", [tanh_rnn, gru, hopfield_clamped])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_prop1_neumann_k_equals_tbptt_k_plus_1(make, k):
    """On a trajectory constant over its last K+1 states, Neumann(K) == TBPTT(K+1)."""
    p = make()
    h_star = converge(p)  # start at the fixed point: every state of the unroll equals h*
    p.h0 = h_star
    neumann = method_gradients(p, "neumann", steps=50, truncate=k)
    tbptt = method_gradients(p, "tbptt", steps=50, truncate=k + 1)
    rbp_zero = method_gradients(p, rbp.linear.RBP(max_iter=k + 1, init="zeros"), steps=50)
    for a, b, c in zip(neumann, tbptt, rbp_zero, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-13)


def test_prop1_differs_when_not_converged():
    """Off the fixed point the correspondence breaks: the test above can fail."""
    p = tanh_rnn()
    neumann = method_gradients(
        p, "neumann", steps=3, truncate=2, checks=rbp.Checks(settle_tol=None),
    )
    tbptt = method_gradients(p, "tbptt", steps=3, truncate=3)
    assert max((a - b).abs().max().item() for a, b in zip(neumann, tbptt, strict=True)) > 1e-6


def test_prop1_full_series_equals_bptt():
    p = tanh_rnn()
    p.h0 = converge(p)
    full = method_gradients(p, "neumann", steps=300, truncate=299)
    bptt = method_gradients(p, "bptt", steps=300, truncate=1)
    for a, b in zip(full, bptt, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", range(5))
def test_prop2_bound_holds(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 12
    j = torch.randn(n, n, dtype=DT, generator=gen)
    j = j / torch.linalg.eigvals(j).abs().max() * 0.9  # spectral radius 0.9, ||J|| may exceed 1
    eye = torch.eye(n, dtype=DT)
    inv = torch.linalg.inv(eye - j)
    inv_norm = torch.linalg.matrix_norm(inv, 2).item()
    j_norm = torch.linalg.matrix_norm(j, 2).item()
    partial, power = torch.zeros_like(j), eye.clone()
    for k in range(40):
        partial = partial + power
        power = power @ j
        err = torch.linalg.matrix_norm(partial - inv, 2).item()
        bound = rbp.diagnostics.neumann_error_bound(j_norm, inv_norm, k + 1)
        assert err <= bound * (1 + 1e-10)


def test_error_estimate_bounds_actual_error():
    """The Prop. 2 estimate from a power-iteration ||J|| bounds the true relative error of z."""
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 200, "neumann", 4, checks=rbp.Checks(estimate_error=True), return_info=True,
    )
    p.loss(h).backward()
    record = info.backward[0]
    h_star = converge(p)
    jac = torch.autograd.functional.jacobian(p.f, h_star)
    true_norm = torch.linalg.matrix_norm(jac, 2).item()
    assert record.jacobian_norm == pytest.approx(true_norm, rel=0.05)
    assert record.jacobian_norm <= true_norm * (1 + 1e-9)  # power iteration approaches from below
    hs = h_star.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.loss(hs), hs)
    z = torch.linalg.solve(torch.eye(len(g), dtype=DT) - jac.T, g)
    z_k, v = g.clone(), g.clone()
    for _ in range(4):
        v = jac.T @ v
        z_k += v
    actual = ((z_k - z).norm() / g.norm()).item()
    assert 0 < actual <= record.error_bound < 1
