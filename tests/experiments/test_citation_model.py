"""The fixed-point citation models (ppr, ignn): contraction rates, settling, exact gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rbp.apps.citation.config import CitationConfig
from rbp.apps.citation.model import (
    IGNN,
    PPRGNN,
    normalised_adjacency,
    row_normalise,
    sum_adjacency,
    symmetric_spmm,
    truncation_for,
)
from rbp.runner import ConfigError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "planetoid"
needs_data = pytest.mark.skipif(not (DATA / "ind.cora.x").is_file(), reason="no Planetoid data")


def _random_graph(n: int = 15, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.rand(n, n, generator=gen) < p, diagonal=1)
    i, j = torch.nonzero(upper, as_tuple=True)
    return torch.stack([torch.cat([i, j]), torch.cat([j, i])])


def _power_norm(f, z: torch.Tensor, iters: int = 200) -> float:
    """||J||_2 of ``f`` at ``z`` by power iteration on ``J^T J`` (vjp of jvp)."""
    v = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(1))
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = torch.autograd.functional.jvp(f, z, v)
        _, jtjv = torch.autograd.functional.vjp(f, z, jv)
        sigma = math.sqrt(jtjv.norm().item())
        v = jtjv / jtjv.norm()
    return sigma


def _cora():
    from rbp.data import load_planetoid

    return load_planetoid("cora", DATA)


def test_truncation_meets_prop2_bound_and_is_smallest() -> None:
    for rate, bound in [(0.9, 1e-3), (0.8, 1e-2), (0.5, 1e-6)]:
        k = truncation_for(rate, bound)
        assert rate ** (k + 1) / (1 - rate) <= bound
        assert k == 1 or rate ** k / (1 - rate) > bound
    with pytest.raises(ValueError, match="rate must be in"):
        truncation_for(1.0, 1e-3)
    with pytest.raises(ValueError, match="bound must be positive"):
        truncation_for(0.9, 0.0)


def test_symmetric_spmm_gradients_twice() -> None:
    n = 10
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    z = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: symmetric_spmm(adj, t), (z,))
    assert torch.autograd.gradgradcheck(lambda t: symmetric_spmm(adj, t), (z,))


@needs_data
def test_the_paper_models_products_have_torchs_gradients_bit_for_bit() -> None:
    """The GG-NN's ``A h`` uses symmetric_spmm (its backward multiplies by ``A`` instead of
    transposing it each call): Cora's sum adjacency is symmetric, so the gradient and the
    second derivative are exactly torch.sparse.mm's."""
    d = _cora()
    adj = sum_adjacency(d.edge_index, d.num_nodes)
    dense = adj.to_dense()
    assert torch.equal(dense, dense.T)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(d.num_nodes, 8, generator=gen, requires_grad=True)
    g = torch.randn(d.num_nodes, 8, generator=gen)
    ours = torch.autograd.grad(symmetric_spmm(adj, h), h, g, create_graph=True)[0]
    torchs = torch.autograd.grad(torch.sparse.mm(adj, h), h, g, create_graph=True)[0]
    assert torch.equal(ours, torchs)
    v = torch.randn(d.num_nodes, 8, generator=gen)
    g2 = g.clone().requires_grad_()
    second = torch.autograd.grad(torch.autograd.grad(symmetric_spmm(adj, h), h, g2,
                                                     create_graph=True)[0], g2, v)[0]
    assert torch.equal(second, torch.sparse.mm(adj, v))


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_ppr_update_contracts_at_rate_one_minus_alpha(alpha: float) -> None:
    n = 15
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    net = PPRGNN(6, 8, 3, alpha=alpha).double()
    h = torch.randn(n, 3, dtype=torch.float64)
    z = torch.randn(n, 3, dtype=torch.float64)
    est = _power_norm(lambda s: net.step(adj, h, s), z)
    assert est == pytest.approx(1 - alpha, abs=1e-6) and net.rate == pytest.approx(1 - alpha)


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_ignn_update_contracts_below_kappa(scale: float) -> None:
    """Whatever ``V`` (small or 10x too large), ``||dF/dZ||_2 <= kappa`` (dense Jacobian)."""
    torch.manual_seed(0)
    n, hid, kappa = 12, 5, 0.8
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    net = IGNN(6, hid, 3, kappa=kappa, dropout=0.0).double()
    with torch.no_grad():
        net.v.mul_(scale)
    u = torch.randn(n, hid, dtype=torch.float64)
    z = torch.randn(n, hid, dtype=torch.float64)
    w = net.weight().detach()
    jac = torch.autograd.functional.jacobian(lambda s: net.step(adj, w, u, s), z)
    exact = torch.linalg.matrix_norm(jac.reshape(n * hid, n * hid), ord=2).item()
    assert exact <= kappa + 1e-9
    assert _power_norm(lambda s: net.step(adj, w, u, s), z) <= kappa + 1e-9
    if scale > 1:   # the projection is active: ||W|| sits at kappa
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(kappa, rel=1e-9)


