"""rbp.jacobian_penalty: Hutchinson estimate of ||dF/dh||_F^2."""

from __future__ import annotations

import pytest
import torch
from dynamics import DT, non_normal, tanh_rnn

import rbp


def _exact_frobenius2(f, h):
    return torch.autograd.functional.jacobian(f, h, create_graph=True).pow(2).sum()


@pytest.mark.parametrize("make", [tanh_rnn, non_normal])
def test_mean_over_many_probes_matches_the_exact_norm(make):
    p = make()
    h = torch.randn(p.h0.shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    exact = _exact_frobenius2(p.f, h).item()
    gen = torch.Generator().manual_seed(1)
    est = rbp.jacobian_penalty(p.f, h, probes=4000, generator=gen, create_graph=False).item()
    assert est == pytest.approx(exact, rel=0.05)


def test_penalty_is_differentiable_in_the_parameters():
    """E[grad of the estimate] = grad of ||J||_F^2: compare the mean over probes."""
    p = tanh_rnn(n=5)
    w = p.params[0]
    h = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(2))
    (want,) = torch.autograd.grad(_exact_frobenius2(p.f, h), w)
    penalty = rbp.jacobian_penalty(p.f, h, probes=4000, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad(penalty, w)
    assert ((got - want).norm() / want.norm()).item() <= 0.1


def test_pytree_state_and_spectral_radius():
    w = torch.diag(torch.tensor([0.5, -0.8, 0.3], dtype=DT)).requires_grad_()

    def f(s):
        return {"a": w[:2] @ torch.cat([s["a"], s["b"]]), "b": w[2:] @ torch.cat([s["a"], s["b"]])}

    s = {"a": torch.ones(2, dtype=DT), "b": torch.ones(1, dtype=DT)}
    penalty, rho = rbp.jacobian_penalty(
        f,
        s,
        probes=2000,
        generator=torch.Generator().manual_seed(4),
        spectral_radius=True,
        radius_iters=300,
    )
    assert penalty.item() == pytest.approx(0.25 + 0.64 + 0.09, rel=0.1)
    assert rho == pytest.approx(0.8, rel=1e-2)


def test_bad_arguments():
    p = tanh_rnn()
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        rbp.jacobian_penalty(p.f, p.h0, probes=0)
    with pytest.raises(TypeError, match="f must be callable"):
        rbp.jacobian_penalty("f", p.h0)
    with pytest.raises(ValueError, match="does not depend"):
        rbp.jacobian_penalty(lambda h: torch.zeros_like(h).detach(), p.h0)


def test_inference_mode_is_one_clear_error_and_its_states_are_measured_outside():
    p = tanh_rnn(n=4)
    with torch.inference_mode():
        h = torch.zeros(4, dtype=DT)
        with pytest.raises(RuntimeError, match=r"inference_mode\(\) forbids"):
            rbp.jacobian_penalty(p.f, h)
    est = rbp.jacobian_penalty(p.f, h, probes=4000, generator=torch.Generator().manual_seed(0),
                               create_graph=False).item()
    assert est == pytest.approx(_exact_frobenius2(p.f, h.clone()).item(), rel=0.05)
