"""Trajectory sampling and the fixed-point correction loss (Bai et al., 2022).

Supervising only the final state of a DEQ leaves the early iterates free to wander; the
*fixed-point correction* of Bai, Teed & Koltun ("Deep equilibrium optical flow estimation",
CVPR 2022) applies the loss to several iterates of the solve, each with a cheap gradient, and
weights them ``gamma^(n - j)`` so that the later ones count most.

:func:`sample_trajectory` runs ``h_{t+1} = F(h_t)`` without a graph, keeps the iterates asked
for, and gives each a *phantom gradient* (Geng et al., 2021): from the detached iterate
``h_i``, ``k`` differentiable damped steps ``z <- lam F(z) + (1 - lam) z``. The returned state
is that ``z``; with ``damping = 1`` it is ``h_{i+k}``, differentiated through its last ``k``
steps (truncated BPTT), and from ``i = 0`` with ``k = T`` it is BPTT of ``T`` steps.
:func:`correction_loss` weights the per-iterate losses. With ``method=`` (an implicit
method) each sampled iterate gets the implicit gradient at that iterate instead.

>>> states = rbp.sample_trajectory(f, h0, steps=30, indices=[10, 20, 30], k=2)
>>> loss = rbp.correction_loss([criterion(head(h), y) for h in states], gamma=0.8)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rbp import tree
from rbp.tree import State

Tensor = torch.Tensor

__all__ = ["correction_loss", "sample_trajectory"]


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def sample_trajectory(
    f: Callable[..., State],
    h0: State,
    steps: int,
    indices: Sequence[int],
    *,
    k: int | None = None,
    damping: float | None = None,
    inputs: Sequence[Any] = (),
    method: str | Any | None = None,
    truncate: int = 20,
) -> list[State]:
    """Iterates ``h_i`` (``i`` in ``indices``) of ``h_{t+1} = F(h_t)``, each with a gradient.

    The forward runs ``h_{t+1} = f(h_t, *inputs)`` for ``t < max(indices)`` without a graph
    (``steps`` bounds it). For each index ``i``, the output is ``z_k`` with ``z_0 = h_i``
    (detached) and ``z_{j+1} = lam f(z_j) + (1 - lam) z_j``, ``lam = damping``: back-propagating
    through it gives the phantom gradient, ``lam sum_{j<k} (lam J^T + (1 - lam) I)^j g`` at a
    fixed point; ``damping = 1`` gives ``h_{i+k}`` with the truncated-BPTT gradient of its last
    ``k`` steps (exact BPTT from ``i = 0``, ``k = T``).

    Args:
        f: one update, ``f(h, *inputs)``, as for :func:`rbp.fixed_point`.
        h0: initial state (a tensor or a tuple / list / dict of tensors).
        steps: the largest index allowed (``h_steps`` is the last iterate).
        indices: which iterates, each in ``0..steps`` (negative: counted from ``steps``, so
            ``-1`` is ``h_steps``); the outputs come in this order.
        k: differentiable steps per sampled iterate (memory O(k) each); default 1.
        damping: ``lam`` in ``(0, 1]``; default 0.5.
        inputs: extra arguments of ``f``.
        method: ``None`` for the phantom gradient above; or an implicit method of
            :func:`rbp.fixed_point` (``"gmres"``, ``rbp.Implicit(...)``, ...): the output is then
            ``F(h_i)`` with the implicit gradient linearised at ``h_i``,
            ``(dF/dw)^T (I - J(h_i)^T)^{-1} g`` (one ``rbp.fixed_point`` step from ``h_i``,
            its settle check off: ``h_i`` need not be a fixed point); ``k`` and ``damping``
            are then refused, as are bptt / tbptt (they have no gradient at one iterate).
        truncate: the implicit method's iterations (with a string ``method``).

    Returns:
        One state per index, each differentiable in what ``f`` uses (not in ``h0``); under
        ``torch.no_grad()`` the iterates themselves, with no graph.
    """
    if not callable(f):
        raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
    _check_int("steps", steps, 1)
    if method is not None:
        _check_method(method, k, damping)
    k = 1 if k is None else k
    damping = 0.5 if damping is None else damping
    _check_int("k", k, 1)
    ok = isinstance(damping, (int, float)) and not isinstance(damping, bool)
    if not ok or not math.isfinite(damping) or not 0 < damping <= 1:
        raise ValueError(f"damping must be a number in (0, 1], got {damping!r}")
    if isinstance(indices, (int, Tensor)) or not isinstance(indices, Sequence) or not indices:
        raise ValueError(f"indices must be a non-empty sequence of integers, got {indices!r}")
    chosen: list[int] = []
    for i in indices:
        try:
            i = operator.index(i)
        except TypeError:
            raise ValueError(f"indices must be integers, got {i!r}") from None
        if not -(steps + 1) <= i <= steps:
            raise ValueError(
                f"index {i} is out of range: the trajectory has iterates h_0 .. h_{steps} "
                f"(indices 0..{steps}, or -{steps + 1}..-1 from the end)"
            )
        chosen.append(i % (steps + 1))
    wanted = set(chosen)
    leaves, spec = tree.flatten(h0, "h0")
    h = [leaf.detach() for leaf in leaves]
    kept: dict[int, list[Tensor]] = {}
    with torch.no_grad():
        for t in range(max(wanted) + 1):
            if t in wanted:
                kept[t] = h
            if t == max(wanted):
                break
            h = tree.check_same_structure(spec, h, f(tree.unflatten(spec, h), *inputs), t)
    out: list[State] = []
    if method is not None:
        from rbp.checks import Checks
        from rbp.fixed_point import fixed_point  # not at import: rbp.fixed_point is the function

        for i in chosen:
            out.append(fixed_point(f, tree.unflatten(spec, kept[i]), 1, method, truncate,
                                   checks=Checks(settle_tol=None), inputs=inputs))
        return out
    for i in chosen:  # under no_grad too: the same states, no graph
        z = list(kept[i])
        for j in range(k):
            fz = tree.check_same_structure(spec, z, f(tree.unflatten(spec, z), *inputs), i + j)
            z = fz if damping == 1 else [
                damping * a + (1 - damping) * b for a, b in zip(fz, z, strict=True)
            ]
        out.append(tree.unflatten(spec, z))
    return out


def _check_method(method: Any, k: int | None, damping: float | None) -> None:
    """An implicit method gives each iterate its own gradient: k and damping do not apply,
    and bptt / tbptt (a gradient through the steps) cannot be taken at one iterate."""
    from rbp import methods

    given = [f"{name}={value!r}" for name, value in (("k", k), ("damping", damping))
             if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} configure the phantom gradient, which "
                         f"method={method!r} replaces; pass one or the other")
    name = method if isinstance(method, str) else None
    if name in ("bptt", "tbptt") or isinstance(method, (methods.BPTT, methods.TBPTT)):
        raise ValueError(f"method={method!r} back-propagates through the forward steps and has "
                         "no gradient at one sampled iterate; pass an implicit method "
                         "(e.g. 'gmres'), or method=None with damping=1 and k for truncated "
                         "BPTT from each iterate")


def correction_loss(losses: Sequence[Tensor], gamma: float = 0.8) -> Tensor:
    """``sum_{j=1..n} gamma^(n-j) losses[j-1]``: the fixed-point correction loss.

    ``losses`` are the losses of the sampled iterates in trajectory order (the last one, the
    state closest to the fixed point, gets weight 1); ``gamma`` in ``(0, 1]``.
    """
    if isinstance(losses, Tensor) or not isinstance(losses, Sequence) or not losses:
        raise ValueError("losses must be a non-empty sequence of scalar tensors, one per iterate")
    for j, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"losses[{j}] must be a scalar tensor, got "
                f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}"
            )
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
    if not ok or not math.isfinite(gamma) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    n = len(losses)
    return sum((gamma ** (n - j) * loss.reshape(()) for j, loss in enumerate(losses, 1)),
               losses[0].new_zeros(()))
