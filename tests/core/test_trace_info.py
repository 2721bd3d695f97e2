"""``trace=True`` puts the forward's absolute and relative residual traces in the info, on every
forward path (the paper's unroll, a solve to a tolerance, bptt to a tolerance)."""

from __future__ import annotations

import pytest
import torch

import rbp

DT = torch.float64


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    w = 0.4 * torch.randn(6, 6, generator=gen, dtype=DT) / 6**0.5
    x = torch.randn(3, 6, generator=gen, dtype=DT)
    return w.requires_grad_(), x


def _plain_iterates(f, h0: torch.Tensor, n: int) -> list[torch.Tensor]:
    hs = [h0]
    with torch.no_grad():
        for _ in range(n):
            hs.append(f(hs[-1]))
    return hs


@pytest.mark.parametrize("method, kwargs", [
    ("neumann", {}),                                   # the paper's unroll
    ("neumann", {"tol": 1e-8}),                        # a solve to a tolerance (plain steps)
    ("bptt", {"tol": 1e-8}),                           # bptt to a tolerance
])
def test_relative_trace_is_the_trace_over_the_state_norm(method: str, kwargs: dict) -> None:
    w, x = _problem()
    f = lambda h: torch.tanh(h @ w.T + x)  # noqa: E731
    h0 = torch.zeros(3, 6, dtype=DT)
    _, info = rbp.fixed_point(
        f, h0, 40, method, 5, checks=rbp.Checks(trace=True), return_info=True, **kwargs,
    )
    hs = _plain_iterates(f, h0, 41)
    n = len(info.forward_trace)
    assert n >= 5 and len(info.relative_forward_trace) == n
    for t in range(n):  # entry t: ||h_{t+1} - h_t||, divided by ||h_{t+1}||
        d = (hs[t + 1] - hs[t]).norm().item()
        assert info.forward_trace[t] == pytest.approx(d, rel=1e-9, abs=1e-15)
        assert info.relative_forward_trace[t] == pytest.approx(d / hs[t + 1].norm().item(),
                                                               rel=1e-9, abs=1e-15)


def test_solver_traces_with_anderson_are_residuals_over_the_image() -> None:
    """For an accelerated solver each entry is ||F(x_k) - x_k|| / ||F(x_k)||: the relative
    trace ends at or below the tolerance it stopped at, and is empty without trace."""
    w, x = _problem()
    f = lambda h: torch.tanh(h @ w.T + x)  # noqa: E731
    h0 = torch.zeros(3, 6, dtype=DT)
    _, info = rbp.fixed_point(
        f, h0, 60, "gmres", 12, tol=1e-10, solver="anderson", checks=rbp.Checks(trace=True),
        return_info=True,
    )
    rel = info.relative_forward_trace
    assert len(rel) == len(info.forward_trace) >= 2
    assert rel[-1] <= 1e-10 < rel[0]
    _, quiet = rbp.fixed_point(f, h0, 60, "gmres", 12, tol=1e-10, solver="anderson",
                               return_info=True)
    assert quiet.forward_trace == [] and quiet.relative_forward_trace == []
