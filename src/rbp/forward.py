"""The forward side of :func:`rbp.fixed_point`: reaching ``h* = F(h*)``.

Two ways to run the forward:

* **the paper's unroll** (``steps=T``, no ``tol``, plain iteration): exactly ``T`` updates
  ``h_{t+1} = F(h_t)``; the last one (bptt: all, tbptt: the last K) keeps a graph;
* **a solve**: a forward solver (:class:`Iterate`, :class:`Anderson`, :class:`Broyden`) run
  without a graph until the residual ``||F(h) - h||`` is at most ``tol`` (absolute) or
  ``tol * ||F(h)||`` (relative), or ``steps`` evaluations of F are spent. The state it stops at,
  ``h_in``, is where the implicit methods linearise: the returned state is ``h_out = F(h_in)``,
  computed once more with a graph.

Every solver works on a matrix ``X`` of shape ``(b, n)``: one row per sample (``batch_dim``) or a
single row holding the whole state. Rows stop independently; a row that has stopped is frozen
and dropped from later evaluations of F, so the work shrinks with the number of live rows.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rbp import tree
from rbp.diagnostics import DivergenceError
from rbp.tree import State

Tensor = torch.Tensor
RowMap = Callable[[Tensor, "Tensor | None"], Tensor]  # F on live rows: (X_live, rows) -> F(X_live)
TOL_MODES: tuple[str, ...] = ("relative", "absolute")


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- solver values


@dataclass(frozen=True)
class Iterate:
    """Plain iteration ``h_{k+1} = (1 - damping) F(h_k) + damping h_k`` (0: the paper's).

    Assumes F is a contraction (or, damped, that the eigenvalues of ``J`` lie left of 1).
    """

    damping: float = 0.0

    def __post_init__(self) -> None:
        d = _real("Iterate(damping=...)", self.damping)
        if not 0.0 <= d < 1.0:
            raise ValueError(f"Iterate(damping=...) must be in [0, 1), got {self.damping!r}")

    @property
    def name(self) -> str:
        return "iterate"


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) over the last ``m`` iterates, per sample.

    ``x_{k+1} = sum_i a_i x_i + beta sum_i a_i g_i`` with ``g_i = F(x_i) - x_i`` and
    ``a = argmin ||sum_i a_i g_i||`` subject to ``sum_i a_i = 1``, solved from the Gram matrix
    ``G^T G + ridge * mean(diag) I``. The Gram matrix and its solve are float64 whatever the
    state's dtype (float32 on MPS), with ``ridge=None`` = ``sqrt(eps)`` of that dtype (of the
    state's for float16 / bfloat16), so a long history stays usable in float32 (a float32-sized
    ridge and conditioning limit turned most steps of an ``m = 25`` history into plain steps). The
    Gram matrix is kept and updated by the new residual's row and column only, and the mix is
    one batched product with the stored ``x_i + beta g_i``: a step costs O(m n) per sample and
    the solver stores ``2 m`` vectors per sample. A row whose system is singular,
    ill-conditioned or non-finite takes the plain step ``x + beta g`` for that iteration
    instead (counted in ``info.solver_fallbacks``). ``m = 25`` needs no more evaluations than
    TorchDEQ's best solver on every problem of ``benchmarks/forward_bench.py``; the default
    ``m = 5`` stores a fifth of that and costs less per step on a large state.
    """

    m: int = 5
    beta: float = 1.0
    ridge: float | None = None

    def __post_init__(self) -> None:
        _count("Anderson(m=...)", self.m)
        beta = _real("Anderson(beta=...)", self.beta)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Anderson(beta=...) must be in (0, 1], got {self.beta!r}")
        if self.ridge is not None and _real("Anderson(ridge=...)", self.ridge) < 0:
            raise ValueError(f"Anderson(ridge=...) must be >= 0 or None, got {self.ridge!r}")

    @property
    def name(self) -> str:
        return "anderson"


@dataclass(frozen=True)
class Broyden:
    """Limited-memory ("good") Broyden on ``g(x) = F(x) - x``, per sample.

    The inverse Jacobian of g is ``H = -I + sum_j u_j v_j^T`` with at most ``memory`` rank-one
    terms, each making ``H dg_j = dx_j`` hold for the secant pair ``(dx_j, dg_j)`` of step j.
    When they are all used, H is rebuilt from ``-I`` as good Broyden over the last ``replay``
    pairs (``None``: ``memory // 2``; computed at once in compact form) instead of losing all
    curvature. An iteration costs O(n * memory) whatever the iteration count (one product with
    H and one with H^T: ``H g`` of the last step is carried over), a restart O(n * replay^2),
    and it stores ``2 * (memory + replay)`` vectors per sample. An update whose denominator
    vanishes is skipped, a rebuild whose small system is ill-conditioned keeps the newest pair
    only, and a non-finite step is replaced by the plain step ``x + g`` (all counted in
    ``info.solver_fallbacks``).
    """

    memory: int = 50
    replay: int | None = None

    def __post_init__(self) -> None:
        _count("Broyden(memory=...)", self.memory)
        if self.replay is not None:
            _count("Broyden(replay=...)", self.replay)
            if self.replay > self.memory:
                raise ValueError(
                    f"Broyden(replay=...) must be at most memory={self.memory}, got "
                    f"{self.replay!r}"
                )

    @property
    def name(self) -> str:
        return "broyden"

    @property
    def pairs_replayed(self) -> int:
        """Secant pairs replayed at a restart: ``replay``, or ``memory // 2`` (at least 1)."""
        return max(1, self.memory // 2) if self.replay is None else self.replay


Solver = Iterate | Anderson | Broyden
SOLVERS: dict[str, type] = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden}
_DEFAULT_SOLVERS: dict[str, Solver] = {name: cls() for name, cls in SOLVERS.items()}  # frozen


def as_solver(value: Any) -> Solver:
    """The solver value for a shortcut (``"iterate"``, ``"anderson"``, ``"broyden"``) or a value."""
    if isinstance(value, (Iterate, Anderson, Broyden)):
        return value
    if isinstance(value, str) and value in SOLVERS:
        return _DEFAULT_SOLVERS[value]
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"unknown solver {value!r}; use one of {', '.join(map(repr, SOLVERS))} or a value "
        "rbp.Iterate(damping=...), rbp.Anderson(m=..., beta=..., ridge=...) or "
        "rbp.Broyden(memory=..., replay=...)"
    )


# --------------------------------------------------------------------------- the row solve


@dataclass
class RowSolve:
    """Result of :func:`solve`: per row, the stopping iterate ``x``, ``F(x)`` and statistics."""

    x: Tensor  # (b, n) where each row stopped (or its best iterate)
    fx: Tensor  # (b, n) F(x), computed without a graph
    evaluations: list[int]  # evaluations of F spent on each row
    residual: list[float]  # ||F(x) - x|| per row
    scale: list[float]  # ||F(x)|| per row
    reached: list[bool]  # the tolerance held at x
    best: list[bool]  # x is an earlier, lower-residual iterate than the last one
    fallbacks: int  # row-iterations where the accelerated step was replaced by a plain step
    row_updates: int  # sum over iterations of the number of live rows
    trace: list[float]  # ||F(x_k) - x_k|| over the live rows, per iteration (if asked)


def _row_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


