"""rbp.spectral_norm / weight_norm / cached_norm against the direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rbp

DT = torch.float64
N = 6


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, N, generator=g, dtype=DT), torch.randn(3, N, generator=g, dtype=DT)


def _bptt_grads(W_of, leaves, x, c):
    """Gradient of sum(c * h*) in ``leaves`` by BPTT through 300 steps of tanh(h W^T + x)."""
    W = W_of(*leaves)
    h = torch.zeros_like(x)
    for _ in range(300):
        h = torch.tanh(h @ W.T + x)
    return torch.autograd.grad((c * h).sum(), leaves)


def test_spectral_norm_with_scale_once_per_solve() -> None:
    torch.manual_seed(0)
    cell = rbp.spectral_norm(nn.Linear(N, N, bias=False).double(), scale=0.8)
    sn, sc = cell.parametrizations.weight
    V = cell.parametrizations.weight.original
    v0 = sn._v.clone()
    x, c = _data()
    calls = []
    f = lambda h: calls.append(1) or torch.tanh(cell(h) + x)  # noqa: E731
    with rbp.cached_norm(cell):
        h = rbp.fixed_point(f, torch.zeros_like(x), steps=200, method="gmres", truncate=40)
        W_used = cell.weight
    (c * h).sum().backward()
    assert len(calls) >= 50
    # one power-iteration step for the whole solve, from (u0, v0)
    u1 = torch.nn.functional.normalize(V.detach() @ v0, dim=0)
    v1 = torch.nn.functional.normalize(V.detach().T @ u1, dim=0)
    assert torch.allclose(sn._u, u1, atol=1e-14) and torch.allclose(sn._v, v1, atol=1e-14)
    sigma = u1 @ V.detach() @ v1
    assert torch.allclose(W_used, 0.8 * V.detach() / sigma, atol=1e-14)
    assert abs(torch.linalg.matrix_norm(W_used, 2).item() - 0.8) < 0.05  # ||W||_2 ~ s
    # the gradient in V and s: the direct formula with u, v fixed, back-propagated by BPTT
    leaves = [V.detach().clone().requires_grad_(), torch.tensor(0.8, dtype=DT, requires_grad=True)]
    gV, gs = _bptt_grads(lambda V_, s_: s_ * V_ / (u1 @ V_ @ v1), leaves, x, c)
    assert torch.allclose(V.grad, gV, atol=1e-10)
    assert torch.allclose(sc.scale.grad, gs, atol=1e-10)


def test_without_the_cache_the_power_iteration_moves_every_call() -> None:
    """Why cached_norm: torch's spectral norm advances u, v at each access of the weight."""
    torch.manual_seed(1)
    cell = rbp.spectral_norm(nn.Linear(N, N, bias=False).double())
    sn = cell.parametrizations.weight[0]
    sn._u.normal_()  # a u far from converged
    us = []
    for _ in range(3):
        cell(torch.zeros(1, N, dtype=DT))
        us.append(sn._u.clone())
    assert not torch.allclose(us[0], us[1])
    with rbp.cached_norm(cell):
        for _ in range(3):
            cell(torch.zeros(1, N, dtype=DT))
        assert torch.equal(cell.weight, cell.weight)
    u_after = sn._u.clone()
    cell.eval()
    cell(torch.zeros(1, N, dtype=DT))
    assert torch.equal(sn._u, u_after)  # eval: no power iteration


def test_weight_norm_scale_and_gradient() -> None:
    torch.manual_seed(2)
    cell = rbp.weight_norm(nn.Linear(N, N).double(), scale=0.5)
    g = cell.parametrizations.weight.original0
    V = cell.parametrizations.weight.original1
    assert torch.allclose(cell.weight.norm(dim=1), torch.full((N,), 0.5, dtype=DT))
    x, c = _data(3)
    with rbp.cached_norm(cell):
        h = rbp.fixed_point(lambda h: torch.tanh(cell(h) + x), torch.zeros_like(x), steps=200,
                            method="gmres", truncate=40)
    (c * h).sum().backward()
    b = cell.bias.detach()
    leaves = [g.detach().clone().requires_grad_(), V.detach().clone().requires_grad_()]
    gg, gV = _bptt_grads(lambda g_, V_: g_ * V_ / V_.norm(dim=1, keepdim=True), leaves,
                         x + b, c)
    assert torch.allclose(g.grad, gg, atol=1e-10) and torch.allclose(V.grad, gV, atol=1e-10)
    frozen = rbp.weight_norm(nn.Linear(N, N), learn_scale=False)
    assert not frozen.parametrizations.weight.original0.requires_grad


def test_bad_input() -> None:
    cell = rbp.spectral_norm(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="already parametrised"):
        rbp.spectral_norm(cell)
    with pytest.raises(ValueError, match="already parametrised"):
        rbp.weight_norm(cell)
    with pytest.raises(ValueError, match="no tensor 'kernel'"):
        rbp.weight_norm(nn.Linear(3, 3), "kernel")
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale"):
            rbp.spectral_norm(nn.Linear(3, 3), scale=bad)
        with pytest.raises(ValueError, match="scale"):
            rbp.weight_norm(nn.Linear(3, 3), scale=bad)
    with pytest.raises(ValueError, match="n_power_iterations"):
        rbp.spectral_norm(nn.Linear(3, 3), n_power_iterations=0)
    with pytest.raises(TypeError, match="nn.Module"):
        rbp.weight_norm(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="pass the module"), rbp.cached_norm():
        pass
