"""Graph models of the citation experiment: a GG-NN (paper) and a feature-injected variant.

Both run ``h_{t+1} = F(h_t)`` for T propagation steps with :func:`rbp.fixed_point` and classify
each node from its final state ``logits = W_o h_T + b_o``.

* ``paper`` (GG-NN, Sec. 5.2): ``h_0 = PCA(x)``; ``m_t = A h_t`` (sum over neighbours);
  ``h_{t+1} = GRU(m_t, h_t)`` with weights tied over steps. The features enter only through
  ``h_0``, so a contractive update forgets them at the fixed point.
* ``injected`` (Eq. 1 proper): ``u = W_x dropout(x)``; ``m_t = Â h_t`` with the symmetric
  normalised adjacency with self loops ``Â = D^{-1/2}(A + I)D^{-1/2}``;
  ``h_{t+1} = GRU([m_t, u], h_t)``, so the fixed point ``h* = F(x, w, h*)`` depends on ``x``.
* ``ppr`` (APPNP-style personalised-PageRank fixed point): ``H = MLP(x)`` (class scores);
  ``Z_{t+1} = (1 - a) Â Z_t + a H``. ``dF/dZ = (1 - a) Â``, and ``||Â||_2 = 1``, so the update is
  a contraction of rate exactly ``1 - a`` and its fixed point ``Z* = a (I - (1-a) Â)^{-1} H``
  carries the features by construction.
* ``ignn`` (IGNN-style): ``U = B drop(x)``; ``Z_{t+1} = relu(Â Z_t W^T + U)`` with ``W`` kept at
  ``||W||_2 <= kappa``, so ``||dF/dZ||_2 <= ||W||_2 ||Â||_2 <= kappa`` (relu is 1-Lipschitz);
  ``logits = W_o drop(Z_T)``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from torch import nn
from torch.autograd.function import once_differentiable

import rbp

__all__ = [
    "CSRPatternCache",
    "GGNN",
    "IGNN",
    "InjectedGNN",
    "PPRGNN",
    "is_sparse",
    "normalised_adjacency",
    "pca_features",
    "row_normalise",
    "sparse_dropout_matmul",
    "sum_adjacency",
    "symmetric_spmm",
    "truncation_for",
]


def _csr(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse CSR ``(n, n)`` float32 matrix from COO ``index`` (2, E) and ``values`` (E,)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
        coo = torch.sparse_coo_tensor(index, values.float(), (n, n), check_invariants=True)
        return coo.coalesce().to_sparse_csr()


def sum_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sparse CSR ``A`` with ``A[i, j] = 1`` per edge ``j -> i``, so ``(A h)_i = sum_j h_j``;
    symmetric for an undirected edge list (every Planetoid graph: each edge both ways), as
    :func:`symmetric_spmm`, which the models use for its products, needs."""
    ei = torch.unique(edge_index, dim=1)
    return _csr(ei.flip(0), torch.ones(ei.shape[1]), num_nodes)


def normalised_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sparse CSR ``Â = D^{-1/2} (A + I) D^{-1/2}`` (GCN normalisation; spectral radius 1)."""
    loops = torch.arange(num_nodes).repeat(2, 1)
    idx = torch.unique(torch.cat([edge_index.flip(0), loops], dim=1), dim=1)  # no duplicates
    deg = torch.zeros(num_nodes).index_add_(0, idx[0], torch.ones(idx.shape[1]))
    dinv = deg.pow(-0.5)
    return _csr(idx, dinv[idx[0]] * dinv[idx[1]], num_nodes)


def pca_features(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Project node features on their first ``dim`` principal components.

    scikit-learn's randomized SVD (Halko et al.) with a fixed ``seed``: deterministic, and
    about 30x faster here than the exact solver on Cora's 2708 x 1433 features. BLAS runs on one
    thread, so the result does not depend on the machine's core count (multi-threaded BLAS sums
    in another order, and 2000 epochs amplify that last-bit difference).
    """
    x = features.numpy()
    with threadpool_limits(limits=1):
        z = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit_transform(x)
    # fix each component's sign (largest-magnitude loading positive) for reproducibility
    signs = np.sign(z[np.abs(z).argmax(axis=0), np.arange(dim)])
    signs[signs == 0] = 1.0
    return torch.from_numpy((z * signs).astype(np.float32))


