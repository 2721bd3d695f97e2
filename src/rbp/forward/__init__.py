"""The forward side of :func:`rbp.fixed_point`: reaching ``h* = F(h*)``.

Two ways to run the forward:

* **the paper's unroll** (``steps=T``, no ``tol``, plain iteration): exactly ``T`` updates
  ``h_{t+1} = F(h_t)``; the last one (bptt: all, tbptt: the last K) keeps a graph
  (:mod:`rbp.forward.unroll`);
* **a solve**: a forward solver run without a graph by one loop (:mod:`rbp.forward.loop`) until
  the residual ``||F(h) - h||`` is at most ``tol`` (absolute) or ``tol * ||F(h)||`` (relative),
  or ``steps`` evaluations of F are spent. The state it stops at, ``h_in``, is where the
  implicit methods linearise: the returned state is ``h_out = F(h_in)``, computed once more
  with a graph.

A forward solver is a value with ``name`` and ``init(x, max_evals) -> state``, whose state
steps the live rows (:mod:`rbp.forward.protocol`): :class:`Iterate` (plain or damped),
:class:`Anderson`, :class:`Broyden`, or your own. Every solver works on a matrix ``X`` of shape
``(b, n)``: one row per sample (``batch_dim``) or a single row holding the whole state. Rows stop
independently; a row that has stopped is frozen and dropped from later evaluations of F, so the
work shrinks with the number of live rows.
"""

from __future__ import annotations

from typing import Any

from rbp.forward.anderson import Anderson, _AndersonState
from rbp.forward.broyden import Broyden, _BroydenState
from rbp.forward.iterate import Iterate, _IterateState
from rbp.forward.loop import RowSolve, solve
from rbp.forward.protocol import (
    TOL_MODES,
    ForwardSolver,
    SolverState,
    Stopping,
    is_forward_solver,
    solver_name,
)
from rbp.forward.report import steps_taken, unreached_message, unsettled_message, worst_ratio
from rbp.forward.result import Forward, Measured, check_finite, measured
from rbp.forward.rows import (
    Layout,
    call_map,
    check_inputs,
    check_rows_independent,
    from_rows,
    layout,
    row_differences,
    to_rows,
)
from rbp.forward.run import is_plain, run, step_map
from rbp.forward.unroll import unroll

Solver = Iterate | Anderson | Broyden  # the built-in solvers; any ForwardSolver value works
SOLVERS: dict[str, type] = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden}
_DEFAULT_SOLVERS: dict[str, Any] = {name: cls() for name, cls in SOLVERS.items()}  # frozen


def as_solver(value: Any) -> ForwardSolver:
    """The solver value for a shortcut (``"iterate"``, ``"anderson"``, ``"broyden"``) or a value
    (a built-in one, or any object with ``init(x, max_evals)``: :mod:`rbp.forward.protocol`)."""
    if isinstance(value, (Iterate, Anderson, Broyden)):
        return value
    if isinstance(value, str) and value in SOLVERS:
        return _DEFAULT_SOLVERS[value]
    if not isinstance(value, str) and is_forward_solver(value):
        return value  # type: ignore[no-any-return]
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"unknown solver {value!r}; use one of {', '.join(map(repr, SOLVERS))} or a value "
        "rbp.Iterate(damping=..., tol=...), rbp.Anderson(m=..., beta=..., ridge=..., tol=...), "
        "rbp.Broyden(memory=..., replay=..., tol=...), or your own with init(x, max_evals) "
        "(see rbp.forward.protocol)"
    )


__all__ = [
    "SOLVERS", "TOL_MODES", "Anderson", "Broyden", "Forward", "ForwardSolver", "Iterate",
    "Layout", "Measured", "RowSolve", "Solver", "SolverState", "Stopping", "_AndersonState",
    "_BroydenState", "_IterateState", "as_solver", "call_map", "check_finite", "check_inputs",
    "check_rows_independent", "from_rows", "is_forward_solver", "is_plain", "layout", "measured",
    "row_differences", "run", "solve", "solver_name", "step_map", "steps_taken", "to_rows",
    "unreached_message", "unroll", "unsettled_message", "worst_ratio",
]
