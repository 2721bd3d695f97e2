"""rbp.VariationalDropout: one mask per solve, exact implicit gradient for that mask."""

from __future__ import annotations

import pytest
import torch

import rbp

DT = torch.float64


def _problem(seed: int = 0, b: int = 3, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    W = (0.5 / n**0.5 * torch.randn(n, n, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(b, n, generator=g, dtype=DT).requires_grad_()
    c = torch.randn(b, n, generator=g, dtype=DT)
    return W, x, c


def _exact(W, x, c, m, h):
    """Dense reference: h = tanh(W (m h) + x); dL/dx = D (I - D W M)^-T c, dL/dW = sum v (m h)^T."""
    gx = torch.zeros_like(x)
    gW = torch.zeros_like(W)
    for i in range(h.shape[0]):
        D = torch.diag(1 - h[i] ** 2)
        A = torch.eye(W.shape[0], dtype=DT) - D @ W @ torch.diag(m[i])
        u = torch.linalg.solve(A.T, c[i])
        v = D @ u
        gx[i] = v
        gW += torch.outer(v, m[i] * h[i])
    return gx, gW


def test_gradient_is_exact_for_the_drawn_mask() -> None:
    W, x, c = _problem()
    drop = rbp.VariationalDropout(0.4)
    torch.manual_seed(1)
    m = drop.reset(x)
    assert set(m.unique().tolist()) <= {0.0, 1 / 0.6} and (m == 0).any()
    f = lambda h: torch.tanh(drop(h) @ W.T + x)  # noqa: E731
    h = rbp.fixed_point(f, torch.zeros_like(x), steps=200, method="gmres", truncate=40)
    # f is deterministic within the solve: h is its fixed point
    assert torch.allclose(f(h.detach()), h.detach(), atol=1e-12)
    (h * c).sum().backward()
    gx, gW = _exact(W.detach(), x.detach(), c, m, h.detach())
    assert torch.allclose(x.grad, gx, atol=1e-10, rtol=1e-9)
    assert torch.allclose(W.grad, gW, atol=1e-10, rtol=1e-9)


def test_fixed_context_and_per_sample_solve_with_the_mask_as_input() -> None:
    W, x, c = _problem(seed=2)
    drop = rbp.VariationalDropout(0.3)
    torch.manual_seed(3)
    with drop.fixed(x) as m:
        f = lambda h, x_, m_: torch.tanh(drop(h, m_) @ W.T + x_)  # noqa: E731
        h = rbp.fixed_point(f, torch.zeros_like(x), steps=200, method="gmres", truncate=40,
                            tol=1e-12, batch_dim=0, inputs=(x, m))
    assert drop.mask is None  # the mask belongs to that solve
    (h * c).sum().backward()  # the graph holds the mask: backward after the block works
    gx, gW = _exact(W.detach(), x.detach(), c, m, h.detach())
    assert torch.allclose(x.grad, gx, atol=1e-9)
    assert torch.allclose(W.grad, gW, atol=1e-9)
    with pytest.raises(RuntimeError, match="call drop.reset"):
        drop(x)


def test_new_solve_new_mask_eval_identity_and_errors() -> None:
    drop = rbp.VariationalDropout(0.5)
    x = torch.randn(4, 50, dtype=DT)
    with pytest.raises(RuntimeError, match=r"reset\(h0\)"):
        drop(x)
    torch.manual_seed(0)
    m1 = drop.reset(x)
    assert torch.equal(drop(x), drop(x))  # the same map at every call
    m2 = drop.reset(x)
    assert not torch.equal(m1, m2)  # redrawn at the next solve
    assert abs(m1.mean().item() - 1.0) < 0.25  # E[m] = 1
    with pytest.raises(ValueError, match="shape"):
        drop(torch.randn(5, 50))
    with pytest.raises(TypeError, match="mask must be a tensor"):
        drop(x, 0.5)
    drop.eval()
    assert drop(x) is x
    drop.clear()
    assert drop(x) is x  # eval: identity, no mask needed
    assert torch.equal(drop.reset(x), torch.ones_like(x))
    for p in (-0.1, 1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="probability"):
            rbp.VariationalDropout(p)
    with pytest.raises(TypeError, match="floating"):
        rbp.VariationalDropout(0.1).reset(torch.zeros(3, dtype=torch.long))


def test_channel_form_shares_the_mask_over_space() -> None:
    drop = rbp.VariationalDropout2d(0.5)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    m = drop.reset(x)
    assert m.shape == (2, 8, 1, 1)
    y = drop(x)
    kept = (m[..., 0, 0] != 0)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert torch.allclose(y[kept], 2 * x[kept])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        drop.reset(torch.randn(2, 8))
