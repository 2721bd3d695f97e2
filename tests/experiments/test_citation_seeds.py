"""Seeds batched: the paper's GG-NN for S seeds as one model equals the S seeds run one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rbp
from rbp.apps.citation.experiment import _paper_method
from rbp.apps.citation.model import GGNN, sum_adjacency
from rbp.apps.citation.seeds import SeedBatchedGGNN
from rbp.runner import cli
from rbp.runner.checkpoint import load_checkpoint
from rbp.runner.config import ConfigError
from rbp.runner.device import resolve_device

N, HID, CLASSES, STEPS, K = 30, 6, 3, 12, 4


def _graph(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.rand(N, N, generator=gen) < 0.15, diagonal=1)
    i, j = torch.nonzero(upper, as_tuple=True)
    ei = torch.stack([torch.cat([i, j]), torch.cat([j, i])])
    return sum_adjacency(ei, N).to(torch.float64)


def _train(seeds: list[int], method: str, epochs: int = 3) -> list[dict[str, torch.Tensor]]:
    """Train one batched model over ``seeds`` in float64 as the experiment does; per-seed
    weights at the end."""
    adj = _graph()
    h0 = torch.randn(N, HID, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    labels = torch.arange(N) % CLASSES
    train = [torch.randperm(N, generator=torch.Generator().manual_seed(s))[:8] for s in seeds]
    net = SeedBatchedGGNN.from_seeds(HID, CLASSES, seeds).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    how = _paper_method(method, K, gens, (len(seeds), N, HID))
    for _ in range(epochs):
        opt.zero_grad()
        logits, _ = net(adj, h0, STEPS, how, K, on_failure="ignore")
        loss = torch.stack([F.cross_entropy(logits[i, t], labels[t])
                            for i, t in enumerate(train)]).sum()
        loss.backward()
        opt.step()
    return [{k: v[i].detach().clone() for k, v in net.named_parameters()}
            for i in range(len(seeds))]


@pytest.mark.parametrize("method", list(rbp.METHODS))
def test_batched_seeds_equal_seeds_one_by_one(method: str) -> None:
    """Three seeds in one model give each seed the weights a run of that seed alone gives,
    for every method (CG/GMRES solve each seed on its own; RBP draws each seed's start from
    its own generator)."""
    batched = _train([3, 1, 4], method)
    for i, seed in enumerate([3, 1, 4]):
        (alone,) = _train([seed], method)
        for name, value in alone.items():
            torch.testing.assert_close(batched[i][name], value, rtol=1e-10, atol=1e-12,
                                       msg=f"{method}, seed {seed}, {name}")
    # and the seeds did train apart: their weights differ
    assert not torch.allclose(batched[0]["weight_ih"], batched[1]["weight_ih"])


def test_batched_model_is_the_paper_gru_on_summed_messages() -> None:
    """Seed s of the batched model is GGNN (nn.GRUCell) built under manual_seed(s): the same
    weights, and the same logits after STEPS steps (float64)."""
    adj = _graph()
    h0 = torch.randn(N, HID, dtype=torch.float64)
    net = SeedBatchedGGNN.from_seeds(HID, CLASSES, [5, 7]).double()
    logits, _ = net(adj, h0, STEPS, "bptt", K)
    for i, seed in enumerate([5, 7]):
        torch.manual_seed(seed)
        single = GGNN(HID, CLASSES).double()
        ref, _ = single(adj, h0, STEPS, "bptt", K)
        torch.testing.assert_close(logits[i], ref, rtol=1e-12, atol=1e-12)


def test_from_seeds_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SeedBatchedGGNN.from_seeds(HID, CLASSES, [1, 2])
    torch.testing.assert_close(torch.rand(3), expected)


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    args = ["citation", "--quick", "--out", str(out), "--no-progress", "--device", "cpu",
            "--set", "models=[paper]", "--set", "baselines=[]", "--set", "num_seeds=3",
            "--set", "methods=[neumann,gmres]", "--set", "checkpoint_every=2", *extra]
    assert cli.main(args) == 0
    return json.loads((out / "results.json").read_text())


def _per_seed(doc: dict) -> dict:
    models = doc["datasets"]["cora"]["models"]["paper"]
    return {(m, u["seed"]): (u["test_acc"], u["curves"]["train_loss"])
            for m, row in models.items() for u in row["per_seed"]}


def test_experiment_batched_equals_sequential_and_resumes(tmp_path: Path) -> None:
    """`rbp citation` with three seeds in one batch equals one seed at a time (float32: to
    round-off), records the device, and a batched run interrupted and resumed gives the same
    numbers as the uninterrupted one."""
    one = _run(tmp_path, "one", "--set", "seed_batch=1")
    three = _run(tmp_path, "three", "--set", "seed_batch=3")
    assert one["device"] == three["device"] == "cpu"
    a, b = _per_seed(one), _per_seed(three)
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert a[key][0] == b[key][0], key
        assert a[key][1] == pytest.approx(b[key][1], rel=1e-4, abs=1e-6), key
    out = tmp_path / "cut"
    args = ["citation", "--quick", "--out", str(out), "--no-progress", "--set", "models=[paper]",
            "--set", "baselines=[]", "--set", "num_seeds=3", "--set", "methods=[neumann,gmres]",
            "--set", "checkpoint_every=2", "--set", "seed_batch=3"]
    assert cli.main([*args, "--set", "interrupt_after=5"]) != 0
    # saved at the interrupt (epoch 5), not at the last periodic checkpoint (epoch 4)
    assert load_checkpoint(out / "checkpoints" / "cora_paper_neumann_seeds0-1-2.pt")["epoch"] == 5
    assert cli.main([*args, "--resume"]) == 0
    resumed = _per_seed(json.loads((out / "results.json").read_text()))
    assert resumed == b
    # a finished batch leaves its seeds' records, not its mid-run checkpoint
    assert sorted(p.name for p in (out / "checkpoints").glob("*paper*")) == sorted(
        f"cora_paper_{m}_s{s}.pt" for m in ("neumann", "gmres") for s in (0, 1, 2))


def test_workers_over_other_seeds_share_their_finished_units(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A unit finished by a worker over other seeds (its methods in another order) is reused
    by an interrupted run over all the seeds, resumed with --reuse-from, with the numbers of a
    run that trained it itself; a unit written with a setting that changes its numbers is
    still refused."""
    whole = _per_seed(_run(tmp_path, "whole", "--set", "seed_batch=1"))
    worker = _run(tmp_path, "worker", "--set", "seed_batch=1", "--set", "seeds=[2]",
                  "--set", "methods=[gmres,neumann]")
    base = ["citation", "--quick", "--no-progress", "--device", "cpu", "--set",
            "models=[paper]", "--set", "baselines=[]", "--set", "checkpoint_every=2"]
    main = tmp_path / "main"
    assert cli.main([*base, "--out", str(main), "--set", "num_seeds=3", "--set",
                     "methods=[neumann,gmres]", "--set", "interrupt_after=1"]) != 0
    capsys.readouterr()
    merged = _per_seed(_run(tmp_path, "main", "--set", "seed_batch=1", "--resume",
                            "--reuse-from", str(tmp_path / "worker")))
    assert "cora_paper_gmres_s2: finished by the run in" in capsys.readouterr().err
    assert merged == whole
    assert {k: v for k, v in merged.items() if k[1] == 2} == _per_seed(worker)
    assert (main / "checkpoints" / "cora_paper_gmres_s2.pt").is_file()  # copied: kept here
    args = [*base, "--out", str(tmp_path / "other"), "--set", "seeds=[2]", "--set",
            "methods=[neumann]", "--set", "truncate=3", "--reuse-from", str(main)]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "written by a run with other settings (truncate:" in err and "Traceback" not in err