class GGNN(nn.Module):
    """Paper model: ``h_{t+1} = GRU(A h_t, h_t)``, ``h_0 = PCA(x)``, ``logits = W_o h_T``."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.cell = nn.GRUCell(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def step(self, adj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One propagation step ``F(h) = GRU(A h, h)`` (``A`` symmetric: an undirected graph)."""
        return self.cell(symmetric_spmm(adj, h), h)

    def forward(
        self, adj: torch.Tensor, h0: torch.Tensor, steps: int, method: str, truncate: int,
        trace: bool = False, on_failure: str = "ignore",
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(N, C)`` after ``steps`` propagation steps, and the fixed-point info."""
        h, info = rbp.fixed_point(
            lambda s: self.step(adj, s), h0, steps, method=_uniform_rbp(method, truncate),
            truncate=truncate, checks=_checks(on_failure, trace), return_info=True,
        )
        return self.out(h), info


class InjectedGNN(nn.Module):
    """Injected: ``u = relu(W_x drop(x))``; ``h <- GRU([Â h, u], h)``; ``W_o drop(h_T)``."""

    def __init__(self, in_features: int, hidden: int, num_classes: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.hidden = hidden
        self.proj = nn.Linear(in_features, hidden)
        self.cell = nn.GRUCell(2 * hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(dropout)

    def step(self, adj: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One propagation step ``F(x, h) = GRU([Â h, u(x)], h)``."""
        return self.cell(torch.cat([symmetric_spmm(adj, h), u], dim=1), h)

    def forward(
        self, adj: torch.Tensor, x: torch.Tensor, steps: int, method: str, truncate: int,
        trace: bool = False, on_failure: str = "ignore",
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(N, C)`` from the state after ``steps`` steps (``h_0 = 0``), and the info."""
        u = torch.relu(self.proj(self.drop(x)))
        h0 = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype, device=x.device)
        h, info = rbp.fixed_point(
            lambda s: self.step(adj, u, s), h0, steps, method=_uniform_rbp(method, truncate),
            truncate=truncate, checks=_checks(on_failure, trace), return_info=True,
        )
        return self.out(self.drop(h)), info


def truncation_for(rate: float, bound: float) -> int:
    """Smallest K with Prop. 2's bound ``rate^(K+1) / (1 - rate) <= bound``.

    For ``||J|| <= rate < 1``, ``||sum_{t<=K} J^t - (I-J)^{-1}|| <= ||(I-J)^{-1}|| rate^(K+1)``
    and ``||(I-J)^{-1}|| <= 1 / (1 - rate)``.
    """
    _check_rate("rate", rate, "a contraction rate")
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    k = math.ceil(math.log(bound * (1.0 - rate)) / math.log(rate)) - 1
    return max(1, k)


def _uniform_rbp(method: Any, truncate: int) -> Any:
    """Original RBP in the paper's models starts from Alg. 1's ``z_0 ~ U[0, 1]`` (rbp's default
    start is zero), so their Table 1 rows keep the paper's algorithm."""
    return rbp.methods.from_name("rbp", truncate, init="uniform") if method == "rbp" else method


def _with_backward_tol(method: Any, truncate: int, value: float | None) -> Any:
    """The method with its backward solver stopping at ``value`` (relative increment or
    residual), or ``method`` itself when ``value`` is None or ``method`` back-propagates through
    the updates (bptt, tbptt: no backward solve)."""
    if value is None or not isinstance(method, str) or method in ("bptt", "tbptt"):
        return method
    return rbp.methods.from_name(method, truncate, tol=value)


def _checks(on_failure: str, trace: bool) -> rbp.Checks:
    """The checks of the apps' calls: report per ``on_failure``, record the trace if asked."""
    return rbp.Checks(on_failure=on_failure, trace=trace)


def row_normalise(features: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows summing to 0 are left at 0): ``x_i / sum_j x_ij``."""
    total = features.sum(1, keepdim=True)
    return features / torch.where(total == 0, torch.ones_like(total), total)


def _check_rate(name: str, value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) ({what}), got {value}")


class _SymmetricSpMM(torch.autograd.Function):
    """``A z`` for a symmetric sparse ``A``, whose vector-Jacobian product is ``A g`` again.

    torch's own backward of a CSR product transposes the matrix on every call (~200x the cost
    of the product on Cora); the implicit methods take dozens of such products per step.
    Twice differentiable (the backward is this same function), as CG-RBP's ``J v`` needs.
    """

    @staticmethod
    def forward(ctx: Any, adj: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, _SymmetricSpMM.apply(ctx.adj, grad)


def symmetric_spmm(adj: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``adj @ z`` for a constant symmetric sparse ``adj`` (e.g. :func:`normalised_adjacency`)."""
    return _SymmetricSpMM.apply(adj, z)


@dataclass(frozen=True)
class _CSRPattern:
    """Sparsity pattern of a constant sparse ``X`` (N, F) in CSR form, and of ``X^T`` (F, N):
    ``X^T``'s values are ``values[perm]`` for any values on ``X``'s pattern (e.g. after dropout).
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def of(x: torch.Tensor) -> _CSRPattern:
        """The pattern of a sparse COO or CSR matrix ``x``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            csr = x if x.layout == torch.sparse_csr else x.coalesce().to_sparse_csr()
        n, f = csr.shape
        crow, col = csr.crow_indices(), csr.col_indices()
        row = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())
        perm = torch.argsort(col * n + row)    # X^T in row-major order: by column, then row
        crow_t = torch.zeros(f + 1, dtype=crow.dtype, device=crow.device)
        crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=f), 0)
        return _CSRPattern(crow, col, csr.values(), crow_t, row[perm], perm, (n, f))

    def matrix(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``X`` (or ``X^T``) with ``values`` on this pattern."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if transpose:
                return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm],
                                               self.shape[::-1])
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape)


