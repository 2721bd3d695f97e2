"""``nn.Module`` face of :func:`rbp.fixed_point` for users who build models from layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from rbp.diagnostics import FixedPointInfo
from rbp.fixed_point import check_options, fixed_point
from rbp.tree import State


class FixedPoint(nn.Module):
    """``h* = cell(x, h*)`` as a layer: ``layer(x, h0)`` returns the fixed point.

    ``cell`` is any module called ``cell(x, h) -> h`` (input first, as ``torch.nn.GRUCell``);
    with ``time_varying=True`` it is called ``cell(x, h, t)``. ``x`` reaches the cell through
    :func:`rbp.fixed_point`'s ``inputs``, so with ``batch_dim`` it is sliced to the live samples.
    Every other keyword option of :func:`rbp.fixed_point` (``solver``, ``tol``, ``batch_dim``,
    ``time_varying``, ``last_step``, ``checks``) is accepted and checked here, at construction,
    by the same check as the call (the values, e.g. :class:`rbp.Checks`, check themselves when
    built); the :class:`~rbp.FixedPointInfo` of the last call is ``layer.last_info``.
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
        check_options(cell, steps, method, truncate, **options)
        self.cell = cell
        self.steps = steps
        self.method = method
        self.truncate = truncate
        self.options = options
        self.last_info: FixedPointInfo | None = None

    def forward(self, x: Any, h0: State) -> State:
        if self.options.get("time_varying", False):

            def f(h: State, t: int, x_: Any) -> State:
                return self.cell(x_, h, t)
        else:

            def f(h: State, x_: Any) -> State:  # type: ignore[misc]
                return self.cell(x_, h)

        h, self.last_info = fixed_point(
            f,
            h0,
            self.steps,
            self.method,
            self.truncate,
            inputs=(x,),
            return_info=True,
            **self.options,
        )
        return h

    def extra_repr(self) -> str:
        return f"steps={self.steps}, method={self.method!r}, truncate={self.truncate}"
