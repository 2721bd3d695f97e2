"""Baselines of the citation experiment, on the same per-seed splits as the graph models.

* ``logreg``: multinomial logistic regression on each node's own features (the paper's
  baseline): ``p(y | x) = softmax(W x + b)``, fitted by scikit-learn on the training nodes.
* ``gcn``: a two-layer GCN (Kipf & Welling 2017), ``logits = Â relu(Â X W_1) W_2`` with
  ``Â = D^{-1/2}(A + I)D^{-1/2}``, dropout, Adam, and the test accuracy taken at the epoch of
  best validation accuracy. PyTorch Geometric's ``GCNConv`` when it is installed, else the
  same layers in plain torch (sparse ``Â``; ``backend="torch"`` forces it; sparse features
  use a CSR product, which ``rbp citation`` does by default: ``gcn_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

from .model import (
    CSRPatternCache,
    _SparseFeatureMatmul,
    is_sparse,
    normalised_adjacency,
    sparse_dropout_matmul,
    symmetric_spmm,
)
from .seeds import _dropout, build_per_seed

__all__ = ["BASELINES", "GCN_BACKENDS", "GCNSettings", "SeedBatchedGCN", "gcn_baseline",
           "gcn_baseline_seeds", "have_pyg", "logreg_baseline"]

BASELINES = ("logreg", "gcn")
GCN_BACKENDS = ("auto", "pyg", "torch")


def _accuracy(pred: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    return float((pred[idx] == labels[idx]).double().mean())


def logreg_baseline(
    features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
    test: torch.Tensor, seed: int, c: float = 1.0, max_iter: int = 2000,
) -> dict[str, float]:
    """Fit softmax regression (L2, inverse strength ``c``) on the training nodes' features.

    Returns ``{"val_acc", "test_acc"}``. Classes absent from the training set are never
    predicted (as for any classifier fitted on those nodes).
    """
    x = features.numpy()
    y = labels.numpy()
    tr = train.numpy()
    if len(np.unique(y[tr])) < 2:
        pred = np.full_like(y, y[tr][0])
    else:
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with threadpool_limits(limits=1):  # same numbers whatever the core count
            clf.fit(x[tr], y[tr])
            pred = clf.predict(x)
    pred_t = torch.from_numpy(np.asarray(pred))
    return {"val_acc": _accuracy(pred_t, labels, val), "test_acc": _accuracy(pred_t, labels, test)}


@dataclass
class GCNSettings:
    """Kipf & Welling's settings: hidden 16, dropout 0.5, Adam lr 0.01, weight decay 5e-4."""

    hidden: int = 16
    dropout: float = 0.5
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 200


def have_pyg() -> bool:
    """Whether PyTorch Geometric can be imported."""
    try:
        import torch_geometric.nn  # noqa: F401
    except ImportError:
        return False
    return True


class _GCN(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(in_features, hidden, cached=True)
        self.conv2 = GCNConv(hidden, num_classes, cached=True)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        x = torch.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


class _TorchGCN(nn.Module):
    """The same two layers with a sparse ``Â`` (Glorot weights, zero bias, as ``GCNConv``).

    ``x`` dense or sparse (COO / CSR): sparse features take dropout on their stored values and
    a CSR product (on Pubmed's 19717 x 500 TF-IDF matrix, 5 % dense, ~10x faster per epoch than
    the dense layer); ``Â`` products use :func:`symmetric_spmm` (``Â`` is symmetric).
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float,
                 adj: torch.Tensor) -> None:
        super().__init__()
        self.lin1 = nn.Linear(in_features, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, num_classes, bias=False)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_uniform_(self.lin1.weight)
        nn.init.xavier_uniform_(self.lin2.weight)
        self.dropout = dropout
        self.adj = adj
        self._pattern = CSRPatternCache()

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if is_sparse(x):
            x = sparse_dropout_matmul(self._pattern(x), self.lin1.weight, self.dropout,
                                      self.training)
        else:
            x = self.lin1(F.dropout(x, self.dropout, self.training))
        x = torch.relu(symmetric_spmm(self.adj, x) + self.b1)
        x = F.dropout(x, self.dropout, self.training)
        return symmetric_spmm(self.adj, self.lin2(x)) + self.b2


def gcn_baseline(
    features: torch.Tensor, labels: torch.Tensor, edge_index: torch.Tensor,
    num_classes: int, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor,
    seed: int, settings: GCNSettings | None = None, backend: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train a two-layer GCN full-batch; test accuracy at the best-validation epoch.

    ``backend``: ``"pyg"`` (PyTorch Geometric), ``"torch"`` (plain torch) or ``"auto"`` (PyG
    when installed and ``features`` are dense, else plain torch). ``features`` may be sparse
    (COO / CSR; PyG gets them densified). Returns ``{"val_acc", "test_acc", "best_epoch",
    "backend"}`` (``best_epoch`` counts training steps). Trains on ``device`` (weights drawn
    on the CPU, so they do not depend on it).
    """
    s = settings or GCNSettings()
    if backend not in GCN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, GCN_BACKENDS))}, got "
                         f"{backend!r}")
    if backend == "auto":
        backend = "pyg" if have_pyg() and not is_sparse(features) else "torch"
    elif backend == "pyg" and not have_pyg():
        raise ImportError("backend='pyg' needs PyTorch Geometric (pip install torch_geometric); "
                          "or use backend='torch'")
    torch.manual_seed(seed)
    model: nn.Module
    if backend == "pyg":
        features = features.to_dense()
        model = _GCN(features.shape[1], s.hidden, num_classes, s.dropout)
    else:
        adj = normalised_adjacency(edge_index, features.shape[0])
        model = _TorchGCN(features.shape[1], s.hidden, num_classes, s.dropout, adj.to(device))
    model = model.to(device)
    features, labels, edge_index = features.to(device), labels.to(device), edge_index.to(device)
    train, val, test = train.to(device), val.to(device), test.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best = (-1.0, 0.0, 0)
    for epoch in range(1, s.epochs + 1):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(features, edge_index)[train], labels[train])
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(features, edge_index).argmax(1)
        va = _accuracy(pred, labels, val)
        if va > best[0]:
            best = (va, _accuracy(pred, labels, test), epoch)
    return {"val_acc": best[0], "test_acc": best[1], "best_epoch": best[2], "backend": backend}


