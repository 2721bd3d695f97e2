"""A panel of backward problems with dense float64 references, for the error-estimate tests.

Every map is ``F(h) = G(h) + u`` with ``u = 0`` requiring grad, so ``u.grad`` is the adjoint
``z`` itself: the test compares it with ``z* = (I - J^T)^{-1} g`` from a dense solve at the same
state, and the parameter gradient with ``z*^T dF/dw``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import rbp

DT = torch.float64


@dataclass
class Case:
    name: str
    g: Callable[[torch.Tensor], torch.Tensor]  # G(h); F(h) = G(h) + u
    params: list[torch.Tensor]
    n: int
    steps: int
    loss_vec: torch.Tensor  # loss = loss_vec . h + 0.5 |h|^2 * quad
    quad: float = 0.0


def _orth(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q


def symmetric_tanh(n: int = 200, rho: float = 0.97, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    q = _orth(n, gen)
    eig = torch.linspace(-rho, rho, n, dtype=DT)
    w = (q * eig) @ q.T
    w = ((w + w.T) / 2).requires_grad_()
    x = 0.05 * torch.randn(n, generator=gen, dtype=DT)
    return Case("symmetric_tanh", lambda h: torch.tanh(w @ h + x), [w], n, 3000,
                torch.randn(n, generator=gen, dtype=DT))


def two_time_scales(seed: int = 0, slow_share: float = 0.02) -> Case:
    """Twenty modes at 0.5 and one at 0.99; the slow one carries ``slow_share`` of g."""
    gen = torch.Generator().manual_seed(seed)
    n = 21
    q = _orth(n, gen)
    lam = torch.full((n,), 0.5, dtype=DT)
    lam[0] = 0.99
    a = ((q * lam) @ q.T).requires_grad_()  # symmetric: J^T = J
    fast = torch.randn(n, generator=gen, dtype=DT)
    fast = fast - (fast @ q[:, 0]) * q[:, 0]
    gvec = (1 - slow_share) * fast / fast.norm() + slow_share * q[:, 0]
    c = torch.randn(n, generator=gen, dtype=DT)
    return Case("two_time_scales", lambda h: a @ h + c, [a], n, 6000, gvec)


def non_normal(n: int = 30, off: float = 0.3, seed: int = 0) -> Case:
    """Upper triangular J with eigenvalues in [0.5, 0.9] and an off-diagonal part of size off."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.triu(off * torch.randn(n, n, generator=gen, dtype=DT), 1)
    t = t + torch.diag(torch.linspace(0.5, 0.9, n, dtype=DT))
    a = t.requires_grad_()
    c = torch.randn(n, generator=gen, dtype=DT)
    return Case("non_normal", lambda h: a @ h + c, [a], n, 4000,
                torch.randn(n, generator=gen, dtype=DT))


def gru(n: int = 32, scale: float = 1.6, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(n, n).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(scale)
    x = torch.randn(1, n, generator=gen, dtype=DT)
    params = list(cell.parameters())
    return Case("gru", lambda h: cell(x, h[None])[0], params, n, 4000,
                torch.randn(n, generator=gen, dtype=DT), quad=1.0)


def hopfield(n: int = 64, beta: float = 3.0, seed: int = 0) -> Case:
    """A continuous Hopfield update ``h <- tanh(beta W h + x)`` with a Hebbian W."""
    gen = torch.Generator().manual_seed(seed)
    pats = torch.sign(torch.randn(3, n, generator=gen, dtype=DT))
    w = (pats.T @ pats / n / beta * 0.9).requires_grad_()
    x = 0.1 * torch.randn(n, generator=gen, dtype=DT)
    return Case("hopfield", lambda h: torch.tanh(beta * (w @ h) + x), [w], n, 4000,
                torch.randn(n, generator=gen, dtype=DT))


PANEL = {
    "symmetric_tanh": lambda: symmetric_tanh(rho=1.0),  # rho(J) = 0.95 at the fixed point
    "two_time_scales": lambda: two_time_scales(slow_share=0.005),
    "two_time_scales_hidden": lambda: two_time_scales(slow_share=0.0005),
    "non_normal": lambda: non_normal(off=0.1),
    "non_normal_strong": non_normal,
    "gru": gru,
    "hopfield": hopfield,
}


@dataclass
class Outcome:
    case: str
    method: str
    truncate: int
    z_error: float  # ||z_K - z*|| / ||z*||
    grad_error: float  # ||grad_K - grad*|| / ||grad*||
    estimate: float | None
    reported: bool
    rho: float


def run(case: Case, method: str, truncate: int, **options) -> Outcome:
    u = torch.zeros(case.n, dtype=DT, requires_grad=True)

    def f(h):
        return case.g(h) + u

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, info = rbp.fixed_point(f, torch.zeros(case.n, dtype=DT), case.steps, method,
                                  truncate, return_info=True, **options)
        loss = case.loss_vec @ h + 0.5 * case.quad * (h * h).sum()
        grads = torch.autograd.grad(loss, [u, *case.params])
    reported = any(issubclass(w.category, rbp.ConvergenceWarning) for w in caught)
    z = grads[0]
    # the dense reference at the same state
    hs = h.detach()
    jac = torch.autograd.functional.jacobian(lambda v: case.g(v), hs)
    gl = case.loss_vec + case.quad * hs
    zs = torch.linalg.solve(torch.eye(case.n, dtype=DT) - jac.T, gl)
    hr = hs.clone().requires_grad_()
    ref = torch.autograd.grad(case.g(hr), case.params, zs, allow_unused=True)
    num = sum(((a - b) ** 2).sum() for a, b in zip(grads[1:], ref, strict=True) if b is not None)
    den = sum((b**2).sum() for b in ref if b is not None)
    rho = torch.linalg.eigvals(jac).abs().max().item()
    return Outcome(case.name, method, truncate, ((z - zs).norm() / zs.norm()).item(),
                   math.sqrt(num / den), info.backward[-1].error_estimate, reported, rho)
