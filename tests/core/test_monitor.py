"""rbp.ResidualMonitor and rbp.spectral_radius against direct computations and eigenvalues."""

from __future__ import annotations

import math

import pytest
import torch

import rbp

DT = torch.float64


def test_residual_traces_of_the_plain_iteration() -> None:
    g = torch.Generator().manual_seed(0)
    W = (0.4 * torch.randn(6, 6, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(3, 6, generator=g, dtype=DT)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    mon = rbp.ResidualMonitor(f)
    h0 = torch.zeros(3, 6, dtype=DT)
    rbp.fixed_point(mon, h0, steps=15, method="bptt")
    # the direct computation: ||h_{t+1} - h_t|| and that over ||h_{t+1}||
    h, abs_ref, rel_ref = h0, [], []
    with torch.no_grad():
        for _ in range(15):
            nxt = f(h)
            abs_ref.append((nxt - h).norm().item())
            rel_ref.append((nxt - h).norm().item() / nxt.norm().item())
            h = nxt
    assert mon.calls == 15
    assert mon.abs_trace == pytest.approx(abs_ref, rel=1e-12)
    assert mon.rel_trace == pytest.approx(rel_ref, rel=1e-12)
    mon.reset()
    assert mon.abs_trace == [] and mon.rel_trace == []
    # with a tolerance the last relative residual recorded is below it (Anderson, tuples)
    mon2 = rbp.ResidualMonitor(lambda s: (f(s[0]), 0.5 * s[1] + 1.0))
    rbp.fixed_point(mon2, (h0, torch.ones(2, dtype=DT)), steps=80, tol=1e-8, solver="anderson",
                    method="gmres", truncate=30)
    assert min(mon2.rel_trace) <= 1e-8 and mon2.abs_trace[0] > 1e-1
    with pytest.raises(TypeError, match="callable"):
        rbp.ResidualMonitor(3)


def test_spectral_radius_of_a_linear_map_and_at_a_fixed_point() -> None:
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
    eig = torch.tensor([0.8, -0.5, 0.4, 0.3, 0.2, 0.1, -0.1, 0.05], dtype=DT)
    A = Q @ torch.diag(eig) @ Q.T
    est = rbp.spectral_radius(lambda h: h @ A.T + 1.0, torch.zeros(2, 8, dtype=DT), iters=60)
    assert est.converged and abs(est.rho - 0.8) < 1e-3
    # tanh at its fixed point: J = D W per sample, rho = the largest |eigenvalue| of any sample
    W = (0.9 / 8**0.5 * torch.randn(8, 8, generator=g, dtype=DT)).requires_grad_()
    x = torch.randn(3, 8, generator=g, dtype=DT)
    f = lambda h: torch.tanh(h @ W.T + x)  # noqa: E731
    h = rbp.fixed_point(f, torch.zeros(3, 8, dtype=DT), steps=200).detach()
    exact = max(torch.linalg.eigvals(torch.diag(1 - h[i] ** 2) @ W.detach()).abs().max().item()
                for i in range(3))
    est = rbp.spectral_radius(f, h, iters=400)
    assert est.converged and abs(est.rho - exact) < 1e-2 * exact, (est, exact)
    assert W.grad is None  # no gradient reached the parameters


def test_spectral_radius_says_when_it_has_not_converged() -> None:
    # eigenvalues 0.9 and 0.89: too few products to separate them
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.linspace(0.9, 0.01, 20, dtype=DT) * torch.tensor(
        [(-1) ** i for i in range(20)], dtype=DT)) @ Q.T
    est = rbp.spectral_radius(lambda h: h @ A.T, torch.ones(20, dtype=DT), iters=6)
    assert not est.converged
    with pytest.raises(ValueError, match="iters"):
        rbp.spectral_radius(lambda h: h, torch.ones(2), iters=2)
    with pytest.raises(ValueError, match="does not depend on h"):
        rbp.spectral_radius(lambda h: torch.ones(2), torch.ones(2))


def test_spectral_radius_per_sample() -> None:
    g = torch.Generator().manual_seed(3)
    W = 0.9 / 8**0.5 * torch.randn(8, 8, generator=g, dtype=DT)
    x = 2 * torch.randn(4, 8, generator=g, dtype=DT)
    f = lambda h, x_: torch.tanh(h @ W.T + x_)  # noqa: E731
    h = rbp.fixed_point(f, torch.zeros(4, 8, dtype=DT), steps=300, inputs=(x,))
    exact = [torch.linalg.eigvals(torch.diag(1 - h[i] ** 2) @ W).abs().max().item()
             for i in range(4)]
    est = rbp.spectral_radius(f, h, iters=400, inputs=(x,), batch_dim=0)
    assert est.per_sample is not None and len(est.per_sample) == 4
    assert est.per_sample == pytest.approx(exact, rel=1e-2)
    assert est.rho == max(est.per_sample) and est.converged == all(est.per_sample_converged)
    # along dim 1, with a state of two leaves
    est_t = rbp.spectral_radius(lambda s, x_: (f(s[0].T, x_).T, 0.1 * s[1]),
                                (h.T.contiguous(), torch.zeros(3, 4, dtype=DT)), iters=400,
                                inputs=(x,), batch_dim=1)
    assert est_t.per_sample == pytest.approx(exact, rel=1e-2)
    with pytest.raises(ValueError, match="same number of samples"):
        rbp.spectral_radius(lambda s: (s[0], s[1]), (torch.ones(2, 3), torch.ones(4)),
                            batch_dim=0)


def test_spectral_radius_at_a_bad_state_or_under_inference_mode() -> None:
    """NaN in h: refused (not rho = inf, 'converged'); NaN products: not converged; inference
    mode: one clear error, while a state made there is measured outside it like any other."""
    A = torch.diag(torch.tensor([0.5, -0.25], dtype=DT))
    f = lambda h: h @ A.T + 1.0  # noqa: E731
    with pytest.raises(ValueError, match=r"h holds NaN or inf \(leaf 1\)"):
        rbp.spectral_radius(lambda s: (f(s[0]), s[1]),
                            (torch.zeros(2, dtype=DT), torch.tensor([0.0, float("inf")])))
    est = rbp.spectral_radius(lambda h: f(h) * float("nan"), torch.zeros(2, dtype=DT))
    assert math.isnan(est.rho) and not est.converged
    with torch.inference_mode():
        h = torch.zeros(3, 2, dtype=DT)
        with pytest.raises(RuntimeError, match="inference_mode"):
            rbp.spectral_radius(f, h)
    assert abs(rbp.spectral_radius(f, h, iters=60).rho - 0.5) < 1e-6
    with torch.no_grad():
        assert abs(rbp.spectral_radius(f, h, iters=60).rho - 0.5) < 1e-6