class SeedBatchedGCN(nn.Module):
    """S two-layer GCNs (``_TorchGCN``) in one model: per-seed weights with a leading seed
    dimension, one product ``Â [H_1 ... H_S]`` per layer for all seeds, and each seed's dropout
    masks from its own generator, started where the default generator stands after that
    seed's build (the masks a lone run of the seed draws, on the CPU)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, seeds: int,
                 dropout: float, adj: torch.Tensor) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(seeds, hidden, in_features))
        self.w2 = nn.Parameter(torch.empty(seeds, hidden, num_classes))   # W_2^T per seed
        self.b1 = nn.Parameter(torch.zeros(seeds, 1, hidden))
        self.b2 = nn.Parameter(torch.zeros(seeds, 1, num_classes))
        self.dropout, self.adj = dropout, adj
        self.generators: list[torch.Generator] = []
        self._pattern = CSRPatternCache()

    @classmethod
    def from_seeds(cls, in_features: int, hidden: int, num_classes: int, seeds: list[int],
                   dropout: float, adj: torch.Tensor,
                   device: torch.device | str = "cpu") -> SeedBatchedGCN:
        net = cls(in_features, hidden, num_classes, len(seeds), dropout, adj)
        singles, net.generators = build_per_seed(
            seeds, lambda: _TorchGCN(in_features, hidden, num_classes, dropout, adj), device)
        with torch.no_grad():
            for i, one in enumerate(singles):
                net.w1[i].copy_(one.lin1.weight)
                net.w2[i].copy_(one.lin2.weight.T)
        return net

    def _spread(self, h: torch.Tensor) -> torch.Tensor:
        """``Â h_s`` for every seed with one sparse product (``h`` of shape (S, N, k))."""
        s, n, k = h.shape
        out = symmetric_spmm(self.adj, h.transpose(0, 1).reshape(n, s * k))
        return out.view(n, s, k).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(S, N, C)`` for sparse features ``x`` (N, F)."""
        if not is_sparse(x):
            raise ValueError("SeedBatchedGCN takes sparse features (x.to_sparse())")
        pattern = self._pattern(x)
        first = []
        for i in range(self.w1.shape[0]):
            values = pattern.values
            if self.training:
                values = _dropout(values, self.dropout, self.generators[i])
            first.append(_SparseFeatureMatmul.apply(values, self.w1[i], pattern))
        h = torch.relu(self._spread(torch.stack(first)) + self.b1)
        if self.training:
            h = torch.stack([_dropout(h[i], self.dropout, g)
                             for i, g in enumerate(self.generators)])
        return self._spread(torch.bmm(h, self.w2)) + self.b2


def gcn_baseline_seeds(
    features: torch.Tensor, labels: torch.Tensor, edge_index: torch.Tensor, num_classes: int,
    splits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], seeds: list[int],
    settings: GCNSettings | None = None, device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """:func:`gcn_baseline` (plain-torch backend, sparse features) for several seeds trained as
    one batched model; the same per-seed results as one call per seed (to round-off)."""
    s = settings or GCNSettings()
    adj = normalised_adjacency(edge_index, features.shape[0]).to(device, features.dtype)
    net = SeedBatchedGCN.from_seeds(features.shape[1], s.hidden, num_classes, seeds, s.dropout,
                                    adj, device=device).to(device, features.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    x, labels = features.to(device), labels.to(device)
    splits = [tuple(i.to(device) for i in split) for split in splits]
    best = [(-1.0, 0.0, 0) for _ in seeds]
    for epoch in range(1, s.epochs + 1):
        net.train()
        opt.zero_grad()
        logits = net(x)
        torch.stack([F.cross_entropy(logits[i, tr], labels[tr])
                     for i, (tr, _, _) in enumerate(splits)]).sum().backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(x).argmax(2)
        for i, (_, va, te) in enumerate(splits):
            acc = _accuracy(pred[i], labels, va)
            if acc > best[i][0]:
                best[i] = (acc, _accuracy(pred[i], labels, te), epoch)
    return [{"val_acc": b[0], "test_acc": b[1], "best_epoch": b[2], "backend": "torch",
             "seed_batch": len(seeds)} for b in best]
