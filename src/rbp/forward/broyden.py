"""Limited-memory good Broyden per sample: the solver value and its state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rbp.diagnostics import check_count as _count
from rbp.forward.protocol import Stopping, _replace_rows, _row_norm

Tensor = torch.Tensor


@dataclass(frozen=True)
class Broyden(Stopping):
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
    # its state hands its final inverse-Jacobian estimate per sample to the backward
    # (:class:`rbp.linear.SHINE`): ``state.inverse_estimate()``
    gives_inverse_estimate = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _count("Broyden(memory=...)", self.memory)
        if self.replay is not None:
            _count("Broyden(replay=...)", self.replay)
            if self.replay > self.memory:
                raise ValueError(
                    f"Broyden(replay=...) must be at most memory={self.memory}, got "
                    f"{self.replay!r}"
                )

    def init(self, x: Tensor, max_evals: int | None = None) -> _BroydenState:
        """The state of one solve starting at the rows ``x`` (see :mod:`rbp.forward.protocol`)."""
        return _BroydenState(self, x, max_evals)

    @property
    def name(self) -> str:
        return "broyden"

    @property
    def pairs_replayed(self) -> int:
        """Secant pairs replayed at a restart: ``replay``, or ``memory // 2`` (at least 1)."""
        return max(1, self.memory // 2) if self.replay is None else self.replay


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
        # which sample each live row is, and the final terms of the samples that have left:
        # (samples, us, vs) per departure, the inverse estimate the backward may reuse
        self.samples = torch.arange(b, device=x.device)
        self.left: list[tuple[Tensor, Tensor, Tensor]] = []

    def keep(self, rows: Tensor) -> None:
        gone = torch.ones(self.samples.shape[0], dtype=torch.bool, device=rows.device)
        gone[rows] = False
        out = gone.nonzero()[:, 0]
        if out.numel():  # the leaving rows' terms: their final estimate (a copy of theirs only)
            self.left.append((self.samples[out], self.us[out, : self.k], self.vs[out, : self.k]))
        self.samples = self.samples[rows]
        self.us, self.vs = self.us[rows], self.vs[rows]
        self.dxs, self.dgs = self.dxs[rows], self.dgs[rows]
        if self.prev is not None:
            self.prev = tuple(t[rows] for t in self.prev)  # type: ignore[assignment]

    def inverse_estimate(self) -> InverseEstimate:
        """The final ``H ~ (dg/dx)^{-1}`` of every sample (those still live and those that
        left), assembled only when read: see :class:`InverseEstimate`."""
        return InverseEstimate(
            [*self.left, (self.samples, self.us[:, : self.k], self.vs[:, : self.k])],
            int(self.samples.shape[0]) + sum(int(s.shape[0]) for s, _, _ in self.left),
        )

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


class InverseEstimate:
    """A forward solve's final estimate ``H = -I + U^T V`` of the inverse Jacobian of
    ``g(x) = F(x) - x``, one per row of the forward (sample, or the whole state), in the
    forward's row layout (:func:`rbp.forward.to_rows`).

    ``parts``: ``(samples, us, vs)`` with the rows ``samples`` of the output and their terms
    ``us``, ``vs`` of shape ``(len(samples), k, n)`` (``k`` may differ between parts; a zero term
    adds nothing). Assembled into ``(b, k_max, n)`` factors on the first :meth:`factors` call.
    """

    def __init__(self, parts: list[tuple[Tensor, Tensor, Tensor]], rows: int) -> None:
        self.parts = parts
        self.rows = rows
        self._factors: tuple[Tensor, Tensor] | None = None

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(us, vs)`` of shape ``(rows, k, n)``, row i the terms of output row i."""
        if self._factors is None:
            k = max(u.shape[1] for _, u, _ in self.parts)
            ref = self.parts[-1][1]
            us = ref.new_zeros(self.rows, k, ref.shape[2])
            vs = torch.zeros_like(us)
            for samples, u, v in self.parts:
                us[samples, : u.shape[1]] = u
                vs[samples, : v.shape[1]] = v
            self._factors = (us, vs)
            self.parts = []
        return self._factors

    @property
    def rank(self) -> int:
        """The number of terms ``k`` (the most any row used)."""
        if self._factors is not None:
            return int(self._factors[0].shape[1])
        return max(int(u.shape[1]) for _, u, _ in self.parts)

    def transpose_apply(self, y: Tensor) -> Tensor:
        """``H^T y = -y + V^T (U y)`` per row, in ``y``'s dtype."""
        us, vs = self.factors()
        if us.shape[1] == 0:
            return -y
        if us.dtype != y.dtype or us.device != y.device:  # once: the backward's work dtype
            us, vs = us.to(y), vs.to(y)
            self._factors = (us, vs)
        coef = torch.bmm(y[:, None], us.transpose(1, 2))  # (b, 1, k)
        return torch.baddbmm(y[:, None], coef, vs, beta=-1)[:, 0]
