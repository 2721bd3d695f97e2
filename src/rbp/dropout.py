"""Variational (locked) dropout for the map ``F`` of a fixed point.

Ordinary dropout inside ``f`` draws a new mask at every call, so ``F`` changes from one
iteration to the next and there is no fixed point to differentiate. Variational dropout draws
**one** mask ``m`` per solve and uses it in every iteration and in the backward:
``F_m(h) = F(m * h)`` with ``m_j ~ Bernoulli(1 - p) / (1 - p)``, a fixed map whose implicit
gradient is exact. The mask is drawn by an explicit call (``reset(like)``, or ``with
drop.fixed(like):``) before the solve and redrawn at the next one; in eval mode the module is
the identity.

>>> drop = rbp.VariationalDropout(0.2)
>>> drop.reset(h0)                                 # one mask for this solve
>>> h = rbp.fixed_point(lambda h: torch.tanh(W @ drop(h) + x), h0, steps=30)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["VariationalDropout", "VariationalDropout2d"]


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per solve: ``drop(x) = m * x``, ``m`` fixed.

    ``m`` has the shape of the tensor given to :meth:`reset` (one entry per sample and
    feature), entries ``0`` with probability ``p`` and ``1 / (1 - p)`` otherwise, so
    ``E[m * x] = x``. Every call until the next :meth:`reset` uses the same ``m``, so the map
    ``F`` a fixed-point solve iterates is deterministic and its implicit gradient is the exact
    gradient for that mask. In eval mode (``drop.eval()``) or with ``p = 0`` it is the identity.

    Calling it in training mode before a mask was drawn raises a ``RuntimeError``: there is no
    mask that would make ``F`` the same map at every iteration.

    With ``fixed_point(..., batch_dim=0)`` the solver calls ``f`` on the not-yet-converged
    samples only; pass the mask as an input (``inputs=(drop.reset(h0),)`` and
    ``f(h, m) = ... drop(h, m) ...``) so that it is sliced with the state.

    Args:
        p: the probability of zeroing an entry, ``0 <= p < 1``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        ok = isinstance(p, numbers.Real) and not isinstance(p, (bool, np.bool_))
        if not ok or not math.isfinite(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self.mask: Tensor | None = None
        self._drawn_in_eval = False  # the stored mask is all ones: refused in training

    def mask_shape(self, like: Tensor) -> tuple[int, ...]:
        """The mask's shape for an input shaped as ``like`` (here: the same, elementwise)."""
        return tuple(like.shape)

    def reset(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a new mask for inputs shaped as ``like`` (dtype and device too); return it.

        Call it once per solve, before :func:`rbp.fixed_point`. In eval mode (or ``p = 0``)
        the mask is all ones.
        """
        if not isinstance(like, Tensor) or not like.is_floating_point():
            raise TypeError(
                f"reset(like) needs a floating tensor shaped as the dropout's input, got "
                f"{type(like).__name__ if not isinstance(like, Tensor) else like.dtype}"
            )
        shape = self.mask_shape(like)
        if not self.training or self.p == 0.0:
            mask = torch.ones(shape, dtype=like.dtype, device=like.device)
        else:
            keep = torch.rand(shape, generator=generator, device=like.device) >= self.p
            mask = keep.to(like.dtype) / (1.0 - self.p)
        self.mask = mask
        self._drawn_in_eval = not self.training
        return mask

    def clear(self) -> None:
        """Forget the mask (a later training-mode call raises until :meth:`reset`)."""
        self.mask = None

    @contextmanager
    def fixed(self, like: Tensor, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """``with drop.fixed(h0): h = rbp.fixed_point(...)``: one mask inside, none after.

        ``loss.backward()`` may run after the block: the solve's graph holds the mask.
        """
        mask = self.reset(like, generator)
        try:
            yield mask
        finally:
            self.mask = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``m * x`` with the mask drawn by :meth:`reset` (or the ``mask`` given)."""
        if not self.training or self.p == 0.0:
            return x
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor from reset(), got {type(mask).__name__}")
        m = self.mask if mask is None else mask
        if mask is None and m is not None and self._drawn_in_eval:
            raise RuntimeError(
                f"{type(self).__name__}: the stored mask was drawn in eval mode (all ones) and "
                "the module is now training: call drop.reset(h0) after drop.train()")
        if m is None:
            raise RuntimeError(
                f"{type(self).__name__} has no mask: call drop.reset(h0) (or use "
                "`with drop.fixed(h0):`) before the solve, so that every iteration of f uses "
                "the same mask; in eval mode (drop.eval()) it is the identity. A backward "
                "that runs f again (second_order=True, cg with jvp='func') must run inside "
                "the drop.fixed block"
            )
        if tuple(m.shape) != self.mask_shape(x):  # a mask for one sample does not broadcast
            raise ValueError(
                f"{type(self).__name__}: the mask has shape {tuple(m.shape)}, drawn for another "
                f"input than this one of shape {tuple(x.shape)}; call reset() with a tensor "
                "shaped as the dropout's input (with batch_dim, pass the mask as an input of "
                "rbp.fixed_point so it is sliced with the state; rbp.FixedPoint passes its "
                "cell x alone, so there stack the mask into x or call rbp.fixed_point)"
            )
        return x * m.to(dtype=x.dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VariationalDropout2d(VariationalDropout):
    """Channel form of :class:`VariationalDropout` for ``(N, C, H, W)`` (or ``(N, C, ...)``)
    inputs: one mask entry per sample and channel, shared over the spatial dims
    (``m`` of shape ``(N, C, 1, 1)``), fixed for the whole solve."""

    def mask_shape(self, like: Tensor) -> tuple[int, ...]:
        if like.dim() < 3:
            raise ValueError(
                f"VariationalDropout2d needs an input (N, C, H, W) or (N, C, L), got shape "
                f"{tuple(like.shape)}; use VariationalDropout for (N, features)"
            )
        return (*like.shape[:2], *(1 for _ in like.shape[2:]))
