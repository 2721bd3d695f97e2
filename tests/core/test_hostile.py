"""Hostile use of the core (issue 22): each test reproduces a case that was silently wrong or
crashed deep inside, checked against an exact reference (BPTT, dense float64 solves)."""

from __future__ import annotations

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
    "trace": {"trace": True},
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
        want = rbp.fixed_point(f, h0, 200, tol=1e-2, settle_tol=None)
        got = rbp.fixed_point(f, h0, 200, tol=1e-2, solver=solver, settle_tol=None)
    assert got.dtype == torch.float32
    assert (got - want).norm() <= 5e-2 * want.norm()
    got.sum().backward()
    assert torch.isfinite(w.grad).all()


# ------------------------------------------------------------------ 3. Broyden meets a NaN


@pytest.mark.parametrize("memory", [1, 2, 4])
def test_broyden_non_finite_iterate_is_a_divergence_error(memory):
    with pytest.raises(rbp.DivergenceError, match="not finite"):
        rbp.fixed_point(lambda h: 3 * torch.sqrt(h) - 4, torch.linspace(0.5, 2, 5, dtype=DT),
                        40, tol=1e-9, solver=rbp.Broyden(memory=memory), check_every=10)