def _diverge_at(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make the ``calls``-th training forward of the run raise DivergenceError, as a forward
    whose state overflowed does."""
    real, count = rbp.fixed_point, [0]

    def fixed_point(*args, **kwargs):
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] == calls:
                raise rbp.DivergenceError("fixed_point: the forward state is not finite")
        return real(*args, **kwargs)
    monkeypatch.setattr(rbp, "fixed_point", fixed_point)


def test_a_diverged_seed_stops_and_keeps_its_best_epoch_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seed whose training diverges stops there: its result is its best validation epoch
    before it, recorded as diverged (and counted in its Table 1 cell); the run goes on. In a
    batched group the seeds are trained again one at a time, so the others' numbers are those
    of a run in which nothing diverged."""
    from rbp.apps.citation.tables import _fmt

    one = ["--set", "methods=[neumann]", "--set", "num_seeds=2"]
    clean = _per_seed(_run(tmp_path, "clean", *one, "--set", "seed_batch=1"))
    _diverge_at(monkeypatch, 12 + 6)               # seed 1's sixth epoch (12 epochs a seed)
    doc = _run(tmp_path, "lone", *one, "--set", "seed_batch=1")
    row = doc["datasets"]["cora"]["models"]["paper"]["neumann"]
    units = {u["seed"]: u for u in row["per_seed"]}
    assert units[0]["diverged_at"] is None and units[1]["diverged_at"] == 5
    assert units[1]["best_epoch"] <= 5 and max(units[1]["curves"]["eval_epochs"]) <= 5
    assert len(units[1]["curves"]["train_loss"]) == 5
    assert _per_seed(doc)[("neumann", 0)] == clean[("neumann", 0)]
    assert _fmt(row).endswith("(n=2, 12 ep, 1 diverged)")
    _diverge_at(monkeypatch, 7)                     # the batched group's seventh epoch
    batched = _run(tmp_path, "batched", *one, "--set", "seed_batch=2")
    assert _per_seed(batched) == clean            # both seeds again alone, nothing diverged
    units = batched["datasets"]["cora"]["models"]["paper"]["neumann"]["per_seed"]
    assert [u["seed_batch"] for u in units] == [1, 1]
    assert not list((tmp_path / "batched" / "checkpoints").glob("*seeds*"))


@pytest.mark.parametrize("spec, words", [
    ("gpu", "unknown device 'gpu'"), ("cdua", "did you mean 'cuda'"),
    ("cuda:99", "not available"), ("tpu", "valid: auto, cpu, cuda, cuda:N, mps"),
])
def test_bad_devices_are_one_clear_line(spec: str, words: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if spec == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    code = cli.main(["citation", "--quick", "--out", str(tmp_path / "x"), "--device", spec,
                     "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err


@pytest.mark.parametrize("extra, ok", [
    (["--set", "models=[injected]"], False), (["--set", "models=[ignn]"], False),
    (["--set", "models=[injected]", "--set", "baselines=[gcn]"], True),
    (["--set", "models=[injected]", "--set", "baselines=[gcn]", "--set", "gcn_backend=pyg"],
     False),
    (["--set", "models=[injected,ppr]"], True), (["--set", "models=[paper]"], True),
])
def test_seed_batch_without_a_batched_model_is_refused(
    extra: list[str], ok: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """seed_batch applies to the paper model, the PPR GNN and the torch GCN: set for a run
    with none of them it would be ignored, so it is refused."""
    code = cli.main(["citation", "--quick", "--out", str(tmp_path / "x"), "--dry-run",
                     "--set", "seed_batch=2", *extra])
    err = capsys.readouterr().err
    assert (code == 0) == ok, err
    if not ok:
        assert "seed_batch=2 applies to the models paper, ppr" in err and "leave it unset" in err


@pytest.mark.parametrize("setting", ["injected_methods=[neumann,neumann]",
                                     "fp_methods=[bptt,BPTT]", "baselines=[logreg,logreg]"])
def test_a_repeated_method_or_baseline_is_refused(setting: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Each repeat would be trained again and counted as another seed (n=2, std 0.00)."""
    key = setting.split("=")[0]
    assert cli.main(["citation", "--quick", "--out", str(tmp_path / "x"), "--dry-run",
                     "--set", setting]) == 2
    assert f"setting '{key}' repeats" in capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("{cora: {epochs: abc}}", "overrides.cora.epochs expects int, got 'abc'"),
    ("{cora: {injected_epochs: 3.5}}", "overrides.cora.injected_epochs expects int, got 3.5"),
    ("{cora: {injected_dropout: [1]}}", "overrides.cora.injected_dropout expects float"),
])
def test_per_dataset_overrides_are_typed_like_the_settings(
    override: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A per-dataset value of the wrong type is one line at --dry-run (it was a TypeError
    traceback, or a crash mid-run)."""
    assert cli.main(["citation", "--quick", "--out", str(tmp_path / "x"), "--dry-run",
                     "--set", f"overrides={override}"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_seeds_derived_past_the_seed_range_are_refused(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["citation", "--quick", "--out", str(tmp_path / "x"), "--dry-run",
                     "--seed", "4294967295", "--set", "num_seeds=2"]) == 2
    assert "pass 4294967295; choose a smaller seed" in capsys.readouterr().err


def test_auto_and_cpu_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available here"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="must be a string"):
        resolve_device(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_cpu_and_resumes_across_devices(tmp_path: Path) -> None:
    """The same quick run on the GPU and the CPU: the same test accuracies up to float
    round-off in the losses; a checkpoint written on the GPU resumes on the CPU."""
    gpu = _run(tmp_path, "gpu", "--device", "cuda")
    assert gpu["device"].startswith("cuda")
    cpu = _run(tmp_path, "cpu")
    a, b = _per_seed(gpu), _per_seed(cpu)
    for key in a:
        assert a[key][1] == pytest.approx(b[key][1], rel=1e-3, abs=1e-5), key
    out = tmp_path / "moved"
    args = ["citation", "--quick", "--out", str(out), "--no-progress", "--set", "models=[paper]",
            "--set", "baselines=[]", "--set", "checkpoint_every=2"]
    assert cli.main([*args, "--device", "cuda", "--set", "interrupt_after=5"]) != 0
    assert cli.main([*args, "--device", "cpu", "--resume"]) == 0


def _summary(method: str, accs: list[float]) -> dict:
    from rbp.apps.citation.tables import summarise
    return summarise([{"seed": s, "test_acc": a, "method": method,
                       "settings": {"epochs": 2000}} for s, a in enumerate(accs)])


def test_paired_differences_flag_an_order_the_paper_does_not_have() -> None:
    """The paper has TBPTT above BPTT on Cora (46.55 vs 24.48). Seeds where BPTT wins by a
    steady margin make the order differ, with an interval that excludes 0; noisy seeds whose
    mean favours BPTT by chance give an interval that includes 0; agreeing seeds give no row."""
    from rbp.apps.citation.tables import ordering_text, paired_differences

    base = [0.30, 0.42, 0.35, 0.50, 0.28]
    steady = {"datasets": {"cora": {"models": {"paper": {
        "bptt": _summary("bptt", [a + 0.05 for a in base]),
        "tbptt": _summary("tbptt", base)}}}}}
    (row,) = paired_differences(steady, "cora")
    assert (row["a"], row["b"], row["n"]) == ("bptt", "tbptt", 5)
    assert row["mean"] == pytest.approx(5.0) and row["real"]
    assert row["paper"] == pytest.approx(24.48 - 46.55)
    noisy = {"datasets": {"cora": {"models": {"paper": {
        "bptt": _summary("bptt", [0.40, 0.30, 0.50, 0.20, 0.45]),
        "tbptt": _summary("tbptt", [0.35, 0.38, 0.41, 0.30, 0.40])}}}}}
    (row,) = paired_differences(noisy, "cora")
    assert not row["real"] and row["ci"][0] < 0 < row["ci"][1]
    assert "includes 0" in ordering_text(noisy)
    agree = {"datasets": {"cora": {"models": {"paper": {
        "bptt": _summary("bptt", base), "tbptt": _summary("tbptt", [a + 0.1 for a in base])}}}}}
    assert paired_differences(agree, "cora") == [] and ordering_text(agree) == ""


def test_table1_cells_say_n_and_epochs(tmp_path: Path) -> None:
    from rbp.apps.citation.tables import write_table1

    res = {"datasets": {"cora": {"seeds": [0, 1], "baselines": {}, "models": {"paper": {
        "bptt": _summary("bptt", [0.3, 0.4])}}}}}
    text = write_table1(tmp_path / "t.md", res).read_text()
    assert "| BPTT | 24.48 ± 6.6 | 35.00 ± 7.07 (n=2, 2000 ep) |" in text


@pytest.mark.parametrize("exp", ["hopfield", "citation", "hyperopt"])
def test_every_application_takes_device(exp: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--device reaches every application's settings: cpu is ready, an unknown one is refused
    in one line before any work."""
    assert cli.main([exp, "--quick", "--out", str(tmp_path / "ok"), "--device", "cpu",
                     "--dry-run"]) == 0
    capsys.readouterr()
    code = cli.main([exp, "--quick", "--out", str(tmp_path / "bad"), "--device", "nosuch",
                     "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "unknown device 'nosuch'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_citation_seeds_benchmark_refuses_an_unavailable_device(
        capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "citation_seeds.py"
    spec = importlib.util.spec_from_file_location("citation_seeds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "nosuch"]) == 2
    assert "unknown device 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "0"], "--threads: 0 must be at least 1"),
    (["--seeds", "0"], "--seeds: 0 must be at least 1"),
    (["--repeats", "-1"], "--repeats: -1 must be at least 1"),
    (["--methods", "newton"], "--methods: invalid choice: 'newton'"),
    (["--model", "gcn", "--methods", "bptt"], "--methods does not apply with --model gcn"),
    (["--seeds", "2", "2"], "--seeds names 2 more than once"),
])
def test_citation_seeds_benchmark_refuses_bad_options_before_any_work(
        argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad count or method is one usage line, exit 2 (it failed deep inside torch after the
    data was loaded, or with 0 repeats had no median)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "citation_seeds.py"
    spec = importlib.util.spec_from_file_location("citation_seeds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--quick", *argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _ppr_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from rbp.apps.citation.model import normalised_adjacency

    gen = torch.Generator().manual_seed(1)
    upper = torch.triu(torch.rand(N, N, generator=gen) < 0.15, diagonal=1)
    i, j = torch.nonzero(upper, as_tuple=True)
    adj = normalised_adjacency(torch.stack([torch.cat([i, j]), torch.cat([j, i])]), N)
    dense = (torch.rand(N, 20, generator=gen) < 0.2).double() * torch.rand(N, 20, generator=gen)
    return adj.to(torch.float64), dense.to_sparse(), torch.arange(N) % CLASSES


@pytest.mark.parametrize("method", list(rbp.METHODS))
def test_batched_ppr_equals_lone_ppr_runs(method: str) -> None:
    """The PPR GNN of three seeds in one model, dropout on, Adam, backward_tol: each seed's
    weights after three steps equal those of PPRGNN trained alone from manual_seed(seed) with
    torch's own dropout (float64)."""
    from rbp.apps.citation.model import PPRGNN
    from rbp.apps.citation.seeds import SeedBatchedPPR

    adj, x, labels = _ppr_problem()
    seeds, steps, k = [2, 0, 5], 25, 24
    train = [torch.randperm(N, generator=torch.Generator().manual_seed(s))[:8] for s in seeds]
    net = SeedBatchedPPR.from_seeds(20, 8, CLASSES, seeds, 0.2, 0.5).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        logits, _ = net(adj, x, steps, method, k, backward_tol=1e-3)
        torch.stack([F.cross_entropy(logits[i, t], labels[t])
                     for i, t in enumerate(train)]).sum().backward()
        opt.step()
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        alone = PPRGNN(20, 8, CLASSES, 0.2, 0.5).double()
        opt1 = torch.optim.Adam(alone.parameters(), lr=0.01, weight_decay=5e-4)
        for _ in range(3):
            opt1.zero_grad()
            z, _ = alone(adj, x, steps, method, k, backward_tol=1e-3)
            F.cross_entropy(z[train[i]], labels[train[i]]).backward()
            opt1.step()
        torch.testing.assert_close(net.w1[i], alone.mlp[0].lin.weight, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(net.w2[i], alone.mlp[3].weight.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(net.b2[i, 0], alone.mlp[3].bias, rtol=1e-9, atol=1e-12)


def test_experiment_batched_ppr_equals_one_seed_at_a_time(tmp_path: Path) -> None:
    """`rbp citation` with the PPR GNN's three seeds in one model gives the per-seed
    accuracies and losses of one seed at a time (the CPU's default; float32 round-off)."""
    common = ["--set", "models=[ppr]", "--set", "fp_methods=[bptt,neumann]"]
    one = _run(tmp_path, "one", *common)
    all3 = _run(tmp_path, "all", *common, "--set", "seed_batch=3")
    pick = lambda doc: {(m, u["seed"]): (u["test_acc"], u["curves"]["train_loss"], u["seed_batch"])  # noqa: E731
                        for m, row in doc["datasets"]["cora"]["models"]["ppr"].items()
                        for u in row["per_seed"]}
    a, b = pick(one), pick(all3)
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert a[key][0] == b[key][0], key
        assert a[key][1] == pytest.approx(b[key][1], rel=1e-4, abs=1e-6), key
        assert (a[key][2], b[key][2]) == (1, 3)


def test_batched_gcn_equals_one_call_per_seed() -> None:
    """The GCN baseline of three seeds in one model (dropout on): each seed's best validation
    epoch, validation and test accuracy are those of gcn_baseline for that seed alone."""
    from rbp.apps.citation.baselines import GCNSettings, gcn_baseline, gcn_baseline_seeds
    from rbp.apps.citation.model import normalised_adjacency  # noqa: F401 (same Â)

    gen = torch.Generator().manual_seed(4)
    n = 60
    upper = torch.triu(torch.rand(n, n, generator=gen) < 0.1, diagonal=1)
    i, j = torch.nonzero(upper, as_tuple=True)
    ei = torch.stack([torch.cat([i, j]), torch.cat([j, i])])
    x = ((torch.rand(n, 30, generator=gen) < 0.2).float()
         * torch.rand(n, 30, generator=gen)).to_sparse()
    labels = torch.arange(n) % 3
    seeds = [3, 1, 7]
    splits = []
    for s in seeds:
        p = torch.randperm(n, generator=torch.Generator().manual_seed(s))
        splits.append((p[:10], p[10:35], p[35:]))
    st = GCNSettings(hidden=8, epochs=30)
    batched = gcn_baseline_seeds(x, labels, ei, 3, splits, seeds, st)
    for k, s in enumerate(seeds):
        alone = gcn_baseline(x, labels, ei, 3, *splits[k], s, st, backend="torch")
        assert {key: batched[k][key] for key in alone} == alone


def test_experiment_gcn_seeds_batched(tmp_path: Path) -> None:
    common = ["--set", "models=[ppr]", "--set", "fp_methods=[neumann]", "--set",
              "baselines=[gcn]", "--set", "gcn_epochs=15", "--set", "fp_epochs=2"]
    one = _run(tmp_path, "one", *common)
    all3 = _run(tmp_path, "all", *common, "--set", "seed_batch=3")
    rows = [doc["datasets"]["cora"]["baselines"]["gcn"]["per_seed"] for doc in (one, all3)]
    assert [u["seed_batch"] for u in rows[0]] == [1, 1, 1]
    assert [u["seed_batch"] for u in rows[1]] == [3, 3, 3]
    for a, b in zip(*rows, strict=True):
        assert (a["seed"], a["test_acc"], a["best_epoch"]) == (b["seed"], b["test_acc"],
                                                               b["best_epoch"])


def test_ppr_forward_to_a_tolerance_with_warm_starts(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """fp_tol turns the PPR forward into a solve (fewer steps than the budget, recorded per
    seed); fp_warm_start starts each training solve at the last fixed point and reaches the
    same accuracy; a warm start without a tolerance is refused (it would change the state, not
    the work)."""
    common = ["--set", "models=[ppr]", "--set", "fp_methods=[neumann]", "--set",
              "fp_tol=1e-4", "--set", "fp_steps=300", "--set", "fp_epochs=6",
              "--set", "fp_dropout=0.0", "--set", "num_seeds=1"]
    cold = _run(tmp_path, "cold", *common)
    warm = _run(tmp_path, "warm", *common, "--set", "fp_warm_start=true")
    a, b = (doc["datasets"]["cora"]["models"]["ppr"]["neumann"]["per_seed"][0]
            for doc in (cold, warm))
    assert 1 < a["forward_steps_mean"] < 300 and 1 < b["forward_steps_mean"] < 300
    assert a["forward_steps_mean"] != b["forward_steps_mean"]   # it did start elsewhere
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01)
    code = cli.main(["citation", "--quick", "--out", str(tmp_path / "bad"), "--dry-run",
                     "--set", "fp_warm_start=true"])
    assert code != 0 and "fp_warm_start needs fp_tol" in capsys.readouterr().err