class _AndersonState:
    """Ring buffers of the last ``m`` points ``y_i = x_i + beta g_i`` and residuals ``g_i``, and
    their Gram matrix ``gram[i, j] = g_i . g_j``, updated by one row and column per step (slot
    order: the solution does not depend on the order of the terms)."""

    def __init__(self, cfg: Anderson, x: Tensor, max_evals: int | None = None) -> None:
        b, n = x.shape
        # a solve of max_evals evaluations stores at most that many iterates: same steps,
        # buffers of what it can use (Anderson(m=10**8) with steps=5 asked for 80 GB)
        self.m = cfg.m if max_evals is None else max(1, min(cfg.m, max_evals))
        self.beta = cfg.beta
        # The Gram matrix and its solve are float64 whatever the state's dtype; its ridge and
        # conditioning limit follow float64, or a half state's coarser precision.
        self.low = x.dtype in (torch.float16, torch.bfloat16)
        small = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        eps = torch.finfo(x.dtype if self.low else small).eps
        self.ridge = math.sqrt(eps) if cfg.ridge is None else cfg.ridge
        # cond(G) = (max / min diag of its Cholesky factor)^2 <= 1 / (100 eps)
        self.max_diag_ratio = 1.0 / math.sqrt(100.0 * eps)
        self.ys = x.new_zeros(b, self.m, n)
        self.gs = x.new_zeros(b, self.m, n)
        self.gram = x.new_zeros(b, self.m, self.m, dtype=small)
        self.ridge_eye = self.ridge * torch.eye(self.m, dtype=small, device=x.device)
        self.ones = x.new_ones(1, self.m, 1, dtype=small).expand(b, -1, -1)
        self.k = 0

    def keep(self, rows: Tensor) -> None:
        self.ys, self.gs, self.gram = self.ys[rows], self.gs[rows], self.gram[rows]

    def step(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        g = fx - x if g is None else g
        plain = fx if self.beta == 1.0 else x + self.beta * g
        slot = self.k % self.m
        self.ys[:, slot], self.gs[:, slot] = plain, g
        self.k += 1
        mk = min(self.k, self.m)
        gs = self.gs[:, :mk]
        # g_i . g for the slots in use as (1, n) @ (n, mk): on CPU ~10x faster than (mk, n) @ (n, 1)
        if self.low:
            row = torch.bmm(g.float()[:, None], gs.float().transpose(1, 2))
        else:
            row = torch.bmm(g[:, None], gs.transpose(1, 2))  # (b, 1, mk)
        self.gram[:, slot : slot + 1, :mk] = row
        self.gram[:, :mk, slot : slot + 1] = row.transpose(1, 2)
        if mk == 1:
            return plain, None
        gram = self.gram[:, :mk, :mk]
        # G + ridge * mean(diag G) I = L L^T; w = G^-1 1 = L^-T y with y = L^-1 1, so that
        # 1^T w = y^T y and a = w / (y^T y)
        mean_diag = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        gram = torch.addcmul(gram, mean_diag[:, None, None], self.ridge_eye[:mk, :mk])
        chol, status = torch.linalg.cholesky_ex(gram)
        d_min, d_max = torch.aminmax(chol.diagonal(dim1=1, dim2=2), dim=1)
        y = torch.linalg.solve_triangular(chol, self.ones[: len(chol), :mk], upper=False)
        w = torch.linalg.solve_triangular(chol.mT, y, upper=True)
        alpha = (w / (y * y).sum(1, keepdim=True)).mT.to(x.dtype)  # (b, 1, mk)
        cand = torch.bmm(alpha, self.ys[:, :mk])[:, 0]  # sum_i a_i (x_i + beta g_i)
        # A row whose system failed or is ill-conditioned (False for NaN too), or whose mix is
        # not finite (garbage weights, or an overflow: s - s is NaN unless s is finite), takes
        # the plain step.
        s = cand.sum(1)
        bad = ~((status == 0) & (d_max <= self.max_diag_ratio * d_min) & (s - s == 0))
        return _replace_rows(bad, plain, cand), bad


def _replace_rows(bad: Tensor, value: Tensor, x: Tensor) -> Tensor:
    """``x`` with the rows flagged in ``bad`` replaced by those of ``value``.

    On CPU the flag is read first (a read costs nothing there) so the copy is skipped when no
    row is bad; on other devices it always selects, so that a step needs no host sync.
    """
    if x.device.type != "cpu" or bool(bad.any()):
        return torch.where(bad[:, None], value, x)
    return x


class _BroydenState:
    """``H = -I + sum_j u_j v_j^T`` (rows of ``us``/``vs``), the good-Broyden inverse Jacobian of
    ``g``, and a ring of the last ``replay`` secant pairs ``(dx, dg)`` to rebuild it from."""

    def __init__(self, cfg: Broyden, x: Tensor, max_evals: int | None = None) -> None:
        b, n = x.shape
        # at most one term and one pair per evaluation: a memory beyond max_evals is never
        # full (no rebuild), so the buffers are sized by what the solve can use
        cap = cfg.memory if max_evals is None else max(1, min(cfg.memory, max_evals))
        self.memory = cap
        self.replay = cfg.pairs_replayed if cap == cfg.memory else min(cfg.pairs_replayed, cap)
        self.us = x.new_zeros(b, self.memory, n)
        self.vs = x.new_zeros(b, self.memory, n)
        self.dxs = x.new_zeros(b, self.replay, n)
        self.dgs = x.new_zeros(b, self.replay, n)
        self.k = 0  # terms in use
        self.pairs = 0  # secant pairs seen (the ring holds the last min(pairs, replay))
        self.tiny = 1e3 * torch.finfo(x.dtype).eps
        self.max_cond = 1.0 / (100.0 * torch.finfo(x.dtype).eps)
        self.prev: tuple[Tensor, Tensor, Tensor] | None = None  # (dx, g, H g) of the last step

    def keep(self, rows: Tensor) -> None:
        self.us, self.vs = self.us[rows], self.vs[rows]
        self.dxs, self.dgs = self.dxs[rows], self.dgs[rows]
        if self.prev is not None:
            self.prev = tuple(t[rows] for t in self.prev)  # type: ignore[assignment]

    def _h(self, y: Tensor) -> Tensor:
        """``H y = -y + U^T (V y)``, using the ``k`` terms in use."""
        if self.k == 0:
            return -y
        us, vs = self.us[:, : self.k], self.vs[:, : self.k]
        coef = torch.bmm(y[:, None], vs.transpose(1, 2))  # (b, 1, k), the fast orientation
        return torch.baddbmm(y[:, None], coef, us, beta=-1)[:, 0]

    def _ht(self, y: Tensor) -> Tensor:
        """``H^T y = -y + V^T (U y)``."""
        if self.k == 0:
            return -y
        us, vs = self.us[:, : self.k], self.vs[:, : self.k]
        coef = torch.bmm(y[:, None], us.transpose(1, 2))
        return torch.baddbmm(y[:, None], coef, vs, beta=-1)[:, 0]

    def _update(self, dx: Tensor, dg: Tensor, h_dg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append the good-Broyden term making ``H dg = dx``: ``u = (dx - H dg) / (v . dg)``,
        ``v = H^T dx``; a row whose denominator vanishes gets a zero term (skipped)."""
        v = self._ht(dx)
        denom = (v * dg).sum(1, keepdim=True)
        # |v . dg| <= |v| |dg|: a non-finite denominator has a non-finite size, and NaN > x is
        # False, so this one test also refuses those rows
        ok = denom.abs() > self.tiny * (_row_norm(v) * _row_norm(dg))[:, None]
        u = torch.where(ok, (dx - h_dg) / torch.where(ok, denom, 1.0), 0.0)
        v = torch.where(ok, v, 0.0)
        self.us[:, self.k], self.vs[:, self.k] = u, v
        self.k += 1
        return u, v, ~ok[:, 0]

    def _rebuild(self) -> Tensor:
        """``H`` from ``-I`` by good Broyden over the last ``r`` pairs, in compact form: with the
        pairs as rows of ``S`` (dx) and ``Y`` (dg), ``H = -I - (S + Y)^T R^{-1} S`` where
        ``R = -S Y^T - tril(S S^T, -1)`` (Byrd, Nocedal and Schnabel 1994), so
        ``u = R^{-T} (S + Y)`` and ``v = -s``: three batched products instead of ``r`` sequential
        updates. A row whose ``R`` is singular or ill-conditioned keeps only the newest pair's
        term (a fallback)."""
        r = min(self.pairs, self.replay)
        first = self.pairs - r
        if first % self.replay == 0:  # the ring is in order (memory = 2 replay: every restart)
            sm, ym = self.dxs[:, :r], self.dgs[:, :r]
        else:
            idx = torch.tensor([(first + j) % self.replay for j in range(r)],
                               device=self.us.device)
            sm, ym = self.dxs.index_select(1, idx), self.dgs.index_select(1, idx)  # oldest first
        low = sm.dtype in (torch.float16, torch.bfloat16)
        s32, y32 = (sm.float(), ym.float()) if low else (sm, ym)
        big = -torch.bmm(s32, y32.transpose(1, 2)) - torch.bmm(s32, s32.transpose(1, 2)).tril(-1)
        # a non-finite pair (an iterate that overflowed between two stopping tests) would make
        # svdvals raise: such a row is bad (the next stopping test reports the divergence)
        finite = torch.isfinite(big.sum((1, 2)))
        big = torch.where(finite[:, None, None], big, 0.0)
        inv_t, status = torch.linalg.inv_ex(big.transpose(1, 2))  # R^{-T}
        sv = torch.linalg.svdvals(big)
        bad = (status != 0) | ~(sv[:, -1] * self.max_cond >= sv[:, 0]) | ~torch.isfinite(
            inv_t.sum((1, 2))) | ~finite
        newest = torch.zeros_like(inv_t)
        newest[:, -1, -1] = 1.0 / big[:, -1, -1]  # a row of one term: R = -s . y over that pair
        ok_one = (big[:, -1, -1].abs() > self.tiny * _row_norm(sm[:, -1]).to(big.dtype)
                  * _row_norm(ym[:, -1]).to(big.dtype)) & torch.isfinite(big[:, -1, -1])
        newest = torch.where(ok_one[:, None, None], newest, 0.0)
        inv_t = torch.where(bad[:, None, None], newest, inv_t).to(sm.dtype)
        self.us[:, :r] = torch.baddbmm(torch.bmm(inv_t, sm), inv_t, ym)
        self.vs[:, :r] = -sm
        self.k = r
        return bad

    def step(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        g = fx - x if g is None else g
        skipped: Tensor | None = None
        if self.prev is None:
            hg = -g
        else:
            dx, g_old, hg_old = self.prev
            dg = g - g_old
            slot = self.pairs % self.replay
            self.dxs[:, slot], self.dgs[:, slot] = dx, dg
            self.pairs += 1
            if self.k == self.memory:  # full: good Broyden from -I over the last pairs
                skipped = self._rebuild()
                hg = self._h(g)
            else:
                # H g_old is known from the last step, so one product H g gives H dg as well,
                # and the new term then gives H' g = H g + u (v . g) without another product
                hg = self._h(g)
                u, v, skipped = self._update(dx, dg, hg - hg_old)
                hg = hg + u * (v * g).sum(1, keepdim=True)
        dx = -hg
        bad = ~torch.isfinite(dx.sum(1))  # non-finite if any entry is (or on overflow)
        dx = _replace_rows(bad, g, dx)
        self.prev = (dx, g, _replace_rows(bad, -g, hg))
        return x + dx, bad if skipped is None else skipped | bad


class _IterateState:
    def __init__(self, cfg: Iterate, x: Tensor) -> None:
        self.damping = cfg.damping

    def keep(self, rows: Tensor) -> None:
        pass

    def step(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out = fx if self.damping == 0.0 else torch.lerp(fx, x, self.damping)
        return out, None  # no safeguard: nothing to count


def _solver_state(
    cfg: Solver, x: Tensor, max_evals: int | None = None
) -> _IterateState | _AndersonState | _BroydenState:
    if isinstance(cfg, Anderson):
        return _AndersonState(cfg, x, max_evals)
    if isinstance(cfg, Broyden):
        return _BroydenState(cfg, x, max_evals)
    return _IterateState(cfg, x)


def solve(
    fmap: RowMap,
    x0: Tensor,
    solver: Solver,
    *,
    max_evals: int,
    tol: float | None,
    tol_mode: str = "relative",
    check_every: int = 1,
    best_iterate: bool = False,
    trace: bool = False,
    fx0: Tensor | None = None,
    what: str = "forward",
) -> RowSolve:
    """Run ``solver`` on the rows of ``x0`` until each row's residual meets ``tol`` or
    ``max_evals`` evaluations of F are spent.

    ``fmap(x, rows)`` evaluates F on the live rows ``rows`` (``None``: all rows, in order). The
    stopping rule is tested (one host synchronisation) every ``check_every`` iterations and at
    the last; a row that meets it is written out and removed. Non-finite residuals raise
    :class:`DivergenceError`. Runs without a graph.
    """
    with torch.no_grad():
        return _solve(fmap, x0, solver, max_evals, tol, tol_mode, check_every, best_iterate,
                      trace, fx0, what)


def _solve(
    fmap: RowMap,
    x0: Tensor,
    cfg: Solver,
    max_evals: int,
    tol: float | None,
    tol_mode: str,
    check_every: int,
    best_iterate: bool,
    trace: bool,
    fx0: Tensor | None,
    what: str,
) -> RowSolve:
    b = x0.shape[0]
    device = x0.device
    out_x, out_fx = torch.empty_like(x0), torch.empty_like(x0)
    out_res = x0.new_zeros(b)
    out_scale = x0.new_zeros(b)
    out_evals = torch.zeros(b, dtype=torch.long, device=device)
    out_best = torch.zeros(b, dtype=torch.bool, device=device)
    reached = torch.zeros(b, dtype=torch.bool, device=device)
    live: Tensor | None = None  # None: all rows, in order
    x = x0
    fx = fmap(x, None) if fx0 is None else fx0
    state = _solver_state(cfg, x, max_evals)
    autocast = not isinstance(state, _IterateState) and _autocast_enabled(device.type)
    if best_iterate:
        best = (x.clone(), fx.clone(), _row_norm(fx - x), torch.zeros(b, dtype=torch.long,
                                                                     device=device))
    fallbacks = x0.new_zeros((), dtype=torch.long)
    row_updates, n_live = b, b
    norms: list[Tensor] = []
    k = 0  # x is the k-th iterate; k + 1 evaluations spent on each live row
    while True:
        g = fx - x
        res = _row_norm(g)
        if trace:
            norms.append(torch.linalg.vector_norm(res))
        if best_iterate:
            bx, bfx, bres, bk = best
            better = res < bres
            best = (
                torch.where(better[:, None], x, bx),
                torch.where(better[:, None], fx, bfx),
                torch.where(better, res, bres),
                torch.where(better, k, bk),
            )
        last = k + 1 >= max_evals
        if last or (tol is not None and (k + 1) % check_every == 0):
            if not bool(torch.isfinite(res).all()):
                raise DivergenceError(
                    f"{what}: the forward state is not finite after {k + 1} steps: the map "
                    "diverges. Check that f is a contraction (e.g. smaller weights or a damped "
                    "update), or use a safer solver."
                )
            scale = _row_norm(fx)
            if tol is None:
                met = torch.zeros_like(res, dtype=torch.bool)
            else:
                met = res <= (tol * scale if tol_mode == "relative" else res.new_tensor(tol))
            done = torch.ones_like(met) if last else met
            if bool(done.any()):
                if best_iterate:
                    bx, bfx, bres, bk = best
                    x_, fx_, res_, flag = bx, bfx, bres, bk != k
                    scale_ = _row_norm(bfx)
                    if tol is not None:
                        met = res_ <= (tol * scale_ if tol_mode == "relative" else tol)
                else:
                    x_, fx_, res_, flag, scale_ = x, fx, res, torch.zeros_like(met), scale
                idx = done.nonzero()[:, 0]
                rows = idx if live is None else live[idx]
                out_x[rows], out_fx[rows] = x_[idx], fx_[idx]
                out_res[rows], out_scale[rows] = res_[idx], scale_[idx]
                out_evals[rows] = k + 1
                out_best[rows] = flag[idx]
                reached[rows] = met[idx]
                keep = (~done).nonzero()[:, 0]
                n_live = int(keep.numel())
                if n_live == 0:
                    break
                live = keep if live is None else live[keep]
                x, fx, g = x[keep], fx[keep], g[keep]
                state.keep(keep)
                if best_iterate:
                    best = tuple(t[keep] for t in best)  # type: ignore[assignment]
        if autocast:  # the solver's own arithmetic stays in the state's dtype; f keeps autocast
            with torch.autocast(device.type, enabled=False):
                x, bad = state.step(x, fx, g)
        else:
            x, bad = state.step(x, fx, g)  # bad: the rows that fell back (None: none can)
        if bad is not None:
            fallbacks = fallbacks + bad.sum()
        k += 1
        fx = fmap(x, live)
        row_updates += n_live
    return RowSolve(
        x=out_x,
        fx=out_fx,
        evaluations=out_evals.tolist(),
        residual=out_res.double().tolist(),
        scale=out_scale.double().tolist(),
        reached=reached.tolist(),
        best=out_best.tolist(),
        fallbacks=int(fallbacks),
        row_updates=row_updates,
        trace=torch.stack(norms).double().tolist() if norms else [],
    )


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch >= 2.4 API, else the old one)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: one flag per device kind
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


# ---------------------------------------------------------------------- states as row matrices


@dataclass(frozen=True)
class Layout:
    """How the leaves of a state map to the rows of a ``(b, n)`` matrix and back."""

    spec: Any
    shapes: tuple[tuple[int, ...], ...]  # full shape of each leaf
    dims: tuple[int, ...] | None  # batch dim of each leaf (None: one row, the whole state)
    sizes: tuple[int, ...]  # numel of one row of each leaf
    batch: int


def layout(leaves: Sequence[Tensor], spec: Any, batch_dim: int | None) -> Layout:
    """Check the leaves for a row solve (one dtype and device; one batch size) and describe them."""
    first = leaves[0]
    for i, leaf in enumerate(leaves):
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise TypeError(
                f"a forward solve needs every state leaf of one dtype and device; leaf {i} is "
                f"{leaf.dtype} on {leaf.device}, leaf 0 {first.dtype} on {first.device}"
            )
    shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    if batch_dim is None:
        return Layout(spec, shapes, None, tuple(leaf.numel() for leaf in leaves), 1)
    dims, batch = tree.batch_axes(leaves, batch_dim)
    sizes = tuple(leaf.numel() // batch for leaf in leaves)
    return Layout(spec, shapes, dims, sizes, batch)


def to_rows(leaves: Sequence[Tensor], lay: Layout) -> Tensor:
    """``(b, n)`` matrix of the leaves: one row per sample (or one row in all)."""
    if lay.dims is None:
        parts = [leaf.reshape(1, -1) for leaf in leaves]
    else:
        parts = [
            leaf.movedim(d, 0).reshape(leaf.shape[d], -1)
            for leaf, d in zip(leaves, lay.dims, strict=True)
        ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def from_rows(x: Tensor, lay: Layout) -> list[Tensor]:
    """Leaves of the rows ``x`` (any number of rows when there is a batch dim)."""
    parts = [x] if len(lay.sizes) == 1 else list(x.split(lay.sizes, dim=1))
    if lay.dims is None:
        return [p.reshape(s) for p, s in zip(parts, lay.shapes, strict=True)]
    out = []
    for p, s, d in zip(parts, lay.shapes, lay.dims, strict=True):
        rest = s[:d] + s[d + 1 :]
        out.append(p.reshape(x.shape[0], *rest).movedim(0, d))
    return out


# --------------------------------------------------------------------------- calling f safely


def _leaves_of(state: State) -> list[Tensor]:
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(state) if isinstance(leaf, Tensor)]


def call_map(fn: Callable[..., State], h: State, *args: Any) -> State:
    """``fn(h, *args)``, refusing an ``fn`` that modifies its input state in place."""
    if isinstance(h, Tensor):  # the common case, kept cheap: it runs once per step
        # an inference tensor (torch.inference_mode) has no version counter: nothing to compare
        # (Dynamo cannot trace is_inference; a compiled call has no inference tensors)
        if not _is_compiling() and h.is_inference():
            return fn(h, *args)
        version = h._version
        out = fn(h, *args)
        if h._version != version:
            _raise_in_place(0)
        return out
    leaves = _leaves_of(h)
    if not _is_compiling():
        leaves = [leaf for leaf in leaves if not leaf.is_inference()]
    versions = [leaf._version for leaf in leaves]
    out = fn(h, *args)
    for i, (leaf, v) in enumerate(zip(leaves, versions, strict=True)):
        if leaf._version != v:
            _raise_in_place(i)
    return out


def _raise_in_place(i: int) -> None:
    raise ValueError(
        f"f modified its input state in place (leaf {i}); fixed_point keeps earlier states, so "
        "f must return new tensors: write h = h + x, not h += x or h.add_(x)"
    )


def _slice_inputs(inputs: Sequence[Tensor], dims: Sequence[int], rows: Tensor | None) -> list:
    if rows is None:
        return list(inputs)
    return [x.index_select(d, rows) for x, d in zip(inputs, dims, strict=True)]


def check_inputs(inputs: Any, batch_dim: int | None, batch: int | None) -> tuple[list, list[int]]:
    """Validate ``inputs=``: a tuple/list of tensors, each with the batch along ``batch_dim``."""
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(
            f"inputs must be a tuple or list of tensors passed to f(h, *inputs), got "
            f"{type(inputs).__name__}"
        )
    dims = []
    for i, x in enumerate(inputs):
        if batch_dim is None:
            dims.append(0)
            continue
        if not isinstance(x, Tensor):
            raise TypeError(
                f"inputs[{i}] is a {type(x).__name__}; with batch_dim every input must be a "
                "tensor holding the batch along batch_dim (close over anything else in f)"
            )
        if not -x.dim() <= batch_dim < x.dim() or x.shape[batch_dim % x.dim()] != batch:
            raise ValueError(
                f"inputs[{i}] of shape {tuple(x.shape)} does not hold the {batch} samples of the "
                f"state along batch_dim={batch_dim}"
            )
        dims.append(batch_dim % x.dim())
    return list(inputs), dims


def check_rows_independent(fmap: RowMap, x0: Tensor, fx0: Tensor, batch_dim: int) -> None:
    """Refuse an f that mixes samples, or that is random, before a per-sample solve.

    One evaluation beyond ``fx0 = F(x0)``: F on the sub-batch of samples ``[b-1, 0]``, with
    sample ``b-1`` moved in a random direction, must give sample 0 the row it has in ``fx0``.
    That catches per-sample tensors closed over instead of passed as ``inputs`` and mixing
    through h (a batch mean, a flip), also from equal rows such as ``h0 = 0``, which an
    unmoved sub-batch would hide. A failure is told apart from a random f (dropout) by
    evaluating the sub-batch once more.
    """
    b = x0.shape[0]
    if b < 2:
        return
    rows = torch.tensor([b - 1, 0], device=x0.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    step = torch.randn(x0.shape[1], generator=gen, dtype=torch.float64)
    size = 0.1 * float(x0[b - 1].abs().amax().clamp_min(1.0))
    sub_in = x0[rows].clone()
    sub_in[0] += (size * step / step.norm().clamp_min(1e-30)).to(x0.dtype).to(x0.device)
    try:
        with torch.no_grad():
            sub = fmap(sub_in, rows)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reason attached
        raise ValueError(
            f"batch_dim={batch_dim}: f failed on a sub-batch of 2 samples ({exc}); per-sample "
            "stopping calls f on the live samples only, so f must treat samples independently "
            "and take per-sample inputs through inputs=(...). Use batch_dim=None to stop on "
            "the whole batch."
        ) from exc
    eps = torch.finfo(x0.dtype).eps
    limit = math.sqrt(eps) * fx0.abs().amax().clamp_min(1.0)
    err = (sub[1] - fx0[0]).abs().amax()
    if bool(err <= limit):
        return
    with torch.no_grad():
        again = fmap(sub_in, rows)
    if not bool((again - sub).abs().amax() <= limit):
        raise ValueError(
            f"batch_dim={batch_dim}: f is random (e.g. dropout): two calls on the same state "
            "differ. A fixed point of a random map is not defined; evaluate the model in "
            "eval mode (model.eval()) or fix the randomness inside f (e.g. one dropout mask "
            "drawn outside f and passed through inputs=(...))."
        )
    raise ValueError(
        f"batch_dim={batch_dim}: f mixes samples (f on samples [{b - 1}, 0], with sample "
        f"{b - 1} moved, gives sample 0 a row that differs from its row in f on the whole "
        f"batch by {err.item():.3g}). Per-sample stopping needs an f whose samples are "
        "independent (no batch norm or mean over the batch, no closed-over per-sample "
        "tensors: pass them as inputs=(...), which fixed_point slices). Use batch_dim=None "
        "to stop on the whole batch."
    )


# ------------------------------------------------------------------ the forward of fixed_point


@dataclass
class Forward:
    """What the forward hands to :func:`rbp.fixed_point`'s backward wiring."""

    h: State  # the returned state h_out (with the graph its method needs)
    h_in: list[Tensor]  # leaves at which the map was last applied (requires_grad if implicit)
    h_out: list[Tensor]  # leaves of h_out = F(h_in)
    spec: Any
    update: Callable[[State, int], State] | None = None  # F_t(h), as run() applied it
    # per row of the settle check: (||h_T - h_T-1||, ||h_T||), see row_differences
    rows: tuple[Any, ...] | None = None


def _diff_norm(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = sum((x.detach() - y.detach()).pow(2).sum() for x, y in zip(a, b, strict=True))
    return torch.as_tensor(total).sqrt().to("cpu", torch.float64)


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(sum(leaf.detach().double().pow(2).sum().item() for leaf in a))


def check_finite(leaves: Sequence[Tensor], method: str, steps: int) -> None:
    if not all(bool(torch.isfinite(leaf.detach()).all()) for leaf in leaves):
        raise DivergenceError(
            f"fixed_point: the forward state is not finite after {steps} steps: the map diverges. "
            "Check that f is a contraction (e.g. smaller weights or a damped update)."
        )


def is_plain(solver: Solver) -> bool:
    return isinstance(solver, Iterate) and solver.damping == 0.0


def unroll(
    step: Callable[[State, int], State],
    h0: State,
    steps: int,
    graph_steps: int,
    *,
    detach: bool,
    require_grad_input: bool,
    trace: bool,
    method: str,
    fast: Callable[[State], State] | None = None,
) -> tuple[Forward, list[float], float]:
    """The paper's forward: ``steps`` updates, the last ``graph_steps`` of them with a graph.

    Returns the forward, the differences ``||h_t - h_{t-1}||`` (all with ``trace``, else the
    last) and ``||h_T||``. ``detach`` cuts the graph to earlier steps; ``require_grad_input``
    makes the input of the graph steps a leaf with ``requires_grad`` (what the implicit methods
    differentiate). ``fast(h)``, if given, is the same update as ``step(h, t)`` without checks:
    it runs the steps between the first, the first graph step and the last, which ``step`` runs
    with the structure and in-place checks (f is one map, so checking each step again would
    only cost time).
    """
    h0_leaves, spec = tree.flatten(h0, "h0")
    free_steps = steps - graph_steps
    checked = sorted({0, free_steps, steps - 1})
    norms: list[Tensor] = []

    def advance(h: State, lo: int, hi: int) -> tuple[State, State]:
        """Steps ``lo .. hi-1``: the last state, and the input of the last checked step (of
        step ``hi-1`` when that is checked, as the last step always is)."""
        prev = h
        if fast is None or trace:
            for t in range(lo, hi):
                prev, h = h, step(h, t)
                if t in checked:
                    tree.check_same_structure(spec, h0_leaves, h, t)
                if trace:
                    norms.append(_diff_norm(tree.flatten(h)[0], tree.flatten(prev)[0]))
            return h, prev
        t = lo  # unchecked runs go through fast in a tight loop; prev is only kept at a
        try:  # checked step, and hi-1 is one
            for c in [c for c in checked if lo <= c < hi]:
                for _ in range(c - t):
                    h = fast(h)
                    t += 1
                prev, h = h, step(h, c)
                tree.check_same_structure(spec, h0_leaves, h, c)
                t = c + 1
            for _ in range(hi - t):
                h = fast(h)
                t += 1
        except Exception:
            # f failed on the output of an unchecked step: name a changed shape or dtype there
            tree.check_same_structure(spec, h0_leaves, h, t - 1)
            raise
        return h, prev

    with torch.no_grad():
        h, _ = advance(h0, 0, free_steps)
    h_in: list[Tensor] = []
    if require_grad_input:
        h_in = [leaf.detach().requires_grad_() for leaf in tree.flatten(h)[0]]
        h = tree.unflatten(spec, h_in)
    elif detach:
        h = tree.unflatten(spec, [leaf.detach() for leaf in tree.flatten(h)[0]])
    h, prev = advance(h, free_steps, steps)
    out = tree.flatten(h)[0]
    # one host read for the last difference, ||h_T|| and (through them) finiteness
    prev_leaves = tree.flatten(prev)[0]
    if len(out) == 1 and not trace:  # as _diff_norm and _norm compute them, fewer ops
        diff_value, norm_value, rows = _last_norms(out[0], prev_leaves[0], require_grad_input)
        values = [diff_value, norm_value**2]
    else:
        with torch.no_grad():
            if not trace:
                norms.append(_diff_norm(out, prev_leaves))
            squares = [leaf.double().pow(2).sum().to(norms[-1].device) for leaf in out]
            values = torch.stack([*norms, *squares]).tolist()
        rows = row_differences(out, prev_leaves) if require_grad_input else None
    diffs, squares = values[: len(values) - len(out)], values[len(values) - len(out) :]
    scale = math.sqrt(sum(squares))
    if not (math.isfinite(diffs[-1]) and math.isfinite(scale)):
        check_finite(out, method, steps)
    return Forward(h, h_in, out, spec, rows=rows), diffs, scale


def _unroll_tensor(
    f: Callable[..., State],
    h0: Tensor,
    inputs: tuple,
    steps: int,
    graph_steps: int,
    *,
    detach: bool,
    require_grad_input: bool,
    method: str,
) -> tuple[Forward, float, float]:
    """:func:`unroll` for a bare-tensor state and one map, without a trace: the same updates,
    checks (steps 0, the first graph step and the last) and norms, in fewer Python layers.

    Returns the forward, ``||h_T - h_{T-1}||`` and ``||h_T||``.
    """
    free = steps - graph_steps
    last = steps - 1

    def checked(h: Tensor, t: int) -> Tensor:
        out = call_map(f, h, *inputs)
        tree.check_same_structure(tree.LEAF, [h0], out, t)
        return out

    h = h0
    t = 0
    try:
        with torch.no_grad():
            for t in range(free):
                h = checked(h, t) if t == 0 else f(h, *inputs)
        h_in: list[Tensor] = []
        if require_grad_input:
            h = h.detach().requires_grad_()
            h_in = [h]
        elif detach:
            h = h.detach()
        prev = h
        for t in range(free, steps):
            if t in (free, last):
                prev, h = h, checked(h, t)
            else:
                h = f(h, *inputs)
    except Exception:
        # f failed on the output of step t-1, which was not checked (to save time): if that
        # changed the state's shape or dtype, say so instead of the error from inside f
        if t > 0:
            tree.check_same_structure(tree.LEAF, [h0], h, t - 1)
        raise
    diff_value, norm_value, rows = _last_norms(h, prev, require_grad_input)
    if not (math.isfinite(diff_value) and math.isfinite(norm_value)):
        check_finite([h], method, steps)
    return Forward(h, h_in, [h], tree.LEAF, rows=rows), diff_value, norm_value


def _last_norms(
    h: Tensor, prev: Tensor, want_rows: bool = False
) -> tuple[float, float, tuple[Tensor, Tensor] | None]:
    """``||h - prev||`` and ``||h||`` on the host (one read each on CPU, one in all elsewhere),
    in the state's dtype (no float64 copy of the state) unless ``||h||`` overflows it; and
    (``want_rows``), for a state of two or more dims, the same per row of dim 0 (left on the
    device: the settle check reads their worst ratio, see :func:`row_differences`)."""
    o = h.detach()  # detached rather than under no_grad: one op fewer
    d = o - prev.detach()
    diff = torch.linalg.vector_norm(d)
    norm = torch.linalg.vector_norm(o)
    rows = None
    if want_rows and o.dim() >= 2 and o.shape[0] > 1:
        # a row's scale is at least the rms row norm: a near-zero row of one system (a node
        # of a graph, say) is not held to its own tiny norm
        rows = (torch.linalg.vector_norm(d.reshape(o.shape[0], -1), dim=1),
                torch.linalg.vector_norm(o.reshape(o.shape[0], -1), dim=1).clamp_min(
                    norm / math.sqrt(o.shape[0])))
    if o.is_cpu:  # two reads cost less than stacking them
        diff_value, norm_value = diff.item(), norm.item()
    elif rows is not None:  # the worst row ratio in the same read (no extra sync on a GPU)
        diff_value, norm_value, worst = torch.stack(
            [diff.double(), norm.double(), _worst(rows).double()]).tolist()
        rows = (rows[0], rows[1], worst)  # type: ignore[assignment]
    else:
        diff_value, norm_value = torch.stack([diff.double(), norm.double()]).tolist()
    if not math.isfinite(norm_value):
        norm_value = torch.linalg.vector_norm(o, dtype=torch.float64).item()
    return diff_value, norm_value, rows


def row_differences(
    out: Sequence[Tensor], prev: Sequence[Tensor], lay: Layout | None = None
) -> tuple[Tensor, Tensor] | None:
    """``(||h_T - h_T-1||, ||h_T||)`` per row of the settle check (float64, on the device).

    The rows: with a batch layout ``lay``, one per sample (all leaves of that sample together);
    without, one per index of dim 0 of every leaf of two or more dims, and the whole leaf for a
    leaf of fewer (a batch-first state is then checked sample by sample even without
    ``batch_dim``), each row's ``||h_T||`` floored at the rms row norm of its leaf (a near-zero
    row of one system is not held to its own tiny norm). ``None`` when the whole state is a
    single row (the whole-state ratio).
    """
    wide = torch.float32 if out[0].device.type == "mps" else torch.float64  # MPS: no float64
    if lay is not None and lay.dims is not None:
        with torch.no_grad():
            d = to_rows(out, lay) - to_rows(prev, lay)
            return (torch.linalg.vector_norm(d, dim=1, dtype=wide),
                    torch.linalg.vector_norm(to_rows(out, lay), dim=1, dtype=wide))
    if not any(o.dim() >= 2 and o.shape[0] > 1 for o in out) and len(out) == 1:
        return None
    diffs, norms = [], []
    with torch.no_grad():
        for o, p in zip(out, prev, strict=True):
            lead = o.shape[0] if o.dim() >= 2 else 1
            diffs.append(torch.linalg.vector_norm((o - p).reshape(lead, -1), dim=1,
                                                  dtype=wide))
            n = torch.linalg.vector_norm(o.reshape(lead, -1), dim=1, dtype=wide)
            norms.append(n.clamp_min(torch.linalg.vector_norm(n) / math.sqrt(lead)))
    return torch.cat(diffs), torch.cat(norms)


def _worst(rows: tuple[Tensor, ...]) -> Tensor:
    d, n = rows[0], rows[1]
    return torch.where(d > 0, d / n, 0.0).amax()  # d / 0 = inf: a zero row that moved


def worst_ratio(rows: tuple[Tensor, ...] | None, whole: float) -> float:
    """The largest per-row ``||h_T - h_T-1|| / ||h_T||`` (0 for a row that did not move; the
    whole-state ratio ``whole`` when there are no rows). One host read, none when the forward
    read it already (a third entry of ``rows``)."""
    if rows is None:
        return whole
    worst = rows[2] if len(rows) > 2 else float(_worst(rows))
    return max(worst, whole)


def unsettled_message(
    rows: tuple[Any, ...] | None,
    info: Any,
    settle_tol: float,
    tol: float | None,
    tol_mode: str,
    batch_dim: int | None,
) -> str | None:
    """The settle check's message (``None``: settled). A row is unsettled when its
    ``||h_T - h_T-1|| / ||h_T|| > settle_tol``, unless the forward's absolute tolerance
    (``tol_mode="absolute"``) holds for it: at a fixed point at or near zero the relative ratio
    says nothing, and the user's absolute tolerance is what "settled" means there."""
    absolute = tol if (tol is not None and tol_mode == "absolute") else None
    if rows is None:
        if absolute is not None and info.final_difference <= absolute:
            return None
        count = ""
        worst = info.relative_final_difference
        if not worst > settle_tol:
            return None
    else:
        d, n = rows[0], rows[1]
        ratio = torch.where(d > 0, d / n, 0.0)
        bad = ~(ratio <= settle_tol)
        if absolute is not None:
            bad = bad & ~(d <= absolute)
        k = int(bad.sum())
        if k == 0:
            return None
        first = int(bad.nonzero()[0, 0])
        worst = float(ratio[bad].amax())
        what = (f"samples (batch_dim={batch_dim})" if batch_dim is not None
                else "rows (dim 0 of the state)")
        count = f" in {k} of {len(ratio)} {what}, e.g. row {first}"
    return (
        f"the forward state has not settled after {steps_taken(info)} steps{count} "
        f"(||h_T - h_T-1|| / ||h_T|| = {worst:.3g} > settle_tol={settle_tol:g}); implicit "
        "gradients assume a fixed point. Run more steps (or set tol), or use "
        "method='bptt'/'tbptt'."
    )


def step_map(
    f: Callable[..., State],
    steps: int,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    inputs: Sequence[Any],
) -> Callable[[State, int], State]:
    """The update at step t, ``F_t(h)``: ``last_step(h, *inputs)`` at ``t = steps - 1`` when
    given, else ``f(h, t, *inputs)`` (``time_varying``) or ``f(h, *inputs)``."""

    def update(h: State, t: int) -> State:
        if t == steps - 1 and last_step is not None:
            return last_step(h, *inputs)
        return f(h, t, *inputs) if time_varying else f(h, *inputs)

    return update


def run(
    f: Callable[..., State],
    h0: State,
    steps: int,
    *,
    method: str,
    truncate: int,
    implicit: bool,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    tol: float | None,
    tol_mode: str,
    solver: Solver,
    batch_dim: int | None,
    inputs: Sequence[Any],
    best_iterate: bool,
    check_every: int,
    trace: bool,
    info: Any,
) -> Forward:
    """The forward of :func:`rbp.fixed_point`; fills the forward fields of ``info``.

    ``implicit``: the gradient method differentiates the fixed point (an adjoint is attached
    by the caller at ``(h_in, h_out)``); otherwise, with grad enabled, the method back-propagates
    through the updates (bptt, tbptt).
    """
    grad_on = torch.is_grad_enabled()
    if grad_on and not implicit and method not in ("bptt", "tbptt"):
        raise ValueError(
            f"method {method!r} is neither implicit nor 'bptt'/'tbptt': the forward does not "
            "know which updates to keep a graph for"
        )
    paper = tol is None and is_plain(solver) and batch_dim is None and not best_iterate
    graph_steps = truncate if method == "tbptt" else 1  # the updates that keep a graph
    if not grad_on or method == "bptt":
        graph_steps = steps
    if (
        paper and not trace and not time_varying and last_step is None
        and isinstance(h0, Tensor) and h0.is_floating_point() and isinstance(inputs, tuple)
    ):  # the paper's setting on a tensor state: what most training steps run
        info.solver = solver.name
        fwd, diff, scale = _unroll_tensor(
            f, h0, inputs, steps, graph_steps, detach=grad_on and method != "bptt",
            require_grad_input=grad_on and implicit, method=method,
        )
        _fill(info, diff, scale, [])
        info.forward_steps, info.forward_residual, info.row_updates = steps, diff, steps
        fwd.update = step_map(f, steps, time_varying, last_step, inputs)
        return _constant_if_nothing_to_differentiate(fwd)
    h0_leaves, spec = tree.flatten(h0, "h0")
    batch = layout(h0_leaves, spec, batch_dim).batch if batch_dim is not None else None
    inputs, in_dims = check_inputs(inputs, batch_dim, batch)
    info.solver = solver.name

    update = step_map(f, steps, time_varying, last_step, inputs)

    def step(h: State, t: int) -> State:
        return call_map(update, h, t)

    if paper:
        fast = None
        if not time_varying:
            fast = (lambda h: f(h, *inputs)) if inputs else f
        fwd, diffs, scale = unroll(
            step, h0, steps, graph_steps, detach=grad_on and method != "bptt",
            require_grad_input=grad_on and implicit, trace=trace, method=method, fast=fast,
        )
        _fill(info, diffs[-1], scale, diffs if trace else [])
        info.forward_steps, info.forward_residual = steps, diffs[-1]
        info.row_updates = steps
        fwd.update = update
        return _constant_if_nothing_to_differentiate(fwd)

    if grad_on and not implicit:
        return _unroll_to_tol(step, h0, steps, method, truncate, tol, tol_mode, solver,
                              check_every, trace, info)
    fwd = _solve_then_step(step, f, h0, steps, method, implicit and grad_on, time_varying,
                           last_step, tol, tol_mode, solver, batch_dim, inputs, in_dims,
                           best_iterate, check_every, trace, info)
    fwd.update = update
    return _constant_if_nothing_to_differentiate(fwd)


_COMPILER_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _is_compiling() -> bool:
    check = _COMPILER_IS_COMPILING  # torch >= 2.3
    if check is None:
        dynamo = sys.modules.get("torch._dynamo")  # torch 2.2: only if dynamo is loaded
        check = getattr(dynamo, "is_compiling", None) if dynamo is not None else None
    return bool(check()) if check is not None else False


def _constant_if_nothing_to_differentiate(fwd: Forward) -> Forward:
    """Detach ``h_out`` when its graph reaches no leaf but ``h_in`` (f uses no parameter).

    Then, as for any function of constants, the returned state does not require grad, instead
    of carrying an adjoint that would deliver gradients to nobody. The graph of the one step is
    walked on every call (it stops at the first parameter, ~1.5 us on a small map): a cache
    keyed by the map's code was wrong for two closures of one factory, one using a parameter.
    """
    outs = fwd.h_out
    if not fwd.h_in or not (outs[0].requires_grad or any(o.requires_grad for o in outs)):
        return fwd
    own = {id(leaf) for leaf in fwd.h_in}
    seen: set[int] = set()
    todo = [o.grad_fn for o in fwd.h_out if o.grad_fn is not None]
    while todo:
        for nxt, _ in todo.pop().next_functions:
            if nxt is None or id(nxt) in seen:
                continue
            seen.add(id(nxt))
            if type(nxt) is torch._C._functions.AccumulateGrad:  # a leaf: h_in or a weight
                if id(nxt.variable) not in own:  # reaches a parameter or an input: keep
                    return fwd
            else:
                todo.append(nxt)
    out = [o.detach() for o in fwd.h_out]
    return Forward(tree.unflatten(fwd.spec, out), [], out, fwd.spec, fwd.update, fwd.rows)


def _fill(info: Any, diff: float, scale: float, trace: list[float]) -> None:
    info.final_difference = diff
    info.relative_final_difference = diff / max(scale, 1e-30)
    info.forward_trace = trace


def _unroll_to_tol(
    step: Callable[[State, int], State],
    h0: State,
    steps: int,
    method: str,
    truncate: int,
    tol: float | None,
    tol_mode: str,
    solver: Solver,
    check_every: int,
    trace: bool,
    info: Any,
) -> Forward:
    """bptt / tbptt with a tolerance or damping: stop at tol, back-propagate through the updates.

    tbptt keeps the last ``truncate`` inputs (no graph) and recomputes those updates with a graph
    once it stops: memory O(K), the same gradient as keeping their graph all along.
    """
    assert isinstance(solver, Iterate)
    damping = solver.damping
    h0_leaves, spec = tree.flatten(h0, "h0")
    bptt = method == "bptt"
    window: deque[tuple[int, list[Tensor]]] = deque(maxlen=truncate)
    leaves = list(h0_leaves)
    norms: list[float] = []
    reached = False
    k = 0
    for k in range(steps):
        if not bptt:
            window.append((k, [leaf.detach() for leaf in leaves]))
        with torch.set_grad_enabled(bptt):
            out = step(tree.unflatten(spec, leaves), k)
            out_leaves = tree.check_same_structure(spec, h0_leaves, out, k)
        last = k + 1 == steps
        check = tol is not None and (last or (k + 1) % check_every == 0)
        if trace or check or last:
            diff = _diff_norm(out_leaves, leaves).item()
            norms.append(diff)
            if not math.isfinite(diff):
                check_finite(out_leaves, method, k + 1)
            if check:
                reached = diff <= (tol * _norm(out_leaves) if tol_mode == "relative" else tol)
            if last or reached:
                break
        with torch.set_grad_enabled(bptt):
            leaves = [o if damping == 0.0 else torch.lerp(o, h, damping)
                      for o, h in zip(out_leaves, leaves, strict=True)]
    h_in = leaves
    if not bptt:
        start, leaves = window[0]
        for j in range(start, k + 1):
            out = step(tree.unflatten(spec, leaves), j)
            out_leaves = tree.flatten(out)[0]
            if j < k:
                leaves = [o if damping == 0.0 else torch.lerp(o, h, damping)
                          for o, h in zip(out_leaves, leaves, strict=True)]
        h_in = leaves
    check_finite(out_leaves, method, k + 1)
    diff = _diff_norm(out_leaves, h_in).item()
    _fill(info, diff, _norm(out_leaves), norms if trace else [])
    info.forward_steps, info.forward_residual = k + 1, diff
    info.tol_reached = reached if tol is not None else None
    info.row_updates = k + 1
    return Forward(tree.unflatten(spec, out_leaves), [], out_leaves, spec)


def _solve_then_step(
    step: Callable[[State, int], State],
    f: Callable[..., State],
    h0: State,
    steps: int,
    method: str,
    attach: bool,
    time_varying: bool,
    last_step: Callable[..., State] | None,
    tol: float | None,
    tol_mode: str,
    solver: Solver,
    batch_dim: int | None,
    inputs: Sequence[Any],
    in_dims: Sequence[int],
    best_iterate: bool,
    check_every: int,
    trace: bool,
    info: Any,
) -> Forward:
    """Solve without a graph, then apply the map once more at the returned iterate ``h_in``."""
    h0_leaves, spec = tree.flatten(h0, "h0")
    lay = layout(h0_leaves, spec, batch_dim)
    calls = [0]
    expected: dict[int, list[Tensor]] = {}

    def fmap(x: Tensor, rows: Tensor | None) -> Tensor:
        leaves = from_rows(x, lay)
        h = tree.unflatten(spec, leaves)
        args = _slice_inputs(inputs, in_dims, rows)
        out = call_map(f, h, calls[0], *args) if time_varying else call_map(f, h, *args)
        calls[0] += 1
        if x.shape[0] not in expected:  # first call at this batch size: check fully
            tree.check_same_structure(spec, leaves, out, calls[0] - 1)
            expected[x.shape[0]] = leaves
        return to_rows(tree.flatten(out)[0], lay)

    x0 = to_rows([leaf.detach() for leaf in h0_leaves], lay)
    with torch.no_grad():
        fx0 = fmap(x0, None)
    if batch_dim is not None:
        check_rows_independent(fmap, x0, fx0, batch_dim)
    rs = solve(fmap, x0, solver, max_evals=steps, tol=tol, tol_mode=tol_mode,
               check_every=check_every, best_iterate=best_iterate, trace=trace, fx0=fx0,
               what="fixed_point")
    h_in = [leaf.detach() for leaf in from_rows(rs.x, lay)]
    if attach:
        h_in = [leaf.requires_grad_() for leaf in h_in]
    if attach or last_step is not None:
        t = steps - 1
        with torch.set_grad_enabled(attach):
            out = step(tree.unflatten(spec, h_in), t)
        out_leaves = tree.check_same_structure(spec, h0_leaves, out, t)
    else:
        out_leaves = from_rows(rs.fx, lay)
    check_finite(out_leaves, method, max(rs.evaluations))
    diff = _diff_norm(out_leaves, h_in).item()
    _fill(info, diff, _norm(out_leaves), rs.trace)
    rows = row_differences(out_leaves, h_in, lay) if attach else None
    per_sample = batch_dim is not None
    info.forward_steps = rs.evaluations if per_sample else rs.evaluations[0]
    info.forward_residual = rs.residual if per_sample else rs.residual[0]
    if tol is not None:
        info.tol_reached = rs.reached if per_sample else rs.reached[0]
    info.best_iterate = rs.best if per_sample else rs.best[0]
    info.solver_fallbacks = rs.fallbacks
    info.row_updates = rs.row_updates
    return Forward(tree.unflatten(spec, out_leaves), h_in if attach else [], out_leaves, spec,
                   rows=rows)


def steps_taken(info: Any) -> int:
    """Evaluations of F the forward spent (the slowest sample's, with ``batch_dim``)."""
    steps = info.forward_steps
    return max(steps) if isinstance(steps, list) else steps


def unreached_message(info: Any, tol: float, tol_mode: str, steps: int) -> str | None:
    """The on_failure message when ``tol`` was not reached (``None`` when it was)."""
    reached = info.tol_reached
    if reached is None:
        return None
    flags = reached if isinstance(reached, list) else [reached]
    missed = [i for i, ok in enumerate(flags) if not ok]
    if not missed:
        return None
    res = info.forward_residual if isinstance(info.forward_residual, list) else [
        info.forward_residual]
    worst = max(res[i] for i in missed)
    where = f" for {len(missed)} of {len(flags)} samples" if isinstance(reached, list) else ""
    hint = "try solver='anderson', " if info.solver == "iterate" else ""
    return (
        f"fixed_point: the forward did not reach tol={tol:g} ({tol_mode}) within steps={steps} "
        f"evaluations{where} (largest residual ||F(h) - h|| = {worst:.3g}, solver "
        f"{info.solver!r}). Raise steps, {hint}or loosen tol; best_iterate=True returns the "
        "lowest-residual iterate."
    )
