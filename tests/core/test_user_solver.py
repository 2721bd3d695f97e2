"""A forward solver written against rbp.forward.protocol runs in fixed_point, per sample, with the
built-in solvers' guarantees: per-sample stopping, the best iterate, the stopping test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from dynamics import DT

import rbp


@dataclass(frozen=True)
class Momentum(rbp.forward.Stopping):
    """Picard with momentum (heavy ball): ``v <- beta v + (F(x) - x)``, ``x <- x + v``.

    Subclassing :class:`rbp.forward.Stopping` gives it the stopping options (``tol``,
    ``best_iterate``, ...); ``tol=`` works for any solver."""

    beta: float = 0.3
    name = "momentum"

    def init(self, x, max_evals=None):
        return _MomentumState(self.beta, x)


class _MomentumState:
    def __init__(self, beta, x):
        self.beta, self.v = beta, torch.zeros_like(x)

    def step(self, x, fx, g):
        self.v = self.beta * self.v + g
        return x + self.v, None

    def keep(self, rows):
        self.v = self.v[rows]


def _problem(b: int = 6, n: int = 5):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n, n, dtype=DT, generator=gen)
    w = (w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    rate = torch.linspace(0.1, 0.8, b, dtype=DT)  # each sample its own contraction
    u = torch.randn(b, n, dtype=DT, generator=gen)
    seen: list[int] = []

    def f(h, a, c):
        seen.append(h.shape[0])
        return a[:, None] * torch.tanh(h @ w.T) + c

    return f, w, (rate, u), torch.zeros(b, n, dtype=DT), seen


def test_user_solver_stops_each_sample_at_the_fixed_point_of_the_plain_solver():
    f, w, inputs, h0, seen = _problem()
    h, info = rbp.fixed_point(f, h0, 300, "neumann", tol=1e-11, batch_dim=0, inputs=inputs,
                              solver=Momentum(), return_info=True)
    assert info.solver == "momentum"
    assert all(info.tol_reached)
    steps = info.forward_steps
    assert len(set(steps)) > 2 and steps == sorted(steps)  # slower contraction, more steps
    assert min(seen) < h0.shape[0]  # stopped samples left the later calls of f
    (h * torch.arange(1.0, 6.0, dtype=DT)).sum().backward()
    got = w.grad.clone()
    w.grad = None
    ref = rbp.fixed_point(f, h0, 300, "neumann", tol=1e-13, batch_dim=0, inputs=inputs)
    (ref * torch.arange(1.0, 6.0, dtype=DT)).sum().backward()
    assert torch.allclose(h, ref, atol=1e-9)
    assert torch.allclose(got, w.grad, atol=1e-8)


def test_user_solver_returns_each_samples_best_iterate():
    f, _, inputs, h0, _ = _problem()
    solver = Momentum(beta=0.9)  # overshoots: the residual is not monotone
    with torch.no_grad():
        _, info = rbp.fixed_point(f, h0, 9, "neumann", tol=1e-14, batch_dim=0, inputs=inputs,
                                  solver=Momentum(beta=0.9, best_iterate=True),
                                  checks=rbp.Checks(on_failure="ignore"), return_info=True)
        x, state, lowest = h0, solver.init(h0), torch.full((h0.shape[0],), torch.inf, dtype=DT)
        for _ in range(9):  # the same iteration by hand
            fx = f(x, *inputs)
            lowest = torch.minimum(lowest, torch.linalg.vector_norm(fx - x, dim=1))
            x, _ = state.step(x, fx, fx - x)
    assert info.forward_steps == [9] * 6
    assert torch.allclose(torch.tensor(info.forward_residual, dtype=DT), lowest, rtol=1e-12)
    assert any(info.best_iterate)


def test_user_solver_is_refused_where_a_plain_iteration_is_needed():
    f, _, inputs, h0, _ = _problem()
    with pytest.raises(ValueError, match="not 'momentum'"):
        rbp.fixed_point(f, h0, 10, "bptt", solver=Momentum(), tol=1e-6, inputs=inputs)
    with pytest.raises(TypeError, match="unknown solver"):
        rbp.fixed_point(f, h0, 10, solver=Momentum, tol=1e-6, inputs=inputs)  # the class


def test_user_solver_in_the_module_face():
    cell = torch.nn.Linear(4, 4).double()
    layer = rbp.FixedPoint(lambda x, h: torch.tanh(0.5 * cell(h)) + x, 200, tol=1e-10,
                           solver=Momentum(), batch_dim=0)
    h = layer(torch.randn(3, 4, dtype=DT), torch.zeros(3, 4, dtype=DT))
    assert layer.last_info.solver == "momentum" and all(layer.last_info.tol_reached)
    h.sum().backward()
    assert cell.weight.grad is not None
