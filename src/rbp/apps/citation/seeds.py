"""Models for S seeds at once: one batched model, one sparse product, one optimiser step.

Seed ``s`` has its own weights (a leading seed dimension on every parameter), its own training
split and its own random draws; the seeds never interact, so the batched run equals the S runs
one by one (to round-off). The state is ``(S, N, H)``; one propagation step is

    m = A [h_1 ... h_S]                     (one sparse product over the seeds side by side)
    h_s <- GRU_s(m_s, h_s)                  (batched matrix products, per-seed weights)

and the loss is the sum of the seeds' losses, so each seed's gradient is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import rbp

from .model import (
    GGNN,
    PPRGNN,
    CSRPatternCache,
    _checks,
    _SparseFeatureMatmul,
    _with_backward_tol,
    is_sparse,
    symmetric_spmm,
)

__all__ = ["KRYLOV", "SeedBatchedGGNN", "SeedBatchedPPR", "SeededUniformRBP",
           "build_per_seed"]

#: Backward methods whose iterates couple the seeds unless each seed is solved on its own.
KRYLOV = ("cg", "gmres")


class SeedBatchedGGNN(nn.Module):
    """S independent GG-NNs ``h <- GRU_s(A h_s, h_s)``, ``logits_s = W_o,s h_s``, batched.

    ``from_seeds`` builds seed ``s``'s weights exactly as a single :class:`GGNN` built after
    ``torch.manual_seed(s)`` (on the CPU, so the draws do not depend on the device).
    """

    def __init__(self, hidden: int, num_classes: int, seeds: int) -> None:
        super().__init__()
        h3 = 3 * hidden
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(seeds, hidden, h3))   # W_ih^T per seed
        self.weight_hh = nn.Parameter(torch.empty(seeds, hidden, h3))
        self.bias_ih = nn.Parameter(torch.empty(seeds, 1, h3))
        self.bias_hh = nn.Parameter(torch.empty(seeds, 1, h3))
        self.weight_out = nn.Parameter(torch.empty(seeds, hidden, num_classes))
        self.bias_out = nn.Parameter(torch.empty(seeds, 1, num_classes))

    @property
    def seeds(self) -> int:
        return self.weight_ih.shape[0]

    @classmethod
    def from_seeds(cls, hidden: int, num_classes: int, seeds: list[int]) -> SeedBatchedGGNN:
        """One batched model whose seed ``i`` is ``GGNN(hidden, num_classes)`` under
        ``torch.manual_seed(seeds[i])``."""
        net = cls(hidden, num_classes, len(seeds))
        singles, _ = build_per_seed(seeds, lambda: GGNN(hidden, num_classes))
        net.load_singles(singles)
        return net

    @torch.no_grad()
    def load_singles(self, singles: list[GGNN]) -> None:
        """Copy the weights of one :class:`GGNN` per seed into this batched model."""
        if len(singles) != self.seeds:
            raise ValueError(f"{len(singles)} models for {self.seeds} seeds")
        def stack(get: Any) -> torch.Tensor:
            return torch.stack([get(m) for m in singles])
        self.weight_ih.copy_(stack(lambda m: m.cell.weight_ih.T))
        self.weight_hh.copy_(stack(lambda m: m.cell.weight_hh.T))
        self.bias_ih.copy_(stack(lambda m: m.cell.bias_ih[None]))
        self.bias_hh.copy_(stack(lambda m: m.cell.bias_hh[None]))
        self.weight_out.copy_(stack(lambda m: m.out.weight.T))
        self.bias_out.copy_(stack(lambda m: m.out.bias[None]))

    def gru_weights(self) -> tuple[torch.Tensor, ...]:
        """``(W_ih^T, W_hh^T, b_ih, b_hh)``, each with the seed dimension first."""
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    @staticmethod
    def step(adj: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        """One propagation step of every seed: ``h (S, N, H) -> GRU_s(A h_s, h_s)``, with
        seed ``s``'s weights ``w_ih[s], w_hh[s], b_ih[s], b_hh[s]``."""
        s, n, k = h.shape
        side_by_side = h.transpose(0, 1).reshape(n, s * k)           # [h_1 ... h_S]
        m = symmetric_spmm(adj, side_by_side).view(n, s, k).transpose(0, 1)
        gi = torch.baddbmm(b_ih, m, w_ih)
        gh = torch.baddbmm(b_hh, h, w_hh)
        i_r, i_z, i_n = gi.chunk(3, 2)
        h_r, h_z, h_n = gh.chunk(3, 2)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + r * h_n)
        return torch.lerp(cand, h, z)                                 # (1 - z) n + z h

    def forward(
        self, adj: torch.Tensor, h0: torch.Tensor, steps: int, method: Any, truncate: int,
        trace: bool = False, on_failure: str = "ignore",
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(S, N, C)`` after ``steps`` steps from ``h0`` ``(N, H)`` (every seed starts
        from the same PCA features), and the fixed-point info."""
        start = h0.expand(self.seeds, *h0.shape).contiguous()
        how: dict[str, Any] = {"truncate": truncate} if isinstance(method, str) else {}
        if method in KRYLOV:
            # each seed a sample (its weights the sample's inputs): the Krylov solve builds one
            # space per seed, as a run of that seed alone does; the other methods iterate each
            # seed's block on its own anyway
            how["batch_dim"] = 0
        h, info = rbp.fixed_point(
            lambda x, *w: self.step(adj, x, *w), start, steps, method=method,
            checks=_checks(on_failure, trace), return_info=True, inputs=self.gru_weights(),
            **how,
        )
        return torch.baddbmm(self.bias_out, h, self.weight_out), info


@dataclass
class SeededUniformRBP:
    """Original RBP (Alg. 1) from ``z_0 ~ U[0, 1]``, each seed drawing from its own generator.

    The paper's RBP starts from a uniform draw; in a batched run the draws of seed ``s`` come
    from ``generators[s]`` (CPU generators, so the draws do not depend on the device) and fill
    that seed's block of ``z_0``, as they would in a run of that seed alone.
    """

    max_iter: int
    generators: list[torch.Generator]
    shape: tuple[int, ...]          # the state's shape (S, N, H)

    def solve(self, matvec: Any, b: torch.Tensor) -> rbp.linear.Solution:
        draws = [torch.rand(self.shape[1:], generator=g, dtype=b.dtype)
                 for g in self.generators]
        z0 = torch.stack(draws).to(b.device).reshape(b.shape)
        return rbp.linear.fixed_point_iteration(matvec, b, max_iter=self.max_iter, z0=z0)


def build_per_seed(seeds: list[int], build: Any, device: torch.device | str = "cpu"
                   ) -> tuple[list[Any], list[torch.Generator]]:
    """``build()`` once per seed after ``torch.manual_seed(seed)`` (on the CPU), and a
    generator per seed on ``device`` for that seed's later draws: on the CPU it starts where
    the default generator stands after the build (the draws a lone run of the seed makes next);
    elsewhere it is seeded by the seed (a GPU draws other numbers than the CPU anyway). The
    default generator is left as it was."""
    state = torch.random.get_rng_state()
    built, gens = [], []
    try:
        for s in seeds:
            torch.manual_seed(s)
            built.append(build())
            gen = torch.Generator(device=device)
            if gen.device.type == "cpu":
                gen.set_state(torch.random.get_rng_state())
            else:
                gen.manual_seed(s)
            gens.append(gen)
    finally:
        torch.random.set_rng_state(state)
    return built, gens


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``F.dropout(x, p)`` drawing its mask from ``generator`` (the same ops, so the same mask
    as ``F.dropout`` from a default generator in that state)."""
    if p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep.div_(1.0 - p)


class SeedBatchedPPR(nn.Module):
    """S independent PPR fixed-point GNNs (:class:`PPRGNN`) batched: ``H_s = MLP_s(x)``,
    ``Z_s <- (1 - a) Â Z_s + a H_s`` for all seeds with one sparse product per step.

    Seed ``s``'s weights are those of ``PPRGNN`` built after ``torch.manual_seed(s)``, and its
    dropout masks come from ``generators[s]``, which starts where the default generator stands
    after that build: the masks a lone run of seed ``s`` draws (on the CPU), in the same order.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, seeds: int,
                 alpha: float, dropout: float) -> None:
        super().__init__()
        self.alpha, self.p = alpha, dropout
        self.w1 = nn.Parameter(torch.empty(seeds, hidden, in_features))
        self.b1 = nn.Parameter(torch.empty(seeds, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(seeds, hidden, num_classes))   # W_2^T per seed
        self.b2 = nn.Parameter(torch.empty(seeds, 1, num_classes))
        self.generators: list[torch.Generator] = []
        self._pattern = CSRPatternCache()

    @property
    def seeds(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def from_seeds(cls, in_features: int, hidden: int, num_classes: int, seeds: list[int],
                   alpha: float, dropout: float,
                   device: torch.device | str = "cpu") -> SeedBatchedPPR:
        """Seed ``i``'s weights as ``PPRGNN`` builds them after ``torch.manual_seed(seeds[i])``
        (on the CPU); its dropout generator on ``device`` (on a GPU seeded by the seed: a GPU
        draws other masks than the CPU anyway)."""
        net = cls(in_features, hidden, num_classes, len(seeds), alpha, dropout)
        singles, net.generators = build_per_seed(
            seeds, lambda: PPRGNN(in_features, hidden, num_classes, alpha, dropout), device)
        with torch.no_grad():
            for i, m in enumerate(singles):
                first, last = m.mlp[0].lin, m.mlp[3]
                net.w1[i].copy_(first.weight)
                net.b1[i, 0].copy_(first.bias)
                net.w2[i].copy_(last.weight.T)
                net.b2[i, 0].copy_(last.bias)
        return net

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``H (S, N, C) = W_2 drop(relu(drop(x) W_1^T + b_1)) + b_2`` per seed (sparse x)."""
        if not is_sparse(x):
            raise ValueError("SeedBatchedPPR takes sparse features (x.to_sparse())")
        pattern = self._pattern(x)
        hidden = []
        for i in range(self.seeds):
            values = pattern.values
            if self.training:
                values = _dropout(values, self.p, self.generators[i])
            h = torch.relu(_SparseFeatureMatmul.apply(values, self.w1[i], pattern)
                           + self.b1[i])
            if self.training:
                h = _dropout(h, self.p, self.generators[i])
            hidden.append(h)
        return torch.baddbmm(self.b2, torch.stack(hidden), self.w2)

    def step(self, adj: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``(1 - a) Â Z + a H`` for every seed, ``z`` and ``h`` of shape (S, N, C)."""
        s, n, c = z.shape
        side_by_side = z.transpose(0, 1).reshape(n, s * c)
        az = symmetric_spmm(adj, side_by_side).view(n, s, c).transpose(0, 1)
        return (1.0 - self.alpha) * az + self.alpha * h

    def forward(
        self, adj: torch.Tensor, x: torch.Tensor, steps: int, method: str, truncate: int,
        trace: bool = False, on_failure: str = "ignore", backward_tol: float | None = None,
        tol: float | None = None, warm: rbp.WarmStart | None = None,
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(S, N, C) = Z_T`` after ``steps`` steps from ``Z_0 = H``, and the info.

        The implicit methods solve each seed's adjoint (and, with ``tol``, its forward) on its
        own (``batch_dim=0``), so ``backward_tol`` and ``tol`` stop each seed as a lone run's
        solve stops. ``tol``: the forward stops at ``||F(Z) - Z|| <= tol ||F(Z)||`` (``steps``
        the budget). ``warm``: start from the fixed point of the last call that used it
        (``Z_0 = H`` on the first) and store this call's.
        """
        h = self.head(x)
        how: dict[str, Any] = {"truncate": truncate}
        if method not in ("bptt", "tbptt"):
            how["batch_dim"] = 0
            method = _with_backward_tol(method, truncate, backward_tol)
        if tol is not None:
            how["tol"] = tol
        start = h.detach() if warm is None else warm.h0(h.detach())
        z, info = rbp.fixed_point(
            lambda z, hh: self.step(adj, z, hh), start, steps, method=method,
            checks=_checks(on_failure, trace), return_info=True, inputs=(h,), **how,
        )
        if warm is not None:
            warm.update(z)
        return z, info
