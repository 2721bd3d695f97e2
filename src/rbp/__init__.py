"""rbp: gradients through convergent recurrences (Liao et al., ICML 2018).

>>> h = rbp.fixed_point(f, h0, steps=50, method="neumann", truncate=20)
>>> loss(h).backward()
"""

from rbp import diagnostics, forward, methods, solvers
from rbp.diagnostics import (
    BackwardInfo,
    ConvergenceWarning,
    DivergenceError,
    FixedPointInfo,
    Status,
)
from rbp.fixed_point import IMPLICIT_METHODS, METHODS, fixed_point
from rbp.forward import Anderson, Broyden, Iterate
from rbp.methods import BPTT, JFB, TBPTT, Implicit, Phantom
from rbp.module import FixedPoint
from rbp.regularisers import jacobian_penalty

__version__ = "0.1.0"

__all__ = [
    "IMPLICIT_METHODS",
    "METHODS",
    "BPTT",
    "JFB",
    "TBPTT",
    "Anderson",
    "BackwardInfo",
    "Broyden",
    "ConvergenceWarning",
    "DivergenceError",
    "FixedPoint",
    "FixedPointInfo",
    "Implicit",
    "Iterate",
    "Phantom",
    "Status",
    "diagnostics",
    "fixed_point",
    "forward",
    "jacobian_penalty",
    "methods",
    "solvers",
]
