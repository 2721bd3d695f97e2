"""``nn.Module`` face of :func:`rbp.fixed_point` for users who build models from layers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rbp import tree
from rbp.diagnostics import FixedPointInfo
from rbp.fixed_point import check_options, fixed_point
from rbp.tree import State


class FixedPoint(nn.Module):
    """``h* = cell(x, h*)`` as a layer: ``layer(x, h0)`` returns the fixed point.

    ``cell`` is any module called ``cell(x, h) -> h`` (input first, as ``torch.nn.GRUCell``);
    with ``time_varying=True`` it is called ``cell(x, h, t)``. ``x`` is a tensor or a
    (nested) tuple / list / dict of them; its leaves reach the cell through
    :func:`rbp.fixed_point`'s ``inputs``, so with ``batch_dim`` each is sliced to the live
    samples (every leaf must then be a tensor holding the batch along ``batch_dim``).
    ``last_step``, when given, is called like the cell: ``last_step(x, h)``. Every other
    keyword option of :func:`rbp.fixed_point` (``solver``, ``tol``, ``batch_dim``,
    ``time_varying``, ``checks``) is accepted and checked here, at construction, by the same
    check as the call (the values, e.g. :class:`rbp.Checks`, check themselves when built); the
    :class:`~rbp.FixedPointInfo` of the last call is ``layer.last_info``.
    """

    def __init__(
        self,
        cell: nn.Module,
        steps: int,
        method: Any = "neumann",
        truncate: int = 20,
        **options: Any,
    ) -> None:
        super().__init__()
        for name in ("return_info", "inputs"):
            if name in options:
                raise TypeError(
                    f"FixedPoint sets {name} itself (the info of the last call is in "
                    f".last_info; x is passed as the input); do not pass {name}=..."
                )
        if not callable(cell):
            raise TypeError(f"cell must be a module called cell(x, h), got {type(cell).__name__}")
        last_step = options.pop("last_step", None)
        if last_step is not None:
            _check_last_step(last_step)
            options["last_step"] = _unflattening(last_step, None)  # the call's arity
        check_options(cell, steps, method, truncate, **options)
        options.pop("last_step", None)
        self.cell = cell
        self.steps = steps
        self.method = method
        self.truncate = truncate
        self.options = options
        self.last_step = last_step
        self.last_info: FixedPointInfo | None = None

    def forward(self, x: Any, h0: State) -> State:
        leaves, spec = pytree.tree_flatten(x)
        batch_dim = self.options.get("batch_dim")
        if batch_dim is not None:
            _check_batched(leaves, isinstance(x, torch.Tensor), h0, batch_dim)

        if self.options.get("time_varying", False):

            def f(h: State, t: int, *xs: Any) -> State:
                return self.cell(pytree.tree_unflatten(list(xs), spec), h, t)
        else:

            def f(h: State, *xs: Any) -> State:  # type: ignore[misc]
                return self.cell(pytree.tree_unflatten(list(xs), spec), h)

        extra = {}
        if self.last_step is not None:
            extra["last_step"] = _unflattening(self.last_step, spec)
        h, self.last_info = fixed_point(
            f,
            h0,
            self.steps,
            self.method,
            self.truncate,
            inputs=tuple(leaves),
            return_info=True,
            **self.options,
            **extra,
        )
        return h

    def extra_repr(self) -> str:
        return f"steps={self.steps}, method={self.method!r}, truncate={self.truncate}"


def _unflattening(last_step: Callable[..., State],
                  spec: pytree.TreeSpec | None) -> Callable[..., State]:
    """``last_step(h, *leaves)`` as :func:`rbp.fixed_point` calls it -> ``last_step(x, h)``."""

    def call(h: State, *xs: Any) -> State:
        assert spec is not None, "only the construction check holds no structure"
        return last_step(pytree.tree_unflatten(list(xs), spec), h)

    return call


def _check_last_step(last_step: Any) -> None:
    if not callable(last_step):
        raise TypeError(f"last_step must be callable or None, got {type(last_step).__name__}")
    try:
        sig = inspect.signature(last_step)
    except (TypeError, ValueError):  # a builtin without a signature: let the call tell
        return
    try:
        sig.bind(None, None)
    except TypeError:
        raise TypeError(
            f"FixedPoint calls last_step like the cell, last_step(x, h), but its signature is "
            f"{sig}"
        ) from None


def _check_batched(leaves: list[Any], bare: bool, h0: State, batch_dim: int) -> None:
    """With ``batch_dim`` every leaf of ``x`` (``bare``: x is one tensor) is sliced per sample,
    so it must be a tensor holding the state's samples along ``batch_dim``."""
    first = tree.flatten(h0, "h0")[0][0]
    batch = first.shape[batch_dim] if -first.dim() <= batch_dim < first.dim() else None
    for i, leaf in enumerate(leaves):
        where = "x" if bare else f"leaf {i} of x"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{where} is a {type(leaf).__name__}; with batch_dim every leaf of x must be a "
                "tensor holding the batch along batch_dim (close over anything else in the cell)"
            )
        if batch is not None and (not -leaf.dim() <= batch_dim < leaf.dim()
                                  or leaf.shape[batch_dim] != batch):
            raise ValueError(
                f"{where} of shape {tuple(leaf.shape)} does not hold the {batch} samples of h0 "
                f"along batch_dim={batch_dim}; give every leaf of x the batch there"
            )
