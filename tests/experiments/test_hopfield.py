"""Tests of the associative-memory application (rbp hopfield)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rbp
from rbp.apps.hopfield.experiment import HopfieldConfig, load_digits
from rbp.apps.hopfield.model import Hopfield, corrupt, full_update, hopfield_jacobian
from rbp.runner import ConfigError, cli, read_json
from rbp.runner.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
needs_data = pytest.mark.skipif(not (DATA / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="shared MNIST data not present")


def _small(a: float = 1.0, std: float = 0.3, seed: int = 0) -> Hopfield:
    return Hopfield(5, 4, 3, a=a, b=0.5, init_std=std,
                    generator=torch.Generator().manual_seed(seed)).double()


def test_effective_weight_symmetric_zero_diagonal() -> None:
    m = _small()
    w = m.effective_weight()
    assert torch.equal(w, w.T) and torch.all(torch.diagonal(w) == 0)
    assert torch.count_nonzero(w) == w.numel() - w.shape[0]
    # free rows built by the custom autograd function equal the rows of W_eff, and so do
    # their gradients
    assert torch.allclose(m.free_rows(), w[m.n_visible:])
    w_in = m.W.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: rbp.apps.hopfield.model._FreeRows.apply(v, m.n_visible), (w_in,))


@pytest.mark.parametrize("a", [1.0, 0.7])
def test_update_matches_clamped_full_step_and_jacobian(a: float) -> None:
    torch.manual_seed(0)
    m = _small(a=a)
    x = (torch.rand(m.n_visible) > 0.5).double()
    h = torch.randn(m.n_free, dtype=torch.float64)
    f = m.update(x)
    full = full_update(m, torch.cat([x, h]), x)
    assert torch.equal(full[:m.n_visible], x)                     # clamping holds
    assert torch.allclose(full[m.n_visible:], f(h))              # free rows = reduced map
    # batched input gives the same rows
    hb = torch.stack([h, 2 * h])
    assert torch.allclose(m.update(x.expand(2, -1))(hb)[1], f(2 * h))

    dense = torch.autograd.functional.jacobian(f, h)
    assert torch.allclose(dense, hopfield_jacobian(m, h.detach()), atol=1e-12)
    v = torch.randn(m.n_free, dtype=torch.float64)
    hr = h.clone().requires_grad_()
    (jtv,) = torch.autograd.grad(f(hr), hr, v)
    _, jv = torch.func.jvp(f, (h,), (v,))
    assert torch.allclose(jtv, dense.T @ v) and torch.allclose(jv, dense @ v)
    assert not torch.allclose(jtv, jv)  # the Jacobian is not symmetric (diag(sigma') factor)


def test_inference_clamps_and_settles() -> None:
    torch.manual_seed(1)
    m = _small(std=0.1)
    x = (torch.rand(m.n_visible) > 0.5).double()
    with torch.no_grad():
        y, info = m(x, steps=50, checks=rbp.Checks(trace=True))
    assert y.shape == (m.n_output,) and len(info.forward_trace) == 50
    assert info.forward_trace[-1] < 1e-10 < info.forward_trace[0]
    assert torch.allclose(m.output(m.initial_state(x), "sigmoid"), torch.full((3,), 0.5,
                                                                              dtype=y.dtype))


def test_corruption_removes_half_of_the_ink_seeded() -> None:
    gen = torch.Generator().manual_seed(3)
    images = (torch.rand(6, 50, generator=gen) > 0.6).float()
    images[0] = 0.0
    images[1, :7] = 1.0
    images[1, 7:] = 0.0  # 7 non-zero pixels: 4 removed (halves round up)
    out = corrupt(images, 0.5, seed=11)
    for before, after in zip(images, out, strict=True):
        n = int(before.sum())
        assert int(after.sum()) == n - (n + 1) // 2
        assert torch.all(after <= before)  # only ink is removed
    assert torch.equal(out, corrupt(images, 0.5, seed=11))
    assert not torch.equal(out, corrupt(images, 0.5, seed=12))


@needs_data
def test_digits_are_first_of_each_class() -> None:
    x, idx = load_digits(str(DATA), 10)
    from rbp.data import load_mnist

    _, labels = load_mnist(str(DATA), "t10k")
    assert labels[idx].tolist() == list(range(10))
    assert all(int((labels[: i] == d).sum()) == 0 for d, i in enumerate(idx))
    assert x.shape == (10, 784) and set(x.unique().tolist()) == {0.0, 1.0}


def test_neumann_matches_bptt_on_full_size_model() -> None:
    """Real size (2592 neurons), random W making a contraction: Neumann-RBP with many terms
    gives BPTT's gradient once the forward has converged."""
    torch.set_num_threads(1)
    m = Hopfield(init_std=0.02, generator=torch.Generator().manual_seed(0))
    x = (torch.rand(784, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    grads = {}
    for method in ("bptt", "neumann", "rbp"):
        m.zero_grad()
        y, info = m(x, 50, method, 40, checks=rbp.Checks(trace=True))
        (y - x).abs().mean().backward()
        grads[method] = m.W.grad.clone()
        assert info.forward_trace[-1] < 1e-5 * info.forward_trace[0]
    scale = grads["bptt"].norm()
    assert scale > 0
    assert (grads["neumann"] - grads["bptt"]).norm() < 1e-4 * scale
    assert (grads["rbp"] - grads["bptt"]).norm() < 1e-4 * scale
    # the gradient of the symmetric parametrisation is symmetric with zero diagonal
    g = grads["bptt"]
    assert torch.allclose(g, g.T) and torch.all(torch.diagonal(g) == 0)


def _run(out: Path, *extra: str) -> int:
    return cli.main(["hopfield", "--out", str(out), "--no-progress", *extra])


def test_quick_run_shows_the_paper_in_small(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``rbp hopfield --quick`` offline (embedded digits): BPTT and Neumann-RBP learn to
    retrieve (binarised validation L1 below its untrained value, training loss falls), and
    original RBP's curves are the worst (Fig. 1 of the paper, in small)."""
    out = tmp_path / "q"
    assert _run(out, "--quick") == 0
    res = read_json(out / "results.json")
    # each method's line says the untrained and the final values, raw and binarised
    err = capsys.readouterr().err
    for name, r in res["methods"].items():
        assert r["untrained_val_l1"] == r["val_loss"][0]
        assert r["untrained_val_l1_binary"] == r["val_loss_binary"][0]
        assert (f"{name}: validation L1 {r['untrained_val_l1']:.4f} untrained -> "
                f"{r['final_val_l1']:.4f}, retrieval error (binarised) "
                f"{r['untrained_val_l1_binary']:.4f} untrained -> "
                f"{r['final_val_l1_binary']:.4f}") in err, err
    assert res["status"] == "finished" and res["truncate"] == 10
    for name in ("fig1_loss.png", "fig2_retrieval.png", "fig3_forward_trace.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    methods = res["methods"]
    n = res["steps_per_epoch"]
    assert sorted(methods) == ["bptt", "neumann", "rbp"] and n == 3
    for name, r in methods.items():
        assert r["val_epochs"] == list(range(0, 31, 5)), name
        assert len(r["train_loss"]) == 30 * n and len(r["retrieved"]) == n
        assert len(r["forward_trace"][0]) == 50 and r["forward_trace"][-1][-1] < 1e-3
    for name in ("bptt", "neumann"):
        r = methods[name]
        first, last = sum(r["train_loss"][:n]), sum(r["train_loss"][-n:])
        assert last < 0.5 * first, name                      # training loss falls
        assert r["val_loss_binary"][-1] < 0.8 * r["val_loss_binary"][0], name  # retrieval
    rbp_run = methods["rbp"]
    for key in ("val_loss", "val_loss_binary"):
        others = max(methods[m][key][-1] for m in ("bptt", "neumann"))
        assert rbp_run[key][-1] > others, key                # RBP ends worst
    assert rbp_run["val_loss"][-1] > 2 * rbp_run["val_loss"][0]   # ... and blew up
    # Prop. 1 in practice: with a settled forward, Neumann-RBP trains like BPTT at first
    b, nm = methods["bptt"]["train_loss"], methods["neumann"]["train_loss"]
    assert max(abs(u - v) for u, v in zip(b[:n], nm[:n], strict=True)) < 1e-3


def test_resume_gives_identical_numbers(tmp_path: Path) -> None:
    common = ["--method", "rbp,tbptt", "--epochs", "3",
              "--set", "num_digits=2", "--set", "n_hidden=8", "--set", "checkpoint_every=2",
              "--set", "val_every=1", "--truncate", "5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(full, *common) == 0
    # interrupted in the second method at its step 3 (checkpoint at step 2), then resumed
    assert _run(cut, *common, "--set", "interrupt_after=9") == 130
    assert read_json(cut / "results.json")["status"] == "interrupted"
    paths = sorted((cut / "checkpoints").glob("*.pt"))  # with the data's SHA-256 (moved runs)
    assert paths and all(set(load_checkpoint(p)["_rbp_data"]) == {"digits"} for p in paths)
    assert _run(cut, *common, "--resume") == 0
    a, b = read_json(full / "results.json"), read_json(cut / "results.json")
    for r in (*a["methods"].values(), *b["methods"].values()):
        r.pop("wall_time_s")
    assert b["resumed"] is True and a["methods"] == b["methods"]
    # and interrupting the first method (rbp draws random z0: its RNG state is restored)
    cut2 = tmp_path / "cut2"
    assert _run(cut2, *common, "--set", "interrupt_after=5") == 130
    assert _run(cut2, *common, "--resume") == 0
    c = read_json(cut2 / "results.json")
    for r in c["methods"].values():
        r.pop("wall_time_s")
    assert c["methods"] == a["methods"]
    # an interrupt far from any periodic checkpoint saves where it stopped: nothing lost
    cut3, rare = tmp_path / "cut3", [*common, "--set", "checkpoint_every=1000"]
    assert _run(cut3, *rare, "--set", "interrupt_after=9") == 130
    assert load_checkpoint(cut3 / "checkpoints" / "tbptt.pt")["step"] == 3
    assert _run(cut3, *rare, "--resume") == 0
    d = read_json(cut3 / "results.json")
    for r in d["methods"].values():
        r.pop("wall_time_s")
    assert d["methods"] == a["methods"]


def test_sweep_merges_its_points_into_one_run(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "hopfield", "--quick", "--grid", "method=bptt,neumann",
                     "--set", "epochs=2", "--out", str(out), "--workers", "2",
                     "--no-progress"]) == 0
    merged = read_json(out / "summary" / "run" / "results.json")
    assert merged["experiment"] == "hopfield" and merged["status"] == "finished"
    for method in ("bptt", "neumann"):
        point = read_json(out / f"method-{method}" / "results.json")
        assert merged["methods"][method] == point["methods"][method]
        assert merged["images"] == point["images"]
    for name in ("fig1_loss.png", "fig2_retrieval.png"):
        assert (out / "summary" / "run" / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("a=0", "a must be positive, got 0.0"),        # the Euler step: h never settles
        ("a=-1", "a must be positive, got -1.0"),
        ("lr=0", "lr must be positive, got 0.0"),
        ("n_hidden=-1", "n_hidden must be >= 0, got -1"),
        ("init_std=-0.5", "init_std must be >= 0.0, got -0.5"),
        ("truncate=60", "tbptt needs truncate <= steps (60 > 50); lower truncate or raise steps"),
    ],
)
def test_bad_settings_name_the_setting_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    """One line naming the setting and its value (before: "need n_hidden >= 0, lr > 0 and
    init_std >= 0" whichever was wrong, and a step a <= 0 ran)."""
    assert _run(tmp_path / "bad", "--dry-run", "--set", setting) == 2
    err = capsys.readouterr().err
    assert f"rbp hopfield: error: {message}" in err and "Traceback" not in err, err
    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=key):
        HopfieldConfig(**{key: float(value) if key in ("a", "lr", "init_std")
                          else int(value)}).validate()


def test_a_model_too_big_for_memory_is_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """n_hidden=10^9 asks for 4 * 10^18 bytes: a one-line error, not torch's traceback."""
    assert _run(tmp_path / "big", "--quick", "--set", "n_hidden=1000000000") == 1
    err = capsys.readouterr().err
    assert "error: out of memory" in err and "lower the model or batch sizes" in err, err
    assert "Traceback" not in err
    assert read_json(tmp_path / "big" / "results.json")["status"] == "failed"