@needs_data
def test_ppr_on_cora_contracts_and_settles_on_the_exact_fixed_point() -> None:
    d = _cora()
    n = d.num_nodes
    adj = normalised_adjacency(d.edge_index, n).to(torch.float64)
    torch.manual_seed(0)
    alpha = 0.1
    net = PPRGNN(d.num_features, 16, d.num_classes, alpha=alpha).double().eval()
    x = row_normalise(d.features).double().to_sparse()
    h = net.mlp(x).detach()
    assert _power_norm(lambda s: net.step(adj, h, s), h, iters=100) <= 1 - alpha + 1e-9
    k = truncation_for(net.rate, 1e-3)
    with torch.no_grad():
        z, info = net(adj, x, k + 1, "neumann", k)
    assert info.relative_final_difference < 1e-4
    a_dense = adj.to_dense()
    exact = alpha * torch.linalg.solve(torch.eye(n, dtype=torch.float64) - (1 - alpha) * a_dense,
                                       h)
    # forward error <= rate^T ||Z_0 - Z*||
    assert (z - exact).norm() <= (1 - alpha) ** (k + 1) * (h - exact).norm() + 1e-12
    assert (z - exact).norm() / exact.norm() < 1e-3


def _fp_grads(net: torch.nn.Module, adj: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
              method: str, steps: int, k: int) -> list[torch.Tensor]:
    net.zero_grad()
    logits, _ = net(adj, x, steps, method, k)
    F.cross_entropy(logits, labels).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("model", ["ppr", "ignn"])
def test_neumann_long_series_equals_bptt_on_a_small_graph(model: str) -> None:
    torch.manual_seed(0)
    n = 15
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    x = torch.rand(n, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    if model == "ppr":
        net: torch.nn.Module = PPRGNN(6, 8, 3, alpha=0.3, dropout=0.0).double()
    else:
        net = IGNN(6, 8, 3, kappa=0.6, dropout=0.0).double()
    steps = 120   # rate^120 < 1e-18: converged to float64 precision
    g_bptt = _fp_grads(net, adj, x, labels, "bptt", steps, steps)
    for method in ("neumann", "gmres", "cg", "rbp"):
        g = _fp_grads(net, adj, x, labels, method, steps, 100)
        for a, b in zip(g_bptt, g, strict=True):
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-10), method
    g_short = _fp_grads(net, adj, x, labels, "neumann", steps, 1)
    assert max((a - b).abs().max() for a, b in zip(g_bptt, g_short, strict=True)) > 1e-6


def test_ppr_gradient_equals_the_dense_implicit_solve() -> None:
    """Neumann-RBP's gradient on the PPR model equals ``z = (I - J^T)^{-1} g`` solved densely."""
    torch.manual_seed(0)
    n, alpha = 15, 0.2
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    x = torch.rand(n, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    net = PPRGNN(6, 8, 3, alpha=alpha, dropout=0.0).double()
    g_neu = _fp_grads(net, adj, x, labels, "neumann", 200, 150)
    net.zero_grad()   # exact: Z* = a (I - (1-a) Â)^{-1} H(x), differentiated by autograd
    inv = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - (1 - alpha) * adj.to_dense())
    F.cross_entropy(alpha * inv @ net.mlp(x), labels).backward()
    for a, p in zip(g_neu, net.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-8, atol=1e-12)


def test_sparse_features_give_the_dense_result() -> None:
    torch.manual_seed(0)
    n = 15
    adj = normalised_adjacency(_random_graph(n), n)
    x = (torch.rand(n, 6) < 0.3).float()
    for net in (PPRGNN(6, 8, 3), IGNN(6, 8, 3)):
        net.eval()
        with torch.no_grad():
            a, _ = net(adj, x, 30, "neumann", 10)
            b, _ = net(adj, x.to_sparse(), 30, "neumann", 10)
        assert torch.allclose(a, b, atol=1e-5)


def test_sparse_features_give_the_dense_gradient() -> None:
    """The sparse (COO and CSR) feature product's weight gradient ``(X^T G)^T`` equals the
    dense one, for a pattern reused across calls and a new tensor replacing it."""
    torch.manual_seed(0)
    n = 15
    adj = normalised_adjacency(_random_graph(n), n).to(torch.float64)
    labels = torch.randint(0, 3, (n,))
    for seed in (0, 1):
        x = (torch.rand(n, 6, generator=torch.Generator().manual_seed(seed)) < 0.3).double() \
            * torch.rand(n, 6, dtype=torch.float64)
        for net in (PPRGNN(6, 8, 3, dropout=0.0).double(), IGNN(6, 8, 3, dropout=0.0).double()):
            ref = _fp_grads(net, adj, x, labels, "neumann", 40, 30)
            for xs in (x.to_sparse(), x.to_sparse_csr()):
                for _ in range(2):
                    g = _fp_grads(net, adj, xs, labels, "neumann", 40, 30)
                    for a, b in zip(ref, g, strict=True):
                        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_bad_rates_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        PPRGNN(4, 4, 2, alpha=0.0)
    with pytest.raises(ValueError, match=r"kappa must be in \(0, 1\)"):
        IGNN(4, 4, 2, kappa=1.0)
    with pytest.raises(ValueError, match="dropout"):
        PPRGNN(4, 4, 2, dropout=1.0)
    bad = [({"fp_alpha": 1.5}, "fp_alpha"), ({"fp_kappa": 0.0}, "fp_kappa"),
           ({"overrides": {"pubmed": {"fp_alpa": 0.2}}}, "unknown setting"),
           ({"overrides": {"corra": {"fp_alpha": 0.2}}}, "unknown dataset 'corra'"),
           ({"overrides": {"cora": {"fp_alpha": 2.0}}}, "fp_alpha"),
           ({"fp_methods": ["nemann"]}, "unknown method 'nemann'"),
           ({"models": ["ppr"], "fp_steps": 10}, "fp_steps=10 is below K")]
    for kwargs, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            CitationConfig(**kwargs).validate()


