"""rbp.FixedPoint: the documented cell signature, options checked at construction."""

from __future__ import annotations

import pytest
import torch
from dynamics import DT

import rbp


class Cell(torch.nn.Module):
    """``cell(x, h) = tanh(W h + U x)``, written exactly as the README documents a cell."""

    def __init__(self, n: int = 5, m: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(n, n, bias=False).double()
        self.u = torch.nn.Linear(m, n).double()
        with torch.no_grad():
            self.w.weight.mul_(0.6 / torch.linalg.matrix_norm(self.w.weight, 2))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(h) + self.u(x))


def _dense_fixed_point(cell: Cell, x: torch.Tensor) -> torch.Tensor:
    """Newton on the flattened batch."""
    h = torch.zeros(x.shape[0], 5, dtype=DT)
    flat = lambda v: cell(x, v.reshape(h.shape)).reshape(-1)  # noqa: E731
    v = h.reshape(-1)
    for _ in range(30):
        jac = torch.autograd.functional.jacobian(flat, v)
        with torch.no_grad():
            v = v - torch.linalg.solve(jac - torch.eye(len(v), dtype=DT), flat(v) - v)
    return v.reshape(h.shape).detach()


@pytest.mark.parametrize(
    "options",
    [{}, {"tol": 1e-12, "solver": "anderson"}, {"tol": 1e-12, "batch_dim": 0, "solver": "broyden"}],
    ids=["unroll", "anderson", "per-sample"],
)
def test_documented_cell_gives_the_right_fixed_point_and_gradient(options):
    cell = Cell()
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    layer = rbp.FixedPoint(cell, steps=300, method="gmres", truncate=60, **options)
    h = layer(x, torch.zeros(4, 5, dtype=DT))
    assert torch.allclose(h.detach(), _dense_fixed_point(cell, x.detach()), atol=1e-11, rtol=0)
    h.square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    bptt = rbp.fixed_point(lambda h: cell(x, h), torch.zeros(4, 5, dtype=DT), 300, "bptt")
    bptt.square().sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-10)
    assert isinstance(layer.last_info, rbp.FixedPointInfo)
    if "batch_dim" in options:
        assert len(layer.last_info.forward_steps) == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "adjoint"}, ValueError, "unknown method 'adjoint'"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"tol": float("inf")}, ValueError, "tol must be positive and finite"),
        ({"solver": "newton"}, ValueError, "unknown solver 'newton'"),
        ({"return_info": True}, TypeError, "FixedPoint sets return_info itself"),
        ({"inputs": ()}, TypeError, "FixedPoint sets inputs itself"),
        ({"tolerance": 1e-3}, TypeError, "unexpected keyword argument 'tolerance'"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, match):
    args = {"steps": 10, **kwargs}
    with pytest.raises(error, match=match):
        rbp.FixedPoint(Cell(), **args)


def test_time_varying_cell_gets_the_step():
    seen = []

    class Tv(Cell):
        def forward(self, x, h, t):  # noqa: D102
            seen.append(t)
            return super().forward(x, h)

    layer = rbp.FixedPoint(Tv(), steps=6, method="bptt", time_varying=True)
    layer(torch.randn(2, 3, dtype=DT), torch.zeros(2, 5, dtype=DT))
    assert seen == list(range(6))


def test_repr_names_the_method():
    assert "method='cg'" in repr(rbp.FixedPoint(Cell(), 10, "cg", 5))
    with pytest.raises(TypeError, match="cell must be a module"):
        rbp.FixedPoint("cell", 10)


class DictCell(torch.nn.Module):
    """``cell(x, h)`` with ``x = {"u": input, "gate": per-sample scale}``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Cell()

    def forward(self, x: dict, h: torch.Tensor) -> torch.Tensor:
        return x["gate"] * self.inner(x["u"], h)


def test_per_sample_structured_input_is_sliced_with_the_samples():
    """A dict x with batch_dim: each leaf is sliced to the live samples; the gradient of every
    leaf equals BPTT's through the same fixed point (float64)."""
    cell = DictCell()
    u = torch.randn(5, 3, dtype=DT, requires_grad=True)
    gate = (0.5 + torch.rand(5, 1, dtype=DT)).requires_grad_()
    layer = rbp.FixedPoint(cell, steps=300, method="gmres", truncate=60, batch_dim=0,
                           solver="anderson", tol=1e-12)
    h = layer({"u": u, "gate": gate}, torch.zeros(5, 5, dtype=DT))
    h.square().sum().backward()
    got = u.grad.clone(), gate.grad.clone()
    u.grad = gate.grad = None
    bptt = rbp.fixed_point(lambda h: cell({"u": u, "gate": gate}, h),
                           torch.zeros(5, 5, dtype=DT), 300, "bptt")
    bptt.square().sum().backward()
    assert torch.allclose(got[0], u.grad, atol=1e-10)
    assert torch.allclose(got[1], gate.grad, atol=1e-10)
    assert len(set(layer.last_info.forward_steps)) > 1  # samples stopped on their own


def test_x_without_the_batch_with_batch_dim_is_refused():
    layer = rbp.FixedPoint(Cell(), 50, "gmres", 10, batch_dim=0, solver="anderson", tol=1e-6)
    with pytest.raises(TypeError, match="leaf 1 of x is a int"):
        layer((torch.randn(2, 3, dtype=DT), 3), torch.zeros(2, 5, dtype=DT))
    with pytest.raises(ValueError, match=r"^x of shape \(3, 3\) does not hold the 2 samples"):
        layer(torch.randn(3, 3, dtype=DT), torch.zeros(2, 5, dtype=DT))
    with pytest.raises(ValueError, match=r"^leaf 1 of x of shape \(3,\) does not hold the 2"):
        layer((torch.randn(2, 3, dtype=DT), torch.ones(3, dtype=DT)), torch.zeros(2, 5, dtype=DT))


def test_last_step_is_called_like_the_cell():
    """last_step(x, h) takes the last update: here a step that adds x's first column to h_T."""
    cell = Cell()
    x = torch.randn(4, 3, dtype=DT)
    plain = rbp.FixedPoint(cell, 80, "neumann", 20)(x, torch.zeros(4, 5, dtype=DT))
    layer = rbp.FixedPoint(cell, 80, "neumann", 20,
                           last_step=lambda x_, h: cell(x_, h) + x_[:, :1])
    h = layer(x, torch.zeros(4, 5, dtype=DT))
    assert torch.allclose(h, plain + x[:, :1], atol=1e-9)
    with pytest.raises(TypeError, match=r"last_step\(x, h\)"):
        rbp.FixedPoint(cell, 10, last_step=lambda h: h)
    with pytest.raises(TypeError, match="last_step must be callable"):
        rbp.FixedPoint(cell, 10, last_step=3)
