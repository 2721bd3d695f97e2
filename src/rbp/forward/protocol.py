"""What a forward solver is: a value that starts a state, and a state that steps the live rows.

Every forward solver works on a matrix ``X`` of shape ``(b, n)``: one row per sample
(``batch_dim``) or a single row holding the whole state. The loop (:mod:`rbp.forward.loop`) owns
everything else: evaluating ``F`` on the live rows, the stopping test, the best iterate, and
removing a row once it stops. A solver only proposes the next iterate:

* a **solver value** (frozen, hashable, checked when built) has a ``name`` and
  ``init(x, max_evals) -> state`` (``max_evals``: the most evaluations of F the solve may
  spend, so buffers can be sized by what the solve can use);
* its **state** has ``step(x, fx, g) -> (x_next, bad)`` with ``g = fx - x`` (rows of the live
  samples only) and ``bad`` a boolean per row that took a safeguarded (plain) step, or
  ``None`` when none can; and ``keep(rows)``, called when rows leave: keep the given rows
  (indices into the current live rows, in order) of whatever the state stores per row.

The loop runs ``step`` without a graph and, under ``torch.autocast``, with autocast off for
every solver but plain iteration (the solver's arithmetic stays in the state's dtype).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Tensor = torch.Tensor
TOL_MODES: tuple[str, ...] = ("relative", "absolute")


class SolverState(Protocol):
    """The per-solve state of a forward solver (see the module docstring)."""

    def step(self, x: Tensor, fx: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def keep(self, rows: Tensor) -> None: ...


class ForwardSolver(Protocol):
    """A forward solver value: ``name`` and ``init(x, max_evals) -> SolverState``."""

    name: str

    def init(self, x: Tensor, max_evals: int | None = None) -> SolverState: ...


def is_forward_solver(value: Any) -> bool:
    """Whether ``value`` follows the protocol (a value, not a class)."""
    return not isinstance(value, type) and callable(getattr(value, "init", None))


def solver_name(solver: Any) -> str:
    return str(getattr(solver, "name", type(solver).__name__))


def _row_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _replace_rows(bad: Tensor, value: Tensor, x: Tensor) -> Tensor:
    """``x`` with the rows flagged in ``bad`` replaced by those of ``value``.

    On CPU the flag is read first (a read costs nothing there) so the copy is skipped when no
    row is bad; on other devices it always selects, so that a step needs no host sync.
    """
    if x.device.type != "cpu" or bool(bad.any()):
        return torch.where(bad[:, None], value, x)
    return x
