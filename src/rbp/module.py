"""``nn.Module`` face of :func:`rbp.fixed_point` for users who build models from layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rbp.fixed_point import fixed_point
from rbp.tree import State


class FixedPoint(nn.Module):
    """``h* = cell(x, h*)`` as a layer: ``forward(x, h0)`` returns ``h_T`` after ``steps`` updates.

    ``cell`` is any module called ``cell(x, h) -> h``; its parameters get gradients by
    ``method`` (see :func:`rbp.fixed_point`, whose keyword options are accepted here too).
    """

    def __init__(
        self,
        cell: nn.Module,
        steps: int,
        method: str = "neumann",
        truncate: int = 20,
        **options: Any,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.steps = steps
        self.method = method
        self.truncate = truncate
        self.options = options
        self.last_info = None

    def forward(self, x: torch.Tensor, h0: State) -> State:
        h, self.last_info = fixed_point(
            lambda h: self.cell(x, h),
            h0,
            self.steps,
            self.method,
            self.truncate,
            return_info=True,
            **self.options,
        )
        return h

    def extra_repr(self) -> str:
        return f"steps={self.steps}, method={self.method!r}, truncate={self.truncate}"