def test_config_derives_k_from_the_rate_and_applies_overrides() -> None:
    cfg = CitationConfig(fp_alpha=0.1, fp_bound=1e-3,
                         overrides={"pubmed": {"fp_alpha": 0.2}})
    cfg.validate()
    assert cfg.fp_K("ppr") == truncation_for(0.9, 1e-3)
    assert cfg.for_dataset("pubmed").fp_K("ppr") == truncation_for(0.8, 1e-3)
    assert cfg.for_dataset("cora").fp_alpha == 0.1
    assert CitationConfig(fp_truncate=7).fp_K("ignn") == 7


def test_figures_module_only_draws() -> None:
    """No import cycle: figures.py imports neither the experiment nor the tables."""
    import ast

    import rbp.apps.citation.figures as fig

    tree = ast.parse(Path(fig.__file__).read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in mods if m and ("experiment" in m or "tables" in m)}


@needs_data
def test_cost_rows_show_constant_memory_for_implicit_methods(tmp_path: Path) -> None:
    from rbp.apps.citation.cost import main, measure

    rows = measure("cora", str(DATA), rate=0.8, hidden=8, repeats=1)
    by = {(r["model"], r["method"]): r for r in rows}
    k = by[("ignn", "bptt")]["K"]
    # ignn's relu saves one state per step under BPTT; the implicit methods keep one step
    for method in ("rbp", "cg", "neumann", "gmres"):
        assert by[("ignn", method)]["memory_vs_bptt"] < 3.0 / k
        assert by[("ignn", method)]["backward_status"] == ["converged"], method
    assert by[("ppr", "neumann")]["backward_status"] == ["converged"]
    with pytest.raises(SystemExit):
        main(["--rate", "1.5", "--out", str(tmp_path / "x.json")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # each was accepted before: torch refused it after the data were loaded, or it ran
        ({"lr": 0.0}, "setting 'lr' must be positive, got 0.0"),
        ({"injected_lr": -0.01}, "setting 'injected_lr' must be positive, got -0.01"),
        ({"momentum": 5.0}, r"setting 'momentum' must be in \[0, 1\), got 5.0"),
        ({"momentum": -0.1}, "setting 'momentum' must be in"),
        ({"weight_decay": -1.0}, "setting 'weight_decay' must be >= 0, got -1.0"),
        ({"gcn_weight_decay": -1.0}, "setting 'gcn_weight_decay' must be >= 0"),
        ({"fp_truncate": 0}, "setting 'fp_truncate' must be >= 1, got 0"),  # `or 1` let 0 by
        ({"models": ["paper"], "fp_steps": 0}, "setting 'fp_steps' must be >= 1, got 0"),
        ({"trace_points": -1}, "setting 'trace_points' must be >= 0"),
        # an empty list silently meant "every method in `methods`" (null's meaning)
        ({"injected_methods": []}, "setting 'injected_methods' is empty but models has "
                                   "injected"),
        ({"models": ["ignn"], "fp_methods": []}, "setting 'fp_methods' is empty but models has "
                                                 "ignn"),
        ({"dataset_seeds": {"cora": []}}, "setting 'dataset_seeds' gives no seeds for cora"),
        ({"num_seeds": 0}, "no seeds to run: num_seeds must be >= 1, got 0"),
        # read once for the whole run: a per-dataset value was silently ignored
        ({"overrides": {"pubmed": {"device": "cpu"}}}, "overrides.pubmed: device cannot differ "
                                                        "per dataset"),
        ({"overrides": {"cora": {"dataset": ["pubmed"]}}}, "overrides.cora: dataset cannot"),
        ({"overrides": {"cora": {"threads": 2}}}, "overrides.cora: threads cannot"),
    ],
)
def test_settings_that_ran_wrongly_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CitationConfig(**kwargs).validate()


def test_empty_method_lists_of_models_not_run_and_per_dataset_seeds_pass() -> None:
    CitationConfig(models=["paper"], injected_methods=[], fp_methods=[]).validate()
    CitationConfig(momentum=0.0, weight_decay=0.0, trace_points=0, fp_steps=None,
                   overrides={"pubmed": {"seed": 3, "fp_alpha": 0.2}}).validate()
