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

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rbp.diagnostics import check_count, check_real

Tensor = torch.Tensor
TOL_MODES: tuple[str, ...] = ("relative", "absolute")


@dataclass(frozen=True, kw_only=True)
class Stopping:
    """The stopping options every built-in forward solver carries (keyword-only fields, checked
    when the value is built; subclass it, as a frozen dataclass, to give your own solver them).

    ``tol``: stop once ``||F(h) - h|| <= tol * ||F(h)||`` (``tol_mode="relative"``) or
    ``<= tol`` (``"absolute"``); ``None``: spend all ``steps`` evaluations. ``check_every``:
    test the stopping rule (one host synchronisation) every N iterations. ``best_iterate``:
    return, per sample, the lowest-residual iterate the solve visited (and linearise there).
    ``tol_mode`` and ``check_every`` configure the test, which runs only with a ``tol``: set
    without one they are refused (they would be ignored).
    """

    tol: float | None = None
    tol_mode: str = "relative"
    check_every: int = 1
    best_iterate: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.tol is not None and check_real(f"{owner}(tol=...)", self.tol) <= 0:
            raise ValueError(f"{owner}(tol=...) must be positive, or None, got {self.tol!r}")
        if not isinstance(self.tol_mode, str):
            raise TypeError(f"{owner}(tol_mode=...) must be one of "
                            f"{', '.join(map(repr, TOL_MODES))}, got {self.tol_mode!r}")
        if self.tol_mode not in TOL_MODES:
            raise ValueError(f"{owner}(tol_mode=...) must be one of "
                             f"{', '.join(map(repr, TOL_MODES))}, got {self.tol_mode!r}")
        check_count(f"{owner}(check_every=...)", self.check_every)
        if not isinstance(self.best_iterate, bool):
            raise TypeError(f"{owner}(best_iterate=...) must be True or False, got "
                            f"{self.best_iterate!r}")
        if self.tol is None:
            for name, default in (("tol_mode", "relative"), ("check_every", 1)):
                value = getattr(self, name)
                if value != default:
                    raise ValueError(
                        f"{owner}({name}={value!r}) would be ignored: {name} configures the "
                        f"stopping test, which runs only with a tol; pass {owner}(tol=..., "
                        f"{name}={value!r}) or leave {name} out")


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