class _SparseFeatureMatmul(torch.autograd.Function):
    """``X W^T`` for a constant sparse ``X`` (values on a :class:`_CSRPattern`); the gradient
    ``dL/dW = (X^T G)^T`` is a CSR product with the precomputed transpose.

    torch's own backward of a sparse product rebuilds (COO) or transposes (CSR) ``X`` at every
    call: on Pubmed (19717 x 500, 1M non-zeros) ~10x the cost of the CSR product itself.
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, weight: torch.Tensor,
                pattern: _CSRPattern) -> torch.Tensor:
        # the (dropped) features are a constant input, held like the sparse X they replace
        # (not a saved tensor, so not counted as graph memory by saved_tensors_hooks)
        ctx.pattern, ctx.values = pattern, values
        return pattern.matrix(values) @ weight.T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        xt = ctx.pattern.matrix(ctx.values, transpose=True)
        return None, (xt @ grad.contiguous()).T, None


class CSRPatternCache:
    """The :class:`_CSRPattern` of the last sparse tensor seen, rebuilt when another one comes."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref[torch.Tensor], _CSRPattern] | None = None

    def __call__(self, x: torch.Tensor) -> _CSRPattern:
        if self._entry is None or self._entry[0]() is not x:
            self._entry = (weakref.ref(x), _CSRPattern.of(x))
        return self._entry[1]


def is_sparse(x: torch.Tensor) -> bool:
    """Whether ``x`` is a sparse COO or CSR tensor."""
    return x.layout in (torch.sparse_coo, torch.sparse_csr)


def sparse_dropout_matmul(pattern: _CSRPattern, weight: torch.Tensor, p: float,
                          training: bool) -> torch.Tensor:
    """``drop(X) W^T`` for a constant sparse ``X``: dropout on its stored values only (the
    same distribution as dropout on the dense matrix, whose zeros stay zero)."""
    values = nn.functional.dropout(pattern.values, p, training)
    return _SparseFeatureMatmul.apply(values, weight, pattern)


