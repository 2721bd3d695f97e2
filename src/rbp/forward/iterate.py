"""Plain and damped iteration ``h_{k+1} = (1 - damping) F(h_k) + damping h_k``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rbp.diagnostics import check_real as _real
from rbp.forward.protocol import Stopping

Tensor = torch.Tensor


@dataclass(frozen=True)
class Iterate(Stopping):
    """Plain iteration ``h_{k+1} = (1 - damping) F(h_k) + damping h_k`` (0: the paper's).

    Assumes F is a contraction (or, damped, that the eigenvalues of ``J`` lie left of 1).
    """

    damping: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        d = _real("Iterate(damping=...)", self.damping)
        if not 0.0 <= d < 1.0:
            raise ValueError(f"Iterate(damping=...) must be in [0, 1), got {self.damping!r}")

    def init(self, x: Tensor, max_evals: int | None = None) -> _IterateState:
        """The state of one solve starting at the rows ``x`` (see :mod:`rbp.forward.protocol`)."""
        return _IterateState(self, x)

    @property
    def name(self) -> str:
        return "iterate"


class _IterateState:
    def __init__(self, cfg: Iterate, x: Tensor) -> None:
        self.damping = cfg.damping

    def keep(self, rows: Tensor) -> None:
        pass

    def step(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out = fx if self.damping == 0.0 else torch.lerp(fx, x, self.damping)
        return out, None  # no safeguard: nothing to count
