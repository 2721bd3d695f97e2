"""Anderson acceleration (type II) per sample: the solver value and its state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rbp.diagnostics import check_count as _count
from rbp.diagnostics import check_real as _real
from rbp.forward.protocol import Stopping, _replace_rows

Tensor = torch.Tensor


@dataclass(frozen=True)
class Anderson(Stopping):
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
        super().__post_init__()
        _count("Anderson(m=...)", self.m)
        beta = _real("Anderson(beta=...)", self.beta)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Anderson(beta=...) must be in (0, 1], got {self.beta!r}")
        if self.ridge is not None and _real("Anderson(ridge=...)", self.ridge) < 0:
            raise ValueError(f"Anderson(ridge=...) must be >= 0 or None, got {self.ridge!r}")

    def init(self, x: Tensor, max_evals: int | None = None) -> _AndersonState:
        """The state of one solve starting at the rows ``x`` (see :mod:`rbp.forward.protocol`)."""
        return _AndersonState(self, x, max_evals)

    @property
    def name(self) -> str:
        return "anderson"


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
