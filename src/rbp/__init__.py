"""rbp: gradients through convergent recurrences (Liao et al., ICML 2018).

>>> h = rbp.fixed_point(f, h0, steps=50, method="neumann", truncate=20)
>>> loss(h).backward()

The public names load on first use (PEP 562), so ``import rbp.runner.cli`` (``rbp --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rbp import diagnostics, forward, linear, methods
    from rbp.checks import Checks
    from rbp.diagnostics import (
        BackwardInfo,
        ConvergenceWarning,
        DivergenceError,
        FixedPointInfo,
        Status,
    )
    from rbp.dropout import VariationalDropout, VariationalDropout2d
    from rbp.fixed_point import IMPLICIT_METHODS, METHODS, fixed_point
    from rbp.forward import Anderson, Broyden, Iterate
    from rbp.methods import BPTT, JFB, TBPTT, Implicit, Phantom
    from rbp.module import FixedPoint
    from rbp.monitor import RadiusEstimate, ResidualMonitor, spectral_radius
    from rbp.norm import Scale, cached_norm, spectral_norm, weight_norm
    from rbp.regularisers import jacobian_penalty
    from rbp.trajectory import correction_loss, sample_trajectory
    from rbp.warm_start import WarmStart

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
    "Checks",
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
    "linear",
    "VariationalDropout",
    "VariationalDropout2d",
    "WarmStart",
    "Scale",
    "cached_norm",
    "spectral_norm",
    "weight_norm",
    "correction_loss",
    "sample_trajectory",
    "RadiusEstimate",
    "ResidualMonitor",
    "spectral_radius",
]

# public name -> the module that defines it (a submodule itself when the name is one)
_WHERE: dict[str, str] = {
    **dict.fromkeys(("diagnostics", "forward", "methods", "linear"), ""),
    **dict.fromkeys(
        ("BackwardInfo", "ConvergenceWarning", "DivergenceError", "FixedPointInfo", "Status"),
        "rbp.diagnostics",
    ),
    **dict.fromkeys(("IMPLICIT_METHODS", "METHODS", "fixed_point"), "rbp.fixed_point"),
    **dict.fromkeys(("Anderson", "Broyden", "Iterate"), "rbp.forward"),
    **dict.fromkeys(("BPTT", "JFB", "TBPTT", "Implicit", "Phantom"), "rbp.methods"),
    "FixedPoint": "rbp.module",
    "Checks": "rbp.checks",
    "jacobian_penalty": "rbp.regularisers",
    "RadiusEstimate": "rbp.monitor",
    "ResidualMonitor": "rbp.monitor",
    "spectral_radius": "rbp.monitor",
    "correction_loss": "rbp.trajectory",
    "sample_trajectory": "rbp.trajectory",
    "Scale": "rbp.norm",
    "cached_norm": "rbp.norm",
    "spectral_norm": "rbp.norm",
    "weight_norm": "rbp.norm",
    "WarmStart": "rbp.warm_start",
    "VariationalDropout": "rbp.dropout",
    "VariationalDropout2d": "rbp.dropout",
}


# core submodules that ``import rbp`` used to bind as attributes (reachable as rbp.tree, ...)
_SUBMODULES = ("adjoint", "checks", "module", "regularisers", "tree")


def __getattr__(name: str) -> Any:
    if name == "solvers":  # the adjoint's linear solvers before they were named rbp.linear
        warnings.warn("rbp.solvers is now rbp.linear (the linear solvers of the backward, "
                      "e.g. rbp.linear.GMRES); the old name goes in a later release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("rbp.linear")
    where = _WHERE.get(name)
    if where is None and name in _SUBMODULES:
        where = ""
    if where is None:
        raise AttributeError(f"module 'rbp' has no attribute {name!r}")
    if where == "":
        value = importlib.import_module(f"rbp.{name}")
    else:
        value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``rbp.fixed_point`` the function when the submodule of that name is imported.

    Importing a submodule binds it on its package; with the names loaded lazily that would
    otherwise replace the function ``rbp.fixed_point`` by the module ``rbp.fixed_point``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "fixed_point" and isinstance(value, types.ModuleType):
            value = value.fixed_point
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
