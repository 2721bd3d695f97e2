"""Continuous Hopfield network of Sec. 5.1 (Eq. 18) as a recurrence for :func:`rbp.fixed_point`.

Neurons are split into observed (clamped to the input pixels ``x``), hidden and output ones.
With weights ``W_eff = (W + W^T)`` masked to a zero diagonal, one Euler step (step size ``a``)
of Eq. 18 on the free (hidden + output) neurons reads

    h_new = (1 - a) h + W_ff sigma(b h) + W_fo sigma(b x),

where ``W_ff`` / ``W_fo`` are the free-free / free-observed blocks of ``W_eff`` and the free
neurons get no external input (``I = 0``). Observed neurons stay clamped at ``h_obs = x``, so
only the free rows of ``W_eff`` are ever needed: the state handed to the solver is the free part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

import rbp

OutputMode = Literal["state", "sigmoid"]

__all__ = [
    "Hopfield",
    "OutputMode",
    "binarize",
    "corrupt",
    "full_update",
    "hopfield_jacobian",
]


class Hopfield(nn.Module):
    """Continuous Hopfield network with ``n_visible`` observed, ``n_hidden`` hidden and
    ``n_output`` output neurons; ``W`` (N x N, N the total) is learnable, init N(0, init_std^2).
    """

    def __init__(
        self,
        n_visible: int = 784,
        n_hidden: int = 1024,
        n_output: int = 784,
        *,
        a: float = 1.0,
        b: float = 0.5,
        init_std: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if min(n_visible, n_output) < 1 or n_hidden < 0:
            raise ValueError("need n_visible >= 1, n_output >= 1 and n_hidden >= 0")
        self.n_visible, self.n_hidden, self.n_output = n_visible, n_hidden, n_output
        self.n = n_visible + n_hidden + n_output
        self.a, self.b = float(a), float(b)
        w = torch.empty(self.n, self.n)
        w.normal_(0.0, init_std, generator=generator)
        self.W = nn.Parameter(w)

    @property
    def n_free(self) -> int:
        """Number of non-clamped (hidden + output) neurons."""
        return self.n - self.n_visible

    def effective_weight(self) -> torch.Tensor:
        """``W_eff = (W + W^T)`` with a zero diagonal: symmetric, no self-connections."""
        w = self.W + self.W.T
        return w - torch.diag_embed(torch.diagonal(w))

    def free_rows(self) -> torch.Tensor:
        """The free rows ``W_eff[free, :]`` (``n_free x N``), computed without the clamped rows.

        Row ``i`` of ``W_eff`` is ``W[i, :] + W[:, i]`` with entry ``i`` zeroed.
        """
        return _FreeRows.apply(self.W, self.n_visible)

    def update(
        self, x: torch.Tensor, w_rows: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map ``h -> (1-a) h + W_ff sigma(b h) + W_fo sigma(b x)`` on the free state.

        ``x`` is the clamped observed state, shape ``(n_visible,)`` or ``(B, n_visible)``;
        ``w_rows`` the free rows of ``W_eff`` (computed once per pass; default: now).
        """
        if w_rows is None:
            w_rows = self.free_rows()
        v, a, b = self.n_visible, self.a, self.b
        w_ff = w_rows[:, v:]
        drive = torch.sigmoid(b * x) @ w_rows[:, :v].T  # input from the clamped neurons

        if a == 1.0:
            def f(h: torch.Tensor) -> torch.Tensor:
                return torch.addmm(drive, torch.sigmoid(b * h), w_ff.T) if h.dim() == 2 \
                    else torch.addmv(drive, w_ff, torch.sigmoid(b * h))
        else:
            def f(h: torch.Tensor) -> torch.Tensor:
                return (1.0 - a) * h + torch.sigmoid(b * h) @ w_ff.T + drive

        return f

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """Free part of the input padded with zeros: all zeros."""
        return x.new_zeros((*x.shape[:-1], self.n_free))

    def output(self, h_free: torch.Tensor, mode: OutputMode = "state") -> torch.Tensor:
        """Output neurons read from the free state: the raw state or ``sigma(b h)``."""
        h_out = h_free[..., self.n_hidden:]
        if mode == "state":
            return h_out
        if mode == "sigmoid":
            return torch.sigmoid(self.b * h_out)
        raise ValueError(f"unknown output mode {mode!r}; use 'state' or 'sigmoid'")

    def forward(
        self,
        x: torch.Tensor,
        steps: int = 50,
        method: str = "bptt",
        truncate: int = 20,
        output: OutputMode = "state",
        **fixed_point_kwargs: object,
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """One inference pass of ``steps`` updates from the zero-padded input; returns the
        output neurons and the solver's :class:`rbp.FixedPointInfo`."""
        f = self.update(x, self.free_rows())
        h, info = rbp.fixed_point(
            f, self.initial_state(x), steps, method, truncate, return_info=True,
            **fixed_point_kwargs,  # type: ignore[arg-type]
        )
        return self.output(h, output), info


class _FreeRows(torch.autograd.Function):
    """``R = W[v:, :] + W[:, v:]^T`` with ``R[i, v + i] = 0``; backward
    ``dW[v:, :] += G``, ``dW[:, v:] += G^T``, zero diagonal (contiguous transposes: an order of
    magnitude faster on CPU than autograd's strided ``W + W.T``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, v: int) -> torch.Tensor:
        rows = w[v:, :] + w[:, v:].T.contiguous()
        rows[:, v:].diagonal().zero_()
        ctx.v = v  # type: ignore[attr-defined]
        return rows

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        v: int = ctx.v  # type: ignore[attr-defined]
        n = grad.shape[1]
        gw = grad.new_zeros(n, n)
        gw[v:, :] = grad
        gw[:, v:] += grad.T.contiguous()
        gw.diagonal().zero_()
        return gw, None


def full_update(model: Hopfield, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference step on the whole N-neuron state: ``(1-a) h + W_eff sigma(b h) + I``, then
    the observed neurons are clamped to ``x`` (``I = 0`` on the free neurons)."""
    w_eff = model.effective_weight()
    new = (1.0 - model.a) * h + torch.sigmoid(model.b * h) @ w_eff.T
    return torch.cat([x.expand(*new.shape[:-1], -1), new[..., model.n_visible:]], dim=-1)


def hopfield_jacobian(model: Hopfield, h_free: torch.Tensor) -> torch.Tensor:
    """Analytic Jacobian of the free-state map at ``h_free`` (1-D):
    ``J = (1-a) I + W_ff diag(b sigma'(b h))`` with ``sigma' = sigma (1 - sigma)``."""
    w_ff = model.free_rows()[:, model.n_visible:]
    s = torch.sigmoid(model.b * h_free)
    eye = torch.eye(model.n_free, dtype=h_free.dtype)
    return (1.0 - model.a) * eye + w_ff * (model.b * s * (1.0 - s))


def binarize(images: torch.Tensor) -> torch.Tensor:
    """Pixels ``> 0`` become 1.0, others 0.0."""
    return (images > 0).to(torch.float32)


def corrupt(images: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Zero ``round(fraction * n)`` (halves rounded up) randomly chosen non-zero pixels of each
    image (``n`` its non-zero count); reproducible from ``seed``. Works on ``(B, D)``."""
    gen = torch.Generator().manual_seed(seed)
    out = images.clone()
    for row in out:
        nz = torch.nonzero(row, as_tuple=False).squeeze(1)
        k = math.floor(fraction * nz.numel() + 0.5)
        drop = nz[torch.randperm(nz.numel(), generator=gen)[:k]]
        row[drop] = 0.0
    return out
