"""What the forward hands to :func:`rbp.fixed_point`, and the norms it reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rbp.diagnostics import DivergenceError
from rbp.tree import State

Tensor = torch.Tensor


@dataclass
class Forward:
    """What the forward hands to :func:`rbp.fixed_point`'s backward wiring."""

    h: State  # the returned state h_out (with the graph its method needs)
    h_in: list[Tensor]  # leaves at which the map was last applied (requires_grad if implicit)
    h_out: list[Tensor]  # leaves of h_out = F(h_in)
    spec: Any
    update: Callable[[State, int], State] | None = None  # F_t(h), as run() applied it
    # per row of the settle check: (||h_T - h_T-1||, ||h_T||), see row_differences
    rows: tuple[Any, ...] | None = None


def _diff_norm(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = sum((x.detach() - y.detach()).pow(2).sum() for x, y in zip(a, b, strict=True))
    return torch.as_tensor(total).sqrt().to("cpu", torch.float64)


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(sum(leaf.detach().double().pow(2).sum().item() for leaf in a))


def check_finite(leaves: Sequence[Tensor], method: str, steps: int) -> None:
    if not all(bool(torch.isfinite(leaf.detach()).all()) for leaf in leaves):
        raise DivergenceError(
            f"fixed_point: the forward state is not finite after {steps} steps: the map diverges. "
            "Check that f is a contraction (e.g. smaller weights or a damped update)."
        )


def _fill(info: Any, diff: float, scale: float, trace: list[float]) -> None:
    info.final_difference = diff
    info.relative_final_difference = diff / max(scale, 1e-30)
    info.forward_trace = trace
