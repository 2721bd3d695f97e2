"""Gradient-based hyperparameter optimisation through SGD with momentum (paper §5.3).

Per meta step: train the MLP for ``T`` steps from the same initial weights with learning rates
``exp(a_i)`` and momenta ``sigmoid(b_i)``, measure the training loss on all training examples,
and take its gradient with respect to ``(a, b)`` by BPTT, TBPTT(K) or an RBP method with K
backward iterations; then one Adam step on ``(a, b)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rbp
from rbp.apps.hyperopt import model
from rbp.data import MNIST_SPLITS, DataError, describe_mnist_source, load_mnist
from rbp.runner import (
    ConfigError,
    RunContext,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rbp.runner.config import DATA_DIR_ENV, check_methods
from rbp.runner.device import describe_device, resolve_device

#: (training steps, truncation) of paper Fig. 5 and 6.
PAPER_GRID: list[list[int]] = [
    [100, 50], [500, 50], [1000, 50], [1500, 50], [100, 100], [500, 100], [1500, 100],
]
METHODS: tuple[str, ...] = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")


@dataclass
class HyperoptConfig:
    """Settings of ``rbp hyperopt`` (defaults: the paper's protocol, SPEC §2c)."""

    methods: list[str] = field(default_factory=lambda: ["bptt", "tbptt", "rbp", "neumann"])
    seed: int = 0
    checkpoint_every: int = 5
    data_dir: str | None = None
    split: str = "t10k"
    num_examples: int = 10000
    sizes: list[int] = field(default_factory=lambda: list(model.PAPER_SIZES))
    batch_size: int = 200
    init_scale: float = -3.0
    init_log_lr: float = -1.0
    init_momentum: float = 0.5
    meta_steps: int = 100
    meta_lr: float = 0.05
    meta_lr_decay_after: int = 50
    meta_lr_decay: float = 0.1
    settings: list[list[int]] = field(default_factory=lambda: [list(s) for s in PAPER_GRID])
    train_steps: int | None = None
    truncate: int | None = None
    rbp_init: str = "uniform"
    inner_grad: str = "manual"
    last_step: str = "full"
    tsne_setting: list[int] = field(default_factory=lambda: [1000, 50])
    tsne_methods: list[str] = field(default_factory=lambda: ["tbptt", "neumann"])
    tsne_meta_steps: list[int] = field(default_factory=lambda: [20, 40])
    tsne_every: int = 10
    tsne_dims: int = 256
    interrupt_after: int | None = None    # testing: Ctrl-C after this many meta steps
    device: str = "auto"                  # auto (CUDA when available, else CPU), cpu, cuda:N

    def grid(self) -> list[tuple[int, int]]:
        """The (T, K) settings to run: ``--train-steps/--truncate`` override ``settings``."""
        if self.train_steps is not None or self.truncate is not None:
            return [(self.train_steps or 1000, self.truncate or 50)]
        return [(int(s[0]), int(s[1])) for s in self.settings]

    def validate(self) -> None:
        """Reject impossible values with a message naming the setting."""
        positive = ("num_examples", "batch_size", "meta_steps", "tsne_every", "tsne_dims")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("train_steps", "truncate"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.meta_lr_decay_after < 0:
            raise ConfigError(f"meta_lr_decay_after must be >= 0 (0: decay from the first meta "
                              f"step), got {self.meta_lr_decay_after}")
        if not self.settings and self.train_steps is None:
            raise ConfigError("settings is empty: give at least one [train_steps, truncate]")
        for s in self.settings:
            if len(s) != 2 or s[0] < 1 or s[1] < 1:
                raise ConfigError(
                    f"settings entries must be [train_steps, truncate] with both >= 1, got {s}"
                )
        repeated = _repeats(self.settings)
        if repeated:  # the second would silently reuse the first's unit
            raise ConfigError(f"settings repeats {', '.join(repeated)}; list each once")
        self._validate_data()
        if not 0.0 < self.init_momentum < 1.0:
            raise ConfigError(f"init_momentum must lie in (0, 1), got {self.init_momentum}")
        if not self.meta_lr > 0:
            raise ConfigError(f"meta_lr must be positive, got {self.meta_lr}")
        if not self.meta_lr_decay > 0:
            raise ConfigError(f"meta_lr_decay must be positive, got {self.meta_lr_decay}")
        if self.rbp_init not in ("uniform", "zeros"):
            raise ConfigError(f"rbp_init must be 'uniform' or 'zeros', got {self.rbp_init!r}")
        if self.inner_grad not in model.INNER_GRADS:
            raise ConfigError(f"inner_grad must be 'manual' or 'autograd', got "
                              f"{self.inner_grad!r}")
        if self.last_step not in ("full", "minibatch"):
            raise ConfigError(f"last_step must be 'full' or 'minibatch', got "
                              f"{self.last_step!r}")
        self._validate_tsne()
        for t, k in self.grid():
            if k > t and "tbptt" in self.methods:
                raise ConfigError(f"tbptt needs truncate <= train_steps; got T={t}, K={k}")
        resolve_device(self.device)

    def _validate_data(self) -> None:
        """MNIST fixes the input width (784 pixels), the output width (10 classes) and the
        splits; the embedded digits have no split."""
        if len(self.sizes) < 2 or any(n < 1 for n in self.sizes):
            raise ConfigError(f"sizes must list >= 2 positive layer widths, got {self.sizes}")
        if self.sizes[0] != 784 or self.sizes[-1] != 10:
            raise ConfigError(f"sizes must start with 784 (the MNIST pixels) and end with 10 "
                              f"(the classes), got {self.sizes}")
        if self.split not in MNIST_SPLITS:
            raise ConfigError(f"split must be one of {', '.join(MNIST_SPLITS)}, got "
                              f"{self.split!r}")
        if self.data_dir is None and self.split != "t10k":
            raise ConfigError(f"split={self.split!r} applies to MNIST IDX files only, and the "
                              "embedded digits have no split: pass --data-dir, or leave split "
                              "at t10k")
        if self.batch_size > self.num_examples:
            raise ConfigError(f"batch_size={self.batch_size} exceeds num_examples="
                              f"{self.num_examples}; lower batch_size or raise num_examples")

    def _validate_tsne(self) -> None:
        """Fig. 4's settings: impossible or repeated values would silently draw nothing."""
        if len(self.tsne_setting) != 2 or min(self.tsne_setting) < 1:
            raise ConfigError(f"tsne_setting must be [train_steps, truncate] with both >= 1, "
                              f"got {self.tsne_setting}")
        check_methods(self.tsne_methods, METHODS, "tsne_methods")  # a typo drew nothing
        bad = [s for s in self.tsne_meta_steps if s < 1]
        if bad:
            raise ConfigError(f"tsne_meta_steps counts meta steps from 1, got {bad}; "
                              "use [] for no t-SNE figure")
        for key in ("tsne_methods", "tsne_meta_steps"):
            repeated = _repeats(getattr(self, key))
            if repeated:
                raise ConfigError(f"{key} repeats {', '.join(repeated)}; list each once")


def _repeats(values: list[Any]) -> list[str]:
    """The entries of ``values`` that appear more than once, as text."""
    return sorted({str(v) for v in values if values.count(v) > 1})


# ---------------------------------------------------------------- data and one meta step


@dataclass
class Problem:
    """Training data of the inner problem: ``x`` (N, 784) float, ``y`` (N,) classes."""

    x: torch.Tensor
    y: torch.Tensor
    y_onehot: torch.Tensor
    sizes: tuple[int, ...]
    batch_size: int
    seed: int
    init_scale: float = -3.0


def load_problem(
    data_dir: str | None, split: str, num_examples: int, sizes: list[int], batch_size: int,
    seed: int, init_scale: float = -3.0, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Problem:
    """MNIST pixels / 255 minus the per-pixel mean, a seeded subset of ``num_examples``, on
    ``device`` (the subset and the mean are taken on the CPU: the same data on any device)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.as_tensor(np.asarray(images)).reshape(len(images), -1).to(dtype) / 255.0
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.shape[1] != sizes[0]:
        raise ValueError(f"sizes[0]={sizes[0]} but the images have {x.shape[1]} pixels")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    order = order[: min(num_examples, len(x))]
    x, y = x[order], y[order]
    if batch_size > len(x):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(x)} training examples")
    x = x - x.mean(0, keepdim=True)
    onehot = torch.nn.functional.one_hot(y, sizes[-1]).to(dtype)
    return Problem(x.contiguous().to(device), y.to(device), onehot.to(device), tuple(sizes),
                   batch_size, seed, init_scale)


def initial_state(problem: Problem) -> tuple[torch.Tensor, ...]:
    """``h_0 = (w_1..w_n, 0..0)``: the seeded initial weights and zero velocities."""
    w = model.init_params(problem.sizes, problem.seed, problem.init_scale, problem.x.dtype)
    w = [p.to(problem.x.device) for p in w]
    return (*w, *[torch.zeros_like(p) for p in w])


def meta_step(
    problem: Problem,
    log_lr: torch.Tensor,
    logit_momentum: torch.Tensor,
    steps: int,
    truncate: int,
    method: str,
    *,
    rbp_init: str = "uniform",
    loss_record: list[torch.Tensor] | None = None,
    snapshot: Callable[[int, tuple[torch.Tensor, ...]], None] | None = None,
    backward: bool = True,
    inner_grad: str = "manual",
    last_step: str = "full",
) -> tuple[float, rbp.FixedPointInfo]:
    """One inner run of ``steps`` optimiser steps and the hypergradient of the meta loss.

    Steps ``0..T-2`` use mini-batches (the same seeded sequence at every meta step); the last
    step ``h_T = F_full(h_{T-1})`` is a full-batch step for every method, so the implicit
    methods solve ``(I - J^T) z = g`` with the Jacobian of that deterministic map. The meta
    loss ``L(w_T)`` is the cross-entropy on all training examples; ``backward`` leaves
    ``dL/d(a, b)`` in ``log_lr.grad`` / ``logit_momentum.grad``.
    """
    batches = model.minibatch_indices(len(problem.x), problem.batch_size, steps, problem.seed)
    batches = batches.to(problem.x.device)
    step = model.make_step(problem.x, problem.y_onehot, log_lr, logit_momentum, batches,
                           loss_record, inner_grad)
    full = model.make_step(problem.x, problem.y_onehot, log_lr, logit_momentum,
                           None if last_step == "full" else batches[-1:],
                           loss_record, inner_grad)

    def f(h: tuple[torch.Tensor, ...], t: int) -> tuple[torch.Tensor, ...]:
        out = step(h, t)
        if snapshot is not None:
            snapshot(t + 1, out)
        return out

    def last(h: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = full(h, 0)
        if snapshot is not None:
            snapshot(steps, out)
        return out

    how = rbp.methods.from_name("rbp", truncate, init=rbp_init) if method == "rbp" else method
    h_t, info = rbp.fixed_point(
        f, initial_state(problem), steps, how, truncate, time_varying=True, last_step=last,
        checks=rbp.Checks(settle_tol=None, on_failure="ignore"), return_info=True,
    )
    n = len(h_t) // 2
    meta_loss = model.loss(h_t[:n], problem.x, problem.y)
    if backward:
        meta_loss.backward()
    return float(meta_loss.detach()), info


# ---------------------------------------------------------------- the experiment


def _unit_tag(steps: int, truncate: int, method: str) -> str:
    return f"T{steps}_K{truncate}_{method}"


def _projection(dim_in: int, dims: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(dim_in, dims, generator=gen) / math.sqrt(dims)


def _run_unit(
    cfg: HyperoptConfig, ctx: RunContext, problem: Problem, steps: int, truncate: int,
    method: str,
) -> dict[str, Any]:
    tag = _unit_tag(steps, truncate, method)
    n_tensors = len(problem.sizes) - 1
    dev = problem.x.device
    log_lr = torch.full((2 * n_tensors,), float(cfg.init_log_lr), device=dev)
    logit = torch.full((2 * n_tensors,), math.log(cfg.init_momentum / (1 - cfg.init_momentum)),
                       device=dev)
    log_lr.requires_grad_()
    logit.requires_grad_()
    adam = torch.optim.Adam([log_lr, logit], lr=cfg.meta_lr)
    hist: dict[str, Any] = {
        "meta_loss": [], "log_lr": [], "logit_momentum": [], "grad_norm": [],
        "wall_time_s": [], "backward_status": [], "inner_loss_first": [],
        "inner_loss_last": [], "trajectories": {},
    }
    done = 0
    prior = ctx.finished(tag)
    if prior is not None:
        return prior
    state = ctx.load(tag)
    if state is not None:
        done = int(state["step"])
        with torch.no_grad():
            log_lr.copy_(state["log_lr"])
            logit.copy_(state["logit_momentum"])
        adam.load_state_dict(state["adam"])
        hist = state["history"]
        set_rng_state(state["rng"])
    else:  # the same random stream (RBP's uniform start) whatever ran before in this process
        seed_everything(cfg.seed)

    want_snaps = [int(s) for s in cfg.tsne_setting] == [steps, truncate] and (
        method in cfg.tsne_methods)
    dim = sum(p.numel() for p in model.init_params(problem.sizes, 0))
    proj = _projection(dim, cfg.tsne_dims, cfg.seed).to(dev) if want_snaps else None

    def checkpoint() -> dict[str, Any]:
        return {"step": done, "log_lr": log_lr.detach().clone(),
                "logit_momentum": logit.detach().clone(), "adam": adam.state_dict(),
                "history": hist, "rng": rng_state()}

    def meta_step_once() -> float | None:
        """One meta step (an inner run and its hypergradient): the meta loss, or None when
        the inner run diverged or the hypergradient is not finite (recorded in ``stopped``)."""
        nonlocal done
        meta_index = done + 1  # 1-based meta step being run
        lr = cfg.meta_lr * (cfg.meta_lr_decay if done >= cfg.meta_lr_decay_after else 1.0)
        for group in adam.param_groups:
            group["lr"] = lr
        record: list[torch.Tensor] = []
        snaps: list[torch.Tensor] = []
        snap_fn = None
        if proj is not None and meta_index in cfg.tsne_meta_steps:
            def snap_fn(t: int, h: tuple[torch.Tensor, ...], _s: list = snaps) -> None:
                if t % cfg.tsne_every == 0 or t == steps:
                    flat = torch.cat([p.detach().reshape(-1) for p in h[:n_tensors * 2]])
                    _s.append(flat @ proj)
        adam.zero_grad(set_to_none=True)
        start = time.perf_counter()
        status = "ok"
        try:
            meta_loss, info = meta_step(
                problem, log_lr, logit, steps, truncate, method, rbp_init=cfg.rbp_init,
                loss_record=record, snapshot=snap_fn, inner_grad=cfg.inner_grad,
                last_step=cfg.last_step,
            )
            status = ",".join(b.status for b in info.backward) or "ok"
        except rbp.DivergenceError as exc:
            ctx.log.warning("%s: inner run diverged at meta step %d: %s", tag, meta_index,
                            exc)
            hist["stopped"] = f"diverged at meta step {meta_index}"
            return None
        grads = torch.cat([log_lr.grad, logit.grad])
        if not bool(torch.isfinite(grads).all()):
            hist["stopped"] = f"non-finite hypergradient at meta step {meta_index}"
            ctx.log.warning("%s: %s", tag, hist["stopped"])
            return None
        adam.step()
        elapsed = time.perf_counter() - start
        hist["meta_loss"].append(meta_loss)
        hist["log_lr"].append(log_lr.detach().tolist())
        hist["logit_momentum"].append(logit.detach().tolist())
        hist["grad_norm"].append(float(grads.norm()))
        hist["wall_time_s"].append(elapsed)
        hist["backward_status"].append(status)
        curve = torch.stack(record).tolist() if record else []
        if meta_index == 1:
            hist["inner_loss_first"] = curve
        hist["inner_loss_last"] = curve
        if snaps:
            hist["trajectories"][str(meta_index)] = torch.stack(snaps).tolist()
        done += 1
        return meta_loss

    with ctx.saving_on_interrupt(tag, checkpoint), progress(
            cfg.meta_steps, desc=tag, enabled=ctx.progress, initial=done) as bar:
        while done < cfg.meta_steps and "stopped" not in hist:
            with ctx.step():
                meta_loss = meta_step_once()
            if meta_loss is None:
                break
            bar.update()
            bar.set_postfix(loss=f"{meta_loss:.4f}")
            if ctx.should_checkpoint(done) and done < cfg.meta_steps:
                ctx.save(tag, checkpoint())
            ctx.tick()

    result = _summarise(hist, steps, truncate, method)
    if result["median_meta_step_s"] is not None:
        first = result["meta_loss"][0] if result["meta_loss"] else float("nan")
        ctx.log.info("%s: meta loss %.5f at the first meta step -> %.5f at the last of %d, median "
                     "%.2f s per meta step", tag, first, result["final_meta_loss"],
                     result["meta_steps_done"], result["median_meta_step_s"])
    ctx.finish(tag, result)
    return result


def check_data(cfg: HyperoptConfig) -> list[str]:
    """Where the digits come from, for ``--dry-run``; DataError when they are not there."""
    line = describe_mnist_source(cfg.data_dir, cfg.split)
    if "(missing)" in line:
        raise DataError(f"{line}; pass --data-dir (or set {DATA_DIR_ENV}) to the folder "
                        "holding the MNIST IDX files, or leave it unset to use the embedded "
                        "digits")
    return [line]


def _summarise(hist: dict[str, Any], steps: int, truncate: int, method: str) -> dict[str, Any]:
    """Per-unit results: curves plus learned lr = exp(a) and momentum = sigmoid(b)."""
    log_lr = np.asarray(hist["log_lr"], dtype=float)
    logit = np.asarray(hist["logit_momentum"], dtype=float)
    out = {k: v for k, v in hist.items() if k not in ("log_lr", "logit_momentum")}
    out.update({
        "train_steps": steps, "truncate": truncate, "method": method,
        "meta_steps_done": len(hist["meta_loss"]),
        "learning_rate": np.exp(log_lr).tolist(),
        "momentum": (1 / (1 + np.exp(-logit))).tolist(),
        "log_lr": hist["log_lr"], "logit_momentum": hist["logit_momentum"],
        "final_meta_loss": hist["meta_loss"][-1] if hist["meta_loss"] else None,
        "median_meta_step_s": float(np.median(hist["wall_time_s"])) if hist["wall_time_s"]
        else None,
    })
    return out


def _same_bptt_run(units: dict[str, dict[str, Any]], steps: int) -> str | None:
    """Tag of a finished, not stopped bptt unit with ``steps`` inner steps (any truncation)."""
    for tag, unit in units.items():
        if (unit["method"] == "bptt" and unit["train_steps"] == steps
                and "stopped" not in unit and "reused_from" not in unit):
            return tag
    return None


def run(cfg: HyperoptConfig, ctx: RunContext) -> dict[str, Any]:
    """All (setting, method) units; each is checkpointed and resumed on its own."""
    torch.set_num_threads(1)
    device = resolve_device(cfg.device)
    problem = load_problem(cfg.data_dir, cfg.split, cfg.num_examples, cfg.sizes,
                           cfg.batch_size, cfg.seed, cfg.init_scale, device=device)
    ctx.record_data("mnist", problem.x, problem.y)
    ctx.log.info("inner problem: %d examples, MLP %s", len(problem.x), problem.sizes)
    units: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {"units": units, "num_examples": len(problem.x),
                               "settings": [list(s) for s in cfg.grid()],
                               **describe_device(device)}
    for steps, truncate in cfg.grid():
        for method in cfg.methods:
            if method == "tbptt" and truncate > steps:
                raise ValueError(f"tbptt needs truncate <= train_steps (T={steps}, K={truncate})")
            tag = _unit_tag(steps, truncate, method)
            prior = _same_bptt_run(units, steps) if method == "bptt" else None
            if prior is not None:  # BPTT's gradient does not depend on the truncation
                units[tag] = dict(units[prior], truncate=truncate, reused_from=prior)
                ctx.finish(tag, units[tag])
            else:
                units[tag] = _run_unit(cfg, ctx, problem, steps, truncate, method)
            ctx.write_results(results)
    from rbp.apps.hyperopt import figures

    results["figures"] = figures.make_all(results, cfg, Path(ctx.out_dir), ctx.log)
    return results
