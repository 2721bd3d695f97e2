"""rbp: gradients through convergent recurrences (Liao et al., ICML 2018).

>>> h = rbp.fixed_point(f, h0, steps=50, method="neumann", truncate=20)
>>> loss(h).backward()
"""

from rbp import diagnostics, solvers
from rbp.diagnostics import BackwardInfo, ConvergenceWarning, DivergenceError, FixedPointInfo
from rbp.fixed_point import IMPLICIT_METHODS, METHODS, fixed_point
from rbp.module import FixedPoint

__version__ = "0.1.0"

__all__ = [
    "IMPLICIT_METHODS",
    "METHODS",
    "BackwardInfo",
    "ConvergenceWarning",
    "DivergenceError",
    "FixedPoint",
    "FixedPointInfo",
    "diagnostics",
    "fixed_point",
    "solvers",
]
