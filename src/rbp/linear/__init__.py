"""Linear solvers for the adjoint system ``A z = b`` with ``A = I - J^T``.

One module each: :mod:`~rbp.linear.protocol` (the protocol, :class:`Solution`, the operator),
:mod:`~rbp.linear.series` (Neumann, RBP's fixed-point iteration),
:mod:`~rbp.linear.krylov` (CG on the normal equations, GMRES),
:mod:`~rbp.linear.shine` (SHINE: the Broyden forward's inverse estimate, alone or with GMRES),
:mod:`~rbp.linear.estimates` (their a-posteriori error estimates and statuses) and
:mod:`~rbp.linear.values` (the solvers as values).

**Protocol.** A solver is a value with a method ``solve(matvec, b) -> Solution`` (a plain
callable ``solver(matvec, b)`` is accepted too):

* ``b`` is a ``(batch, n)`` tensor holding ``batch`` independent right-hand sides (``batch = 1``
  unless :func:`rbp.fixed_point` was given ``batch_dim``: then row ``i`` is sample ``i``'s
  ``g`` and J is block-diagonal, so every row is its own system);
* ``matvec(v) = A v = v - J^T v`` row by row, for ``v`` of the shape of ``b``. The operator the
  core passes also has ``matvec.vjp(v) = J^T v`` and ``matvec.rmatvec(v) = A^T v = v - J v``
  (``rmatvec`` only when forward products are available);
* the result is a :class:`Solution`, or any object with a ``z`` attribute of ``b``'s shape (or a
  bare tensor ``z``). The core then computes the true residual ``||A z - b|| / ||b||`` itself
  (one extra product) as the solve's error estimate.

A built-in solver never raises on a bad system: it reports a :class:`~rbp.diagnostics.Status`
and an a-posteriori error estimate, and the caller decides. Options are checked when the solver
is constructed. ``tol`` is relative to ``||b||`` per row; ``tol=None`` runs ``max_iter``
iterations (the paper's truncated algorithms). The stopping rule costs one host read per test:
with a tolerance (and always for the Krylov solvers, which also test for breakdown) it is
tested every ``check_every`` iterations; the series solvers without a tolerance test only after
their first products and every ``UNTOLERANCED_CHECK_EVERY`` (a zero increment, ``J = 0`` or
``g = 0``, or a NaN stops there; Neumann only for a series longer than that), then read the
device once at the end.
"""

from __future__ import annotations

from rbp.linear.estimates import (  # noqa: F401 (the core's other modules and tests use these)
    RATIO_SPREAD,
    RITZ_PYTHON_ROWS,
    _classify,
    _finish,
    _read,
    _ritz_tail_row,
    _ritz_tails,
    _tail,
    _Window,
    _window_gram,
)
from rbp.linear.krylov import _true_errors, conjugate_gradient_normal, gmres  # noqa: F401
from rbp.linear.protocol import (  # noqa: F401
    DIVERGENCE_FACTOR,
    RATE_WINDOW,
    AdjointOperator,
    Matvec,
    Solution,
    Solver,
    _check_int,
    _check_tol,
    _estimating,
    _rows,
    _vjp_of,
    is_solver,
)
from rbp.linear.series import (  # noqa: F401
    UNTOLERANCED_CHECK_EVERY,
    fixed_point_iteration,
    neumann,
)
from rbp.linear.shine import SHINE  # noqa: F401
from rbp.linear.values import GMRES, RBP, SOLVERS, CGNormal, Neumann  # noqa: F401

__all__ = [
    "GMRES", "RBP", "SHINE", "SOLVERS", "AdjointOperator", "CGNormal", "Matvec", "Neumann",
    "Solution", "Solver", "conjugate_gradient_normal", "fixed_point_iteration", "gmres",
    "is_solver", "neumann",
]
