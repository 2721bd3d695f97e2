"""Tests of the citation application (semi-supervised classification with a recurrent GNN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rbp
from rbp.apps.citation.baselines import gcn_baseline, logreg_baseline
from rbp.apps.citation.model import (
    GGNN,
    InjectedGNN,
    normalised_adjacency,
    pca_features,
    sum_adjacency,
)
from rbp.data import split_labelled
from rbp.runner import cli

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "planetoid"
needs_data = pytest.mark.skipif(not (DATA / "ind.cora.x").is_file(), reason="no Planetoid data")


def _random_graph(n: int = 12, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.rand(n, n, generator=gen) < p, diagonal=1)
    i, j = torch.nonzero(upper, as_tuple=True)
    return torch.stack([torch.cat([i, j]), torch.cat([j, i])])


def test_adjacency_sums_neighbours_and_normalises() -> None:
    ei = _random_graph()
    n = 12
    h = torch.randn(n, 3)
    dense = torch.zeros(n, n)
    dense[ei[1], ei[0]] = 1.0
    assert torch.allclose(sum_adjacency(ei, n) @ h, dense @ h, atol=1e-6)
    a_hat = normalised_adjacency(ei, n).to_dense()
    a_loop = dense + torch.eye(n)
    d = a_loop.sum(1).rsqrt()
    assert torch.allclose(a_hat, d[:, None] * a_loop * d[None, :], atol=1e-6)
    assert torch.linalg.eigvalsh(a_hat.double()).abs().max() == pytest.approx(1.0, abs=1e-6)


def test_ggnn_step_is_a_tied_gru_on_summed_messages() -> None:
    torch.manual_seed(0)
    n, hid = 12, 5
    ei = _random_graph()
    adj = sum_adjacency(ei, n)
    net = GGNN(hid, 3)
    h = torch.randn(n, hid)
    m = torch.zeros(n, hid).index_add_(0, ei[1], h[ei[0]])
    c = net.cell
    gi = m @ c.weight_ih.T + c.bias_ih
    gh = h @ c.weight_hh.T + c.bias_hh
    r = torch.sigmoid(gi[:, :hid] + gh[:, :hid])
    z = torch.sigmoid(gi[:, hid:2 * hid] + gh[:, hid:2 * hid])
    cand = torch.tanh(gi[:, 2 * hid:] + r * gh[:, 2 * hid:])
    expect = (1 - z) * cand + z * h
    out = net.step(adj, h)
    assert out.shape == (n, hid)
    assert torch.allclose(out, expect, atol=1e-5)
    logits, info = net(adj, h, 7, "neumann", 3, trace=True)
    assert logits.shape == (n, 3) and len(info.forward_trace) == 7


def test_injected_fixed_point_depends_on_features() -> None:
    torch.manual_seed(0)
    n = 12
    ei = _random_graph()
    net = InjectedGNN(6, 4, 3, dropout=0.0).eval()
    adj = normalised_adjacency(ei, n)
    x = torch.randn(n, 6)
    with torch.no_grad():
        a, _ = net(adj, x, 30, "neumann", 5)
        b, _ = net(adj, x + 1.0, 30, "neumann", 5)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["paper", "injected"])
def test_neumann_long_series_equals_bptt_when_converged(model: str) -> None:
    """Prop. 1 on the app's model: contractive weights, converged forward, K large."""
    torch.manual_seed(0)
    n, hid = 12, 4
    ei = _random_graph()
    x = torch.randn(n, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    if model == "paper":
        net = GGNN(hid, 3).double()
        adj = sum_adjacency(ei, n).to(torch.float64)
        with torch.no_grad():  # shrink the recurrent weights: a contraction
            net.cell.weight_ih.mul_(0.05)
            net.cell.weight_hh.mul_(0.2)
        h0 = torch.randn(n, hid, dtype=torch.float64)
    else:
        net = InjectedGNN(6, hid, 3, dropout=0.0).double()
        adj = normalised_adjacency(ei, n).to(torch.float64)
        with torch.no_grad():
            net.cell.weight_hh.mul_(0.2)

    def grads(method: str, truncate: int) -> tuple[list[torch.Tensor], float]:
        net.zero_grad()
        if model == "paper":
            logits, info = net(adj, h0, 150, method, truncate)
        else:
            logits, info = net(adj, x, 150, method, truncate)
        F.cross_entropy(logits, labels).backward()
        return [p.grad.clone() for p in net.parameters()], info.final_difference

    g_bptt, diff = grads("bptt", 150)
    assert diff < 1e-10  # converged forward
    g_neu, _ = grads("neumann", 120)
    g_short, _ = grads("neumann", 1)
    for a, b in zip(g_bptt, g_neu, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    # the comparison can fail: a one-term series differs from BPTT
    assert max((a - b).abs().max() for a, b in zip(g_bptt, g_short, strict=True)) > 1e-6


def test_pca_features_shape_and_determinism() -> None:
    x = torch.randn(50, 20)
    a = pca_features(x, 4)
    assert a.shape == (50, 4) and a.dtype == torch.float32
    assert torch.equal(a, pca_features(x, 4))
    assert torch.allclose(a.mean(0), torch.zeros(4), atol=1e-5)


def test_baselines_run_on_the_split() -> None:
    torch.manual_seed(0)
    n = 60
    labels = torch.arange(n) % 3
    features = F.one_hot(labels, 3).float() + 0.1 * torch.randn(n, 3)
    labelled = torch.ones(n, dtype=torch.bool)
    train, val, test = split_labelled(labelled, 0, (0.2, 0.3, 0.5))
    lr = logreg_baseline(features, labels, train, val, test, seed=0)
    assert lr["test_acc"] > 0.9   # separable features
    ei = _random_graph(n, 0.05)
    from rbp.apps.citation.baselines import GCNSettings

    gcn = gcn_baseline(features, labels, ei, 3, train, val, test, 0, GCNSettings(epochs=30))
    assert 0.0 <= gcn["test_acc"] <= 1.0 and 1 <= gcn["best_epoch"] <= 30
    # the plain-torch GCN (no PyTorch Geometric) learns well above chance (1/3) too; the
    # random graph mixes classes, so neither backend is near 100 %
    plain = gcn_baseline(features, labels, ei, 3, train, val, test, 0, GCNSettings(epochs=100),
                         backend="torch")
    assert plain["backend"] == "torch" and plain["val_acc"] > 0.6
    with pytest.raises(ValueError, match="backend must be"):
        gcn_baseline(features, labels, ei, 3, train, val, test, 0, backend="dgl")


def test_plain_gcn_layers_equal_pyg() -> None:
    """Same weights: the plain-torch GCN computes PyG's GCNConv output."""
    pytest.importorskip("torch_geometric")
    from rbp.apps.citation.baselines import _GCN, _TorchGCN

    torch.manual_seed(0)
    n = 12
    ei = _random_graph(n)
    x = torch.randn(n, 5)
    pyg = _GCN(5, 4, 3, 0.5).eval()
    plain = _TorchGCN(5, 4, 3, 0.5, normalised_adjacency(ei, n)).eval()
    with torch.no_grad():
        plain.lin1.weight.copy_(pyg.conv1.lin.weight)
        plain.lin2.weight.copy_(pyg.conv2.lin.weight)
        plain.b1.copy_(torch.randn(4))
        plain.b2.copy_(torch.randn(3))
        pyg.conv1.bias.copy_(plain.b1)
        pyg.conv2.bias.copy_(plain.b2)
        assert torch.allclose(plain(x, ei), pyg(x, ei), atol=1e-5)


def test_plain_gcn_on_sparse_features_equals_dense() -> None:
    """Same weights, no dropout: sparse (COO, CSR) features give the dense GCN's logits and
    weight gradients (``dL/dW_1 = (Â-propagated grad)^T X`` through the CSR transpose)."""
    from rbp.apps.citation.baselines import _TorchGCN

    torch.manual_seed(0)
    n = 12
    ei = _random_graph(n)
    x = (torch.rand(n, 5) < 0.4).float() * torch.rand(n, 5)
    labels = torch.arange(n) % 3
    net = _TorchGCN(5, 4, 3, 0.0, normalised_adjacency(ei, n))

    def grads(inp: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        out = net(inp, ei)
        F.cross_entropy(out, labels).backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    out, ref = grads(x)
    for xs in (x.to_sparse(), x.to_sparse_csr()):
        out_s, g = grads(xs)
        assert torch.allclose(out, out_s, atol=1e-6)
        for a, b in zip(ref, g, strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def _quick(out: Path, *extra: str) -> int:
    return cli.main(["citation", "--quick", "--data-dir", str(DATA), "--out", str(out),
                     "--no-progress", *extra])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("citation") / "quick"
    return _quick(out), out


@needs_data
def test_quick_end_to_end(quick_run: tuple[int, Path]) -> None:
    code, out = quick_run
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "finished"
    assert (out / "table1.md").is_file() and (out / "fig3_cora.png").is_file()
    cora = res["datasets"]["cora"]
    train, val, test = split_labelled(torch.ones(cora["stats"]["labelled"], dtype=torch.bool), 0)
    for model, methods in cora["models"].items():
        for method, summary in methods.items():
            unit = summary["per_seed"][0]
            assert (unit["n_train"], unit["n_val"], unit["n_test"]) == (
                train.numel(), val.numel(), test.numel())
            loss = unit["curves"]["train_loss"]
            assert sum(loss[-3:]) < sum(loss[:3]), (model, method)   # loss falls
            assert unit["traces"] and len(unit["traces"][-1]["diff_norm"]) == unit["settings"][
                "steps"]
    assert cora["stats"]["labelled"] == 2708
    for method, summary in cora["models"]["ppr"].items():   # the fixed-point model settles
        unit = summary["per_seed"][0]
        assert unit["final_rel_diff"] < 1e-4 and unit["saved_mb"] > 0, method
        if method in rbp.IMPLICIT_METHODS:
            assert set(summary["backward_status"]) == {"converged"}, summary["backward_status"]
    table = (out / "table1.md").read_text()
    assert "PPR fixed-point GNN, Neumann-RBP" in table and "× BPTT memory" in table


@needs_data
def test_resume_reproduces_the_uninterrupted_run(
    quick_run: tuple[int, Path], tmp_path: Path
) -> None:
    _, ref_dir = quick_run
    out = tmp_path / "resumed"
    # epoch 7 of the first unit: after its checkpoint at epoch 5, before it finishes
    assert _quick(out, "--set", "interrupt_after=7") == 130
    partial = json.loads((out / "results.json").read_text())
    assert partial["status"] == "interrupted"
    _assert_data_recorded(out, "cora")
    assert _quick(out, "--resume") == 0
    ref = json.loads((ref_dir / "results.json").read_text())["datasets"]["cora"]["models"]
    got = json.loads((out / "results.json").read_text())["datasets"]["cora"]["models"]
    for model in ref:
        for method in ref[model]:
            a, b = ref[model][method]["per_seed"][0], got[model][method]["per_seed"][0]
            assert a["curves"]["train_loss"] == b["curves"]["train_loss"]
            assert a["curves"]["val_acc"] == b["curves"]["val_acc"]
            assert a["test_acc"] == b["test_acc"]


def _assert_data_recorded(out: Path, name: str) -> None:
    """Every checkpoint holds the SHA-256 of the graph it was trained on (so the run may
    resume where the data lie elsewhere)."""
    from rbp.data import load_planetoid
    from rbp.runner.checkpoint import load_checkpoint
    from rbp.runner.resume import data_fingerprint

    d = load_planetoid(name)
    want = data_fingerprint(d.features, d.labels, d.edge_index)
    paths = sorted((out / "checkpoints").glob("*.pt"))
    assert paths and all(load_checkpoint(p)["_rbp_data"] == {name: want} for p in paths)


def test_unknown_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["citation", "--dataset", "corra", "--out", str(tmp_path / "x"),
                     "--no-progress"])
    assert code == 2
    assert "unknown dataset 'corra'" in capsys.readouterr().err


def test_method_list_matches_core() -> None:
    from rbp.apps.citation import EXPERIMENT

    assert EXPERIMENT.methods == tuple(rbp.METHODS)


@needs_data
def test_table1_from_a_sweep_equals_the_sequential_run(tmp_path: Path) -> None:
    common = ["--set", "models=[paper]", "--set", "injected_methods=[]"]
    seq = tmp_path / "sequential"
    assert _quick(seq, "--seeds", "0,1", *common) == 0
    sweep = tmp_path / "sweep"
    assert cli.main(["sweep", "citation", "--quick", "--grid", "method=tbptt,neumann",
                     "--grid", "seed=0,1", "--set", f"data_dir={DATA}", *common,
                     "--out", str(sweep), "--workers", "2", "--no-progress"]) == 0
    table = (sweep / "summary" / "table1.md").read_text()
    assert table == (seq / "table1.md").read_text()
    assert "(n=2)" in table and (sweep / "summary" / "fig3_cora.png").is_file()
    merged = json.loads((sweep / "summary" / "results.json").read_text())
    assert merged["experiment"] == "citation" and len(merged["merged_from"]) == 4


def test_a_setting_given_on_the_command_line_beats_the_packaged_per_dataset_choice() -> None:
    """``--set fp_alpha=0.1`` applies to Pubmed too (the packaged Pubmed override of fp_alpha
    would otherwise silently win there); an explicit ``overrides`` still decides per dataset."""
    from rbp.runner.config import build_config
    from rbp.runner.registry import experiments

    exp = experiments()["citation"]
    packaged = build_config(exp, [])
    assert packaged.for_dataset("pubmed").fp_alpha != packaged.for_dataset("cora").fp_alpha
    cfg = build_config(exp, ["fp_alpha=0.1"])
    assert cfg.for_dataset("pubmed").fp_alpha == cfg.for_dataset("cora").fp_alpha == 0.1
    assert cfg.for_dataset("pubmed").gcn_row_normalise == packaged.for_dataset(
        "pubmed").gcn_row_normalise  # the other packaged choice stays
    both = build_config(exp, ["overrides={pubmed: {fp_alpha: 0.3}}", "fp_alpha=0.1"])
    assert (both.for_dataset("pubmed").fp_alpha, both.for_dataset("cora").fp_alpha) == (0.3, 0.1)


def test_a_hidden_size_below_one_is_a_setting_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["citation", "--quick", "--out", str(tmp_path / "h"), "--dry-run",
                     "hidden={cora: -1, pubmed: 16, citeseer: 16}"])
    err = capsys.readouterr().err
    assert code != 0 and "setting 'hidden' must be a whole number >= 1" in err
    assert "n_components" not in err and "Traceback" not in err


def test_results_record_the_seeds_each_dataset_ran(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli.main(["citation", "--quick", "--out", str(out), "--no-progress",
                     "--set", "models=[paper]", "--set", "methods=[neumann]",
                     "--set", "baselines=[]", "--set", "overrides={cora: {seed: 7}}"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["datasets"]["cora"]["seeds"] == [7] and "seeds" not in doc
    (unit,) = doc["datasets"]["cora"]["models"]["paper"]["neumann"]["per_seed"]
    assert unit["seed"] == 7
