"""Small float64 dynamics with known exact implicit gradients, shared by the core tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DT = torch.float64


@dataclass
class Problem:
    """``f(h)`` closing over ``params``; ``loss(h)``; a state size and a forward length."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    h0: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    steps: int  # enough forward steps to converge to round-off
    series: int  # enough backward iterations for the exact limit


def _loss_factory(n: int, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    c = torch.randn(n, dtype=DT, generator=gen)
    return lambda h: (c * h).sum() + 0.5 * (h**2).sum()


def tanh_rnn(n: int = 8, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, dtype=DT, generator=gen)
    w = (0.6 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(n, dtype=DT, generator=gen).requires_grad_()
    return Problem(
        "tanh_rnn",
        lambda h: torch.tanh(w @ h + x),
        [w, x],
        torch.zeros(n, dtype=DT),
        _loss_factory(n, gen),
        200,
        120,
    )


def gru(n: int = 6, m: int = 4, seed: int = 1) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(m, n).to(DT)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(0.5)
    x = torch.randn(1, m, dtype=DT, generator=gen).requires_grad_()
    return Problem(
        "gru",
        lambda h: cell(x, h.unsqueeze(0)).squeeze(0),
        [*cell.parameters(), x],
        torch.zeros(n, dtype=DT),
        _loss_factory(n, gen),
        400,
        300,
    )


def hopfield_clamped(n_obs: int = 4, n_free: int = 6, seed: int = 2) -> Problem:
    """``h <- mask*x + (1-mask)*(W_sym sigma(h/2))``: observed units clamped, W symmetric."""
    gen = torch.Generator().manual_seed(seed)
    n = n_obs + n_free
    w = (0.5 * torch.randn(n, n, dtype=DT, generator=gen)).requires_grad_()
    x = torch.cat([torch.rand(n_obs, dtype=DT, generator=gen), torch.zeros(n_free, dtype=DT)])
    x.requires_grad_()
    free = torch.cat([torch.zeros(n_obs, dtype=DT), torch.ones(n_free, dtype=DT)])

    def f(h: torch.Tensor) -> torch.Tensor:
        w_sym = (w + w.T) * (1 - torch.eye(n, dtype=DT))
        return (1 - free) * x + free * (w_sym @ torch.sigmoid(0.5 * h))

    return Problem("hopfield", f, [w, x], x.detach().clone(), _loss_factory(n, gen), 300, 200)


def slow(n: int = 6, seed: int = 3) -> Problem:
    """Affine map with symmetric A, spectral radius 0.98: series need ~1500 terms."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))
    eig = torch.linspace(-0.5, 0.98, n, dtype=DT)
    a = (q @ torch.diag(eig) @ q.T).requires_grad_()
    x = torch.randn(n, dtype=DT, generator=gen).requires_grad_()
    return Problem(
        "slow",
        lambda h: a @ h + x,
        [a, x],
        torch.zeros(n, dtype=DT),
        _loss_factory(n, gen),
        2500,
        2000,
    )


def non_normal(n: int = 6, seed: int = 4) -> Problem:
    """Spectral radius 0.6 but ||J||_2 > 1 (a large off-diagonal): transient growth."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.diag(torch.full((n,), 0.6, dtype=DT)) + torch.diag(
        torch.full((n - 1,), 1.5, dtype=DT), 1
    )
    a.requires_grad_()
    x = torch.randn(n, dtype=DT, generator=gen).requires_grad_()
    return Problem(
        "non_normal",
        lambda h: torch.tanh(a @ h) + x,
        [a, x],
        torch.zeros(n, dtype=DT),
        _loss_factory(n, gen),
        400,
        300,
    )


ALL = [tanh_rnn, gru, hopfield_clamped, slow, non_normal]


def converge(p: Problem) -> torch.Tensor:
    with torch.no_grad():
        h = p.h0.clone()
        for _ in range(p.steps * 2):
            h = p.f(h)
    return h


def exact_gradients(p: Problem) -> list[torch.Tensor]:
    """``z^T dF/dw`` with ``z = (I - J^T)^{-1} dL/dh*`` from a dense solve at the fixed point."""
    h_star = converge(p)
    jac = torch.autograd.functional.jacobian(p.f, h_star)
    hs = h_star.clone().requires_grad_()
    (g,) = torch.autograd.grad(p.loss(hs), hs)
    z = torch.linalg.solve(torch.eye(len(g), dtype=DT) - jac.T, g)
    out = p.f(h_star)
    return list(torch.autograd.grad(out, p.params, z, allow_unused=True, materialize_grads=True))


def method_gradients(p: Problem, method: str, **kwargs) -> list[torch.Tensor]:
    import rbp

    for q in p.params:
        q.grad = None
    h = rbp.fixed_point(p.f, p.h0.clone(), **kwargs, method=method)
    p.loss(h).backward()
    return [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in p.params]


def max_rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    den = max(y.abs().max().item() for y in b)
    return num / den
