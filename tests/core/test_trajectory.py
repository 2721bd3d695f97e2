"""rbp.sample_trajectory and rbp.correction_loss against BPTT, TBPTT and a dense solve."""

from __future__ import annotations

import pytest
import torch

import rbp

DT = torch.float64
N = 5


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = (0.6 / N**0.5 * torch.randn(N, N, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(2, N, generator=g, dtype=DT).requires_grad_()
    c = torch.randn(2, N, generator=g, dtype=DT)
    return W, x, c


def _grads(h, c, W, x):
    return torch.autograd.grad((c * h).sum(), (W, x))


def test_damping_one_is_bptt_and_tbptt() -> None:
    W, x, c = _problem()
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h0 = 0.1 * torch.ones(2, N, dtype=DT)
    # from h_0 with k = T steps: BPTT of T steps, value and gradient
    (z,) = rbp.sample_trajectory(f, h0, steps=12, indices=[0], k=12, damping=1.0)
    ref = rbp.fixed_point(f, h0, steps=12, method="bptt")
    assert torch.equal(z, ref)
    for a, b in zip(_grads(z, c, W, x), _grads(ref, c, W, x), strict=True):
        assert torch.allclose(a, b, atol=1e-14)
    # from h_i with k steps: h_{i+k}, truncated BPTT of the last k steps
    states = rbp.sample_trajectory(f, h0, steps=9, indices=[3, 7, -1], k=3, damping=1.0)
    for i, z in zip([3, 7, 9], states, strict=True):
        ref = rbp.fixed_point(f, h0, steps=i + 3, method="tbptt", truncate=3)
        assert torch.allclose(z, ref, atol=1e-14)
        for a, b in zip(_grads(z, c, W, x), _grads(ref, c, W, x), strict=True):
            assert torch.allclose(a, b, atol=1e-13)


def test_damped_steps_from_the_detached_iterate() -> None:
    W, x, c = _problem(1)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    (z,) = rbp.sample_trajectory(f, torch.zeros(2, N, dtype=DT), steps=6, indices=[4], k=2,
                                 damping=0.3)
    h = torch.zeros(2, N, dtype=DT)
    with torch.no_grad():
        for _ in range(4):
            h = f(h)
    for _ in range(2):  # the direct computation
        h = 0.3 * f(h) + 0.7 * h
    assert torch.allclose(z, h, atol=1e-15)
    for a, b in zip(_grads(z, c, W, x), _grads(h, c, W, x), strict=True):
        assert torch.allclose(a, b, atol=1e-15)


def test_many_damped_steps_at_the_fixed_point_give_the_implicit_gradient() -> None:
    W, x, c = _problem(2)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    (z,) = rbp.sample_trajectory(f, torch.zeros(2, N, dtype=DT), steps=200, indices=[-1], k=150,
                                 damping=0.5)
    gW, gx = _grads(z, c, W, x)
    h = z.detach()
    for i in range(2):  # dense: dL/dx_i = D (I - W^T D)^-1 ... = D u, u = (I - D W)^-T c
        D = torch.diag(1 - h[i] ** 2)
        u = torch.linalg.solve((torch.eye(N, dtype=DT) - D @ W.detach()).T, c[i])
        assert torch.allclose(gx[i], D @ u, atol=1e-10)


def test_tuple_states_and_inputs() -> None:
    W, x, c = _problem(3)
    f = lambda s, x_: (torch.tanh(s[1] @ W.T + x_), 0.5 * s[0])  # noqa: E731
    s0 = (torch.zeros(2, N, dtype=DT), torch.zeros(2, N, dtype=DT))
    states = rbp.sample_trajectory(f, s0, steps=5, indices=[5, 2], k=1, damping=1.0,
                                   inputs=(x,))
    ref = rbp.fixed_point(f, s0, steps=6, method="bptt", inputs=(x,))
    assert isinstance(states[0], tuple) and torch.allclose(states[0][0], ref[0])
    assert states[1][0].requires_grad


def test_correction_loss_weights() -> None:
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    assert rbp.correction_loss(losses, gamma=0.5).item() == 0.25 * 1 + 0.5 * 2 + 4
    W, x, c = _problem(4)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    states = rbp.sample_trajectory(f, torch.zeros(2, N, dtype=DT), steps=8, indices=[2, 5, 8])
    total = rbp.correction_loss([(c * s).sum() for s in states], gamma=0.8)
    g = torch.autograd.grad(total, W, retain_graph=True)[0]
    parts = [torch.autograd.grad((c * s).sum(), W, retain_graph=True)[0] for s in states]
    assert torch.allclose(g, 0.64 * parts[0] + 0.8 * parts[1] + parts[2], atol=1e-14)


def test_bad_input() -> None:
    f = lambda h: h * 0.5  # noqa: E731
    h0 = torch.zeros(3)
    with pytest.raises(ValueError, match=r"index 11 is out of range.*h_0 \.\. h_10"):
        rbp.sample_trajectory(f, h0, steps=10, indices=[2, 11])
    with pytest.raises(ValueError, match="out of range"):
        rbp.sample_trajectory(f, h0, steps=10, indices=[-12])
    for bad in ([], 3, [1.5]):
        with pytest.raises(ValueError, match="indices"):
            rbp.sample_trajectory(f, h0, steps=10, indices=bad)
    with pytest.raises(ValueError, match="k must"):
        rbp.sample_trajectory(f, h0, steps=10, indices=[1], k=0)
    with pytest.raises(ValueError, match="damping"):
        rbp.sample_trajectory(f, h0, steps=10, indices=[1], damping=0)
    with pytest.raises(ValueError, match="gamma"):
        rbp.correction_loss([torch.tensor(1.0)], gamma=1.5)
    with pytest.raises(ValueError, match="scalar"):
        rbp.correction_loss([torch.ones(2)])
    with pytest.raises(ValueError, match="non-empty"):
        rbp.correction_loss([])


def test_implicit_gradient_at_each_iterate() -> None:
    W, x, c = _problem(5)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h0 = torch.zeros(2, N, dtype=DT)
    states = rbp.sample_trajectory(f, h0, steps=8, indices=[3, 8], method="gmres",
                                   truncate=2 * N)  # GMRES on the whole batch: exact in 2N
    h = h0
    with torch.no_grad():
        iterates = [h]
        for _ in range(9):
            h = f(h)
            iterates.append(h)
    for i, z in zip([3, 8], states, strict=True):
        assert torch.allclose(z, iterates[i + 1], atol=1e-15)  # F(h_i)
        gx = torch.autograd.grad((c * z).sum(), x)[0]
        for b in range(2):  # dense: D (I - D W)^-T c with D = diag(1 - F(h_i)^2), J at h_i
            D = torch.diag(1 - iterates[i + 1][b] ** 2)
            u = torch.linalg.solve((torch.eye(N, dtype=DT) - D @ W.detach()).T, c[b])
            assert torch.allclose(gx[b], D @ u, atol=1e-10)


def test_options_that_do_not_apply_are_refused_and_no_grad_is_honoured():
    """With an implicit method, k and damping do not apply (refused, not ignored); bptt and
    tbptt have no gradient at one iterate (refused); under no_grad no graph is built."""
    torch.manual_seed(0)
    w = (0.2 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    f = lambda h: torch.tanh(h @ w.T + 1.0)  # noqa: E731
    h0 = torch.zeros(2, 4, dtype=torch.float64)
    for extra in ({"k": 3}, {"damping": 0.3}, {"k": 1, "damping": 0.5}):
        with pytest.raises(ValueError, match="configure the phantom gradient"):
            rbp.sample_trajectory(f, h0, 5, [3], method="gmres", **extra)
    for method in ("bptt", "tbptt", rbp.BPTT(), rbp.TBPTT(2)):
        with pytest.raises(ValueError, match="no gradient at one sampled iterate"):
            rbp.sample_trajectory(f, h0, 5, [3], method=method)
    with torch.no_grad():
        (a,) = rbp.sample_trajectory(f, h0, 5, [3], k=2)
    assert not a.requires_grad
    (b,) = rbp.sample_trajectory(f, h0, 5, [3], k=2)
    assert b.requires_grad and torch.equal(a, b.detach())