class _FeatureLinear(nn.Module):
    """``drop(x) W^T + b`` for dense or sparse (COO or CSR) ``x`` (dropout on the stored values).

    Bag-of-words features are 1-10 % dense: a sparse product is several times faster on CPU.
    Sparse ``x`` is taken as a constant (no gradient); its CSR pattern is built on the first
    call and reused while the same tensor comes back.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)
        self.p = dropout
        self._pattern = CSRPatternCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_sparse(x):
            return self.lin(nn.functional.dropout(x, self.p, self.training))
        return sparse_dropout_matmul(self._pattern(x), self.lin.weight, self.p,
                                     self.training) + self.lin.bias


class PPRGNN(nn.Module):
    """APPNP-style fixed point: ``H = MLP(x)``, ``Z <- (1 - a) Â Z + a H``, ``logits = Z_T``.

    The map's Jacobian is ``(1 - a) Â`` whatever the weights, so the forward converges
    geometrically at rate ``1 - a`` (``||Z_t - Z*|| <= (1-a)^t ||Z_0 - Z*||``) and the Neumann
    series of the backward converges at the same rate (Prop. 2 with ``||J|| = 1 - a``).
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, alpha: float = 0.1,
                 dropout: float = 0.5) -> None:
        super().__init__()
        _check_rate("alpha", alpha, "teleport probability; contraction rate is 1 - alpha")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.alpha = alpha
        self.mlp = nn.Sequential(_FeatureLinear(in_features, hidden, dropout), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    @property
    def rate(self) -> float:
        """Contraction rate ``||dF/dZ||_2 = 1 - alpha`` (``Â`` has spectral norm 1)."""
        return 1.0 - self.alpha

    def step(self, adj: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One propagation step ``F(Z) = (1 - a) Â Z + a H``."""
        return (1.0 - self.alpha) * symmetric_spmm(adj, z) + self.alpha * h

    def forward(
        self, adj: torch.Tensor, x: torch.Tensor, steps: int, method: str, truncate: int,
        trace: bool = False, on_failure: str = "ignore", backward_tol: float | None = None,
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(N, C) = Z_T`` after ``steps`` steps from ``Z_0 = H``, and the info.

        ``backward_tol`` stops the implicit methods' backward solves once their relative
        increment (residual) is below it; ``None`` runs all ``truncate`` iterations.
        """
        h = self.mlp(x)
        return rbp.fixed_point(
            lambda z: self.step(adj, h, z), h.detach(), steps,
            method=_with_backward_tol(method, truncate, backward_tol), truncate=truncate,
            checks=_checks(on_failure, trace), return_info=True,
        )


class IGNN(nn.Module):
    """IGNN-style fixed point: ``Z <- relu(Â Z W^T + B drop(x))``, ``||W||_2 <= kappa``.

    ``x`` may be dense or sparse COO (``x.to_sparse()``), for both models.

    ``W = V min(1, kappa / ||V||_2)``: the free parameter ``V`` is rescaled (differentiably)
    whenever its spectral norm exceeds ``kappa``, so ``||dF/dZ||_2 <= kappa`` at every step of
    training.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, kappa: float = 0.9,
                 dropout: float = 0.5) -> None:
        super().__init__()
        _check_rate("kappa", kappa, "bound on ||W||_2, the contraction rate")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.kappa = kappa
        self.hidden = hidden
        self.inp = _FeatureLinear(in_features, hidden, dropout)
        self.v = nn.Parameter(torch.empty(hidden, hidden))
        nn.init.orthogonal_(self.v, gain=kappa)
        self.out = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(dropout)

    @property
    def rate(self) -> float:
        """Bound on the contraction rate, ``kappa``."""
        return self.kappa

    def weight(self) -> torch.Tensor:
        """``W = V min(1, kappa / ||V||_2)``, so ``||W||_2 <= kappa``."""
        norm = torch.linalg.matrix_norm(self.v, ord=2)
        return self.v * torch.clamp(self.kappa / norm, max=1.0)

    def step(self, adj: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        """One propagation step ``F(Z) = relu(Â Z W^T + U)``."""
        return torch.relu(symmetric_spmm(adj, z) @ w.T + u)

    def forward(
        self, adj: torch.Tensor, x: torch.Tensor, steps: int, method: str, truncate: int,
        trace: bool = False, on_failure: str = "ignore", backward_tol: float | None = None,
    ) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        """Logits ``(N, C)`` from ``Z_T`` (``Z_0 = 0``), and the fixed-point info."""
        u = self.inp(x)
        w = self.weight()
        z0 = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype, device=x.device)
        z, info = rbp.fixed_point(
            lambda z: self.step(adj, w, u, z), z0, steps,
            method=_with_backward_tol(method, truncate, backward_tol), truncate=truncate,
            checks=_checks(on_failure, trace), return_info=True,
        )
        return self.out(self.drop(z)), info
