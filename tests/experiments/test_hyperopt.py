"""Tests of the hyperparameter-optimisation application (rbp hyperopt)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rbp.apps.hyperopt import model
from rbp.apps.hyperopt.experiment import HyperoptConfig, Problem, initial_state, meta_step
from rbp.runner import ConfigError, cli
from rbp.runner.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MNIST = DATA / "mnist"


def _tiny_problem(n: int = 40, sizes: tuple[int, ...] = (6, 5, 4, 3), batch: int = 8,
                  seed: int = 0, scale: float = -1.0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (n,), generator=gen)
    onehot = torch.nn.functional.one_hot(y, sizes[-1]).double()
    return Problem(x, y, onehot, sizes, batch, seed, scale)


def _hyper(n_tensors: int, a: float = -1.0, b: float = 0.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    log_lr = a + 0.3 * torch.randn(n_tensors, generator=gen, dtype=torch.float64)
    logit = b + 0.5 * torch.randn(n_tensors, generator=gen, dtype=torch.float64)
    return log_lr.requires_grad_(), logit.requires_grad_()


def test_manual_gradient_matches_autograd() -> None:
    prob = _tiny_problem()
    params = [p.requires_grad_() for p in model.init_params(prob.sizes, 1, -1.0, torch.float64)]
    value, grads = model.loss_and_grad(params, prob.x, prob.y_onehot)
    ref = torch.autograd.grad(model.loss(params, prob.x, prob.y), params)
    assert value.item() == pytest.approx(model.loss(params, prob.x, prob.y).item(), rel=1e-12)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_momentum_update_against_hand_computed_step() -> None:
    w = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)]
    v = [torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)]
    g = [torch.tensor([3.0, -1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)]
    a = torch.tensor([math.log(0.5), math.log(0.1)], dtype=torch.float64)
    b = torch.tensor([0.0, math.log(0.9 / 0.1)], dtype=torch.float64)  # beta = 0.5, 0.9
    out = model.momentum_update(w, v, g, a, b)
    # tensor 0: v' = 0.5*v - 0.5*g = [-1.45, 0.6]; w' = w + 0.5 v' = [0.275, -1.7]
    # tensor 1: v' = 0.9*(-1) - 0.1*2 = -1.1; w' = 0.5 + 0.1*(-1.1) = 0.39
    torch.testing.assert_close(out[0], torch.tensor([0.275, -1.7], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([0.39], dtype=torch.float64))
    torch.testing.assert_close(out[2], torch.tensor([-1.45, 0.6], dtype=torch.float64))
    torch.testing.assert_close(out[3], torch.tensor([-1.1], dtype=torch.float64))


def test_step_uses_the_scheduled_minibatch() -> None:
    prob = _tiny_problem()
    a, b = _hyper(6)
    batches = model.minibatch_indices(len(prob.x), prob.batch_size, 4, seed=0)
    assert batches.shape == (4, 8) and len(set(batches[:5].flatten().tolist())) == 32
    step = model.make_step(prob.x, prob.y_onehot, a, b, batches)
    h0 = initial_state(prob)
    with torch.no_grad():
        out = step(h0, 2)
        _, grads = model.loss_and_grad(list(h0[:6]), prob.x[batches[2]],
                                       prob.y_onehot[batches[2]])
        expected = model.momentum_update(h0[:6], h0[6:], grads, a, b)
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e)


def _meta_loss_value(prob: Problem, a: torch.Tensor, b: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        return meta_step(prob, a, b, steps, 1, "bptt", backward=False)[0]


@pytest.mark.parametrize("inner_grad", ["manual", "autograd"])
def test_bptt_hypergradient_matches_finite_differences(inner_grad: str) -> None:
    prob = _tiny_problem()
    a, b = _hyper(6)
    meta_step(prob, a, b, 3, 3, "bptt", inner_grad=inner_grad)
    analytic = torch.cat([a.grad, b.grad])
    eps, numeric = 1e-6, []
    for vec in (a, b):
        for i in range(len(vec)):
            vals = []
            for sign in (1, -1):
                with torch.no_grad():
                    vec[i] += sign * eps
                vals.append(_meta_loss_value(prob, a, b, 3))
                with torch.no_grad():
                    vec[i] -= sign * eps
            numeric.append((vals[0] - vals[1]) / (2 * eps))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)
    assert analytic.abs().max() > 1e-4  # a non-trivial gradient


def test_neumann_equals_bptt_on_a_converged_run() -> None:
    """Full-batch steps on softmax regression with random labels (strictly convex up to the
    class shift, which the gradient never excites) converge to a fixed point; Neumann-RBP
    then gives BPTT's gradient. At a fixed point of gradient descent the weights no longer
    depend on the learning rate or momentum, so the hypergradient vanishes; the gradient with
    respect to the training inputs x (which move the fixed point) is the non-trivial check."""
    prob = _tiny_problem(n=100, sizes=(3, 3), batch=100, scale=-1.0)
    prob.x.requires_grad_()
    grads, hyper = {}, {}
    for method in ("bptt", "neumann"):
        prob.x.grad = None
        a = torch.full((2,), math.log(3.0), dtype=torch.float64, requires_grad=True)
        b = torch.full((2,), -2.0, dtype=torch.float64, requires_grad=True)
        _, info = meta_step(prob, a, b, 200, 100, method)
        assert info.relative_final_difference < 1e-12  # converged
        grads[method] = prob.x.grad.clone()
        hyper[method] = torch.cat([a.grad, b.grad])
    assert grads["bptt"].norm() > 1e-3
    torch.testing.assert_close(grads["neumann"], grads["bptt"], rtol=1e-8, atol=1e-12)
    # a short run (far from the fixed point) has a clearly non-zero hypergradient
    a = torch.full((2,), math.log(3.0), dtype=torch.float64, requires_grad=True)
    b = torch.full((2,), -2.0, dtype=torch.float64, requires_grad=True)
    meta_step(prob, a, b, 2, 2, "bptt")
    short = torch.cat([a.grad, b.grad]).abs().max()
    assert short > 1e-3
    assert hyper["bptt"].abs().max() < 1e-10 * short
    assert hyper["neumann"].abs().max() < 1e-10 * short


# ---------------------------------------------------------------- end to end via the CLI


def _cli(out: Path, *extra: str) -> int:
    return cli.main(["hyperopt", "--out", str(out), "--no-progress", "--quick", *extra])


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick"
    assert _cli(out, "--method", "tbptt,neumann") == 0
    doc = json.loads((out / "results.json").read_text())
    err = capsys.readouterr().err  # each unit's meta loss, first and last
    for tag, unit in doc["units"].items():
        assert (f"{tag}: meta loss {unit['meta_loss'][0]:.5f} at the first meta step -> "
                f"{unit['final_meta_loss']:.5f} at the last of 3") in err, err
    assert doc["status"] == "finished" and doc["quick"] is True
    units = doc["units"]
    assert sorted(units) == ["T30_K10_neumann", "T30_K10_tbptt"]
    first = {u["meta_loss"][0] for u in units.values()}
    assert len(first) == 1  # same hyperparameters, data and seed: the same first inner run
    for unit in units.values():
        assert unit["meta_steps_done"] == 3 and len(unit["wall_time_s"]) == 3
        assert len(unit["learning_rate"]) == 3 and len(unit["learning_rate"][0]) == 8
        assert all(0 < m < 1 for row in unit["momentum"] for m in row)
        assert len(unit["inner_loss_last"]) == 30 and all(map(math.isfinite, unit["meta_loss"]))
        # the hyperparameters learn: the meta loss falls at every meta step
        assert all(b < a for a, b in zip(unit["meta_loss"], unit["meta_loss"][1:], strict=False))
    # Adam's first step moves each log learning rate from -1 by at most its lr 0.05
    moves = [abs(a + 1.0) for a in units["T30_K10_tbptt"]["log_lr"][0]]
    assert max(moves) == pytest.approx(0.05, abs=1e-6) and all(m <= 0.05 + 1e-6 for m in moves)
    for name in ("fig4_tsne.png", "fig5_meta_loss.png", "fig6_last_training_loss.png",
                 "hyperparams_T30_K10.png"):
        assert (out / name).stat().st_size > 1000
    assert set(units["T30_K10_neumann"]["trajectories"]) == {"2", "3"}


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    args = ("--method", "tbptt,rbp", "--set", "tsne_meta_steps=[]")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _cli(full, *args) == 0
    assert _cli(cut, *args, "--set", "interrupt_after=4") == 130
    partial = json.loads((cut / "results.json").read_text())
    assert partial["status"] == "interrupted"
    paths = sorted((cut / "checkpoints").glob("*.pt"))  # with the data's SHA-256 (moved runs)
    assert paths and all(set(load_checkpoint(p)["_rbp_data"]) == {"mnist"} for p in paths)
    assert _cli(cut, *args, "--resume") == 0
    a = json.loads((full / "results.json").read_text())["units"]
    b = json.loads((cut / "results.json").read_text())["units"]
    for tag in a:  # rbp draws z_0 ~ U[0,1]: equal only if the RNG state was restored
        assert a[tag]["meta_loss"] == b[tag]["meta_loss"]
        assert a[tag]["log_lr"] == b[tag]["log_lr"]
        assert a[tag]["logit_momentum"] == b[tag]["logit_momentum"]


def test_an_interrupt_between_checkpoints_loses_no_meta_step(tmp_path: Path) -> None:
    """With checkpoints every 100 meta steps, an interrupt after meta step 2 saves meta step 2,
    and the resumed run gives the uninterrupted numbers."""
    args = ("--method", "rbp", "--set", "tsne_meta_steps=[]", "--set", "checkpoint_every=100")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _cli(full, *args) == 0
    assert _cli(cut, *args, "--set", "interrupt_after=2") == 130
    assert load_checkpoint(cut / "checkpoints" / "T30_K10_rbp.pt")["step"] == 2
    assert _cli(cut, *args, "--resume") == 0
    a = json.loads((full / "results.json").read_text())["units"]["T30_K10_rbp"]
    b = json.loads((cut / "results.json").read_text())["units"]["T30_K10_rbp"]
    assert a["meta_loss"] == b["meta_loss"] and a["log_lr"] == b["log_lr"]


def test_a_unit_started_after_a_resume_draws_what_it_would_have_drawn(tmp_path: Path) -> None:
    """Each unit starts its own random stream (RBP's uniform z_0): a unit begun after a resume
    gives the numbers of an uninterrupted run (it drew from wherever the stream stood)."""
    args = ("--method", "rbp,neumann", "--set", "settings=[[30,10],[20,10]]",
            "--set", "checkpoint_every=5", "--set", "meta_steps=8", "--set", "tsne_meta_steps=[]")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _cli(full, *args) == 0
    assert _cli(cut, *args, "--set", "interrupt_after=19") == 130  # in the 3rd unit, before
    assert _cli(cut, *args, "--resume") == 0                      # its first checkpoint
    a = json.loads((full / "results.json").read_text())["units"]
    b = json.loads((cut / "results.json").read_text())["units"]
    assert set(a) == set(b)
    for tag in a:
        assert a[tag]["meta_loss"] == b[tag]["meta_loss"], tag


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--set", "batch_size=0"), "batch_size must be at least 1"),
        (("--set", "init_momentum=1.5"), "init_momentum must lie in"),
        (("--set", "inner_grad=fast"), "inner_grad must be"),
        (("--set", "settings=[[100]]"), "settings entries must be"),
        (("--train-steps", "10", "--truncate", "20", "--method", "tbptt"),
         "tbptt needs truncate <= train_steps"),
        (("--method", "sgd"), "sgd"),
        (("--set", "meta_lr=-1"), "meta_lr must be positive"),
        (("--set", "tsne_methods=[tbptt,neuman]"), "in tsne_methods; did you mean 'neumann'"),
        # these passed the dry run once, then failed or silently did something else
        (("--set", "sizes=[784,50,5]"), "sizes must start with 784 (the MNIST pixels) and end "
                                         "with 10 (the classes), got [784, 50, 5]"),
        (("--set", "sizes=[10,10]"), "sizes must start with 784"),
        (("--set", "split=foo"), "split must be one of train, t10k, got 'foo'"),
        (("--set", "split=train"), "split='train' applies to MNIST IDX files only"),
        (("--set", "batch_size=2000"), "batch_size=2000 exceeds num_examples=1000"),
        (("--set", "settings=[[30,10],[30,10]]"), "settings repeats [30, 10]; list each once"),
        (("--set", "tsne_setting=[0,0]"), "tsne_setting must be [train_steps, truncate] with "
                                          "both >= 1"),
        (("--set", "tsne_meta_steps=[0,2]"), "tsne_meta_steps counts meta steps from 1, got [0]"),
        (("--set", "tsne_meta_steps=[2,2]"), "tsne_meta_steps repeats 2"),
        (("--set", "tsne_methods=[tbptt,tbptt]"), "tsne_methods repeats tbptt"),
        (("--set", "meta_lr_decay_after=-1"), "meta_lr_decay_after must be >= 0"),
    ],
)
def test_bad_settings_fail_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    assert _cli(tmp_path / "bad", "--dry-run", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_config_validation_direct() -> None:
    with pytest.raises(ConfigError, match="last_step"):
        HyperoptConfig(last_step="half").validate()
    assert HyperoptConfig(train_steps=500, truncate=100).grid() == [(500, 100)]
    assert len(HyperoptConfig().grid()) == 7


@pytest.mark.skipif(not MNIST.is_dir(), reason="real MNIST files not present")
def test_real_mnist_problem_shape() -> None:
    from rbp.apps.hyperopt.experiment import load_problem

    prob = load_problem(str(MNIST), "t10k", 10000, [784, 50, 50, 50, 10], 200, 0)
    assert prob.x.shape == (10000, 784) and prob.y_onehot.shape == (10000, 10)
    assert prob.x.mean(0).abs().max() < 1e-5  # mean-subtracted pixels
    assert float(prob.x.max()) <= 1.0


def test_a_split_with_a_data_dir_and_the_default_sizes_pass() -> None:
    HyperoptConfig(data_dir="/data/mnist", split="train").validate()
    with pytest.raises(ConfigError, match="embedded digits have no split"):
        HyperoptConfig(split="train").validate()


def test_a_tsne_setting_no_unit_matches_says_fig4_is_not_drawn(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Valid t-SNE settings that match none of the run's units (a documented run may train
    another grid) draw no Fig. 4, and the run says so and why."""
    out = tmp_path / "q"
    assert _cli(out, "--method", "neumann", "--set", "meta_steps=1",
                "--set", "tsne_setting=[40,10]") == 0
    err = capsys.readouterr().err
    assert "fig4 not drawn: no unit of this run is tsne_setting=[40, 10]" in err
    assert "fig4" not in json.loads((out / "results.json").read_text())["figures"]
