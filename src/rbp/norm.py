"""Weight and spectral normalisation of a DEQ cell, computed once per solve.

A DEQ keeps its map ``F`` a contraction (or close to one) by normalising its weights:
weight norm ``W = g * V / ||V||_row`` (``g`` learnable per output row) or spectral norm
``W = s * V / sigma(V)`` (``sigma`` the largest singular value, estimated by power iteration;
``s`` a learnable scale, so ``||W||_2 = |s|``). PyTorch's ``torch.nn.utils.parametrizations``
computes both, but recomputes the weight at every access: inside ``f`` that is once per solver
iteration, and spectral norm's power iteration then moves ``u, v`` (so ``sigma``, so ``F``)
at every iteration, and ``F`` is not one map during the solve.

This module adds what a DEQ needs on top of them:

- :func:`spectral_norm`: torch's spectral norm followed by a learnable scale ``s``;
- :func:`weight_norm`: torch's weight norm, with the scale ``g`` optionally started at one
  value ``scale`` for every row (rows of norm ``scale``) and optionally frozen;
- :func:`cached_norm`: a context manager in which every parametrised weight is computed once
  and reused by every call of ``f`` (torch's ``parametrize.cached``), so the power iteration
  advances once per forward call of the DEQ, i.e. once per training step, not per iteration.

>>> cell = rbp.spectral_norm(torch.nn.Linear(64, 64), scale=0.9)
>>> with rbp.cached_norm(cell):                   # W computed once for the whole solve
...     h = rbp.fixed_point(lambda h: torch.tanh(cell(h) + x), h0, steps=50)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

Tensor = torch.Tensor

__all__ = ["Scale", "cached_norm", "spectral_norm", "weight_norm"]


def _check_scale(scale: object, what: str) -> float:
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not ok or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {scale!r}")
    return float(scale)


def _check_weight(module: nn.Module, name: str) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {name!r} to normalise")
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} is already parametrised; normalise it once "
            "(torch.nn.utils.parametrize.remove_parametrizations to undo)"
        )
    return weight


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


class Scale(nn.Module):
    """The parametrisation ``W -> s * W`` with one scalar ``s`` (a parameter when learnt), of
    ``like``'s dtype and device."""

    def __init__(
        self, scale: float = 1.0, learn: bool = True, like: Tensor | None = None
    ) -> None:
        super().__init__()
        value = torch.tensor(_check_scale(scale, "scale"))
        if like is not None:
            value = value.to(dtype=like.dtype, device=like.device)
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, weight: Tensor) -> Tensor:
        return self.scale.to(weight.dtype) * weight


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    scale: float = 1.0,
    learn_scale: bool = True,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    """Spectral norm with a scale: ``module.<name> = s * V / sigma(V)``; returns ``module``.

    ``sigma(V) = u^T V v``, with ``u, v`` advanced by ``n_power_iterations`` power-iteration
    steps each time the weight is computed in training mode (torch's
    ``parametrizations.spectral_norm``; eval mode reuses them). Compute the weight once per
    DEQ forward with :func:`cached_norm`. ``s`` starts at ``scale`` and is a parameter
    (``module.parametrizations.<name>[1].scale``) unless ``learn_scale=False``.
    """
    weight = _check_weight(module, name)
    scale = _check_scale(scale, "scale")
    _check_bool(learn_scale, "learn_scale")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or (
        n_power_iterations < 1
    ):
        raise ValueError(f"n_power_iterations must be an integer >= 1, got {n_power_iterations!r}")
    parametrizations.spectral_norm(module, name, n_power_iterations=n_power_iterations, eps=eps,
                                   dim=dim)
    parametrize.register_parametrization(module, name, Scale(scale, learn_scale, like=weight))
    return module


def weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None = 0,
    *,
    scale: float | None = None,
    learn_scale: bool = True,
) -> nn.Module:
    """Weight norm ``module.<name> = g * V / ||V||`` (norm over all dims but ``dim``).

    Torch's ``parametrizations.weight_norm``: ``V`` is
    ``module.parametrizations.<name>.original1`` and the scale ``g`` (one per slice along
    ``dim``, e.g. per output row) ``original0``, started at ``||V||`` (the weight unchanged) or,
    with ``scale``, at that value for every slice (rows of norm ``scale``); ``learn_scale=False``
    freezes ``g``. Compute the weight once per DEQ forward with :func:`cached_norm`.
    """
    weight = _check_weight(module, name)
    if scale is not None:  # every option checked before the module is touched
        scale = _check_scale(scale, "scale")
    _check_bool(learn_scale, "learn_scale")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not (
                -weight.dim() <= dim < weight.dim()):
            raise ValueError(f"dim must be None or a dim of the {weight.dim()}-d weight, got "
                             f"{dim!r}")
        dim %= weight.dim()  # torch reads dim=-1 as "the whole tensor" (None), not the last
    parametrizations.weight_norm(module, name, dim=dim)
    g = getattr(module.parametrizations, name).original0
    if scale is not None:
        with torch.no_grad():
            g.fill_(scale)
    g.requires_grad_(learn_scale)
    return module


@contextmanager
def cached_norm(*modules: nn.Module) -> Iterator[None]:
    """Compute each parametrised weight of ``modules`` once, at entry, and reuse it inside.

    Wrap the DEQ's forward (the solve) in it: every call of ``f`` then uses the same weight
    tensor, so ``F`` is one map for the whole solve, the normalisation's cost is paid once
    rather than per iteration, and spectral norm's power iteration advances once per forward
    call (once per training step). The backward, inside or after the block, goes through that
    one weight to the parameters (``V``, ``g``, ``s``); run one forward per block. A backward
    that runs ``f`` again (``second_order=True``, cg with ``jvp='func'``) must run inside it
    (after it, it is refused).

    The weights are computed at entry, in the caller's grad mode: torch's
    ``parametrize.cached`` alone would cache the first computation, and
    :func:`rbp.fixed_point` makes its first calls of ``f`` without a graph (the forward
    iterations), which would cut the parameters off the gradient.
    """
    if not modules:
        raise TypeError("cached_norm(model): pass the module(s) whose normalised weights f uses")
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"cached_norm expects torch.nn.Module(s), got {type(module).__name__}")
    with parametrize.cached():
        for module in modules:
            for sub in module.modules():
                if parametrize.is_parametrized(sub):
                    for name in sub.parametrizations:
                        getattr(sub, name)  # fills the cache
        yield
