"""Semi-supervised document classification with a recurrent GNN (paper Sec. 5.2, Table 1, Fig. 3).

One *unit* of work is (dataset, model, method, seed): train on the 1% training split of that
seed, evaluate every ``val_every`` epochs, and report the test accuracy at the epoch of best
validation accuracy. Units are checkpointed (mid-run every ``checkpoint_every`` epochs and when
done) so that ``--resume`` skips finished units and continues an interrupted one exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import rbp
from rbp.data import PLANETOID_NAMES, Planetoid, load_planetoid, split_labelled
from rbp.runner import (
    ConfigError,
    RunContext,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
)

from .baselines import BASELINES, GCNSettings, gcn_baseline, logreg_baseline
from .model import GGNN, InjectedGNN, normalised_adjacency, pca_features, sum_adjacency

__all__ = ["MODELS", "CitationConfig", "run", "summarise"]

MODELS = ("paper", "injected")


@dataclass
class CitationConfig:
    """Settings of ``rbp citation``; the packaged YAML holds the paper's protocol."""

    methods: list[str] = field(default_factory=lambda: list(rbp.METHODS))
    seed: int = 0
    seeds: list[int] | None = None        # None: num_seeds consecutive seeds from `seed`
    num_seeds: int = 10
    dataset_seeds: dict[str, list[int]] = field(default_factory=dict)  # per-dataset override
    dataset: list[str] = field(default_factory=lambda: ["cora", "pubmed"])
    models: list[str] = field(default_factory=lambda: list(MODELS))
    data_dir: str | None = None
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # paper model (GG-NN)
    hidden: dict[str, int] = field(
        default_factory=lambda: {"cora": 64, "pubmed": 16, "citeseer": 64})
    steps: int = 100
    truncate: int = 5
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 2000
    val_every: int = 20
    # injected model
    injected_methods: list[str] | None = field(default_factory=lambda: ["neumann"])
    injected_hidden: int = 64
    injected_steps: int = 20
    injected_truncate: int = 10
    injected_dropout: float = 0.5
    injected_lr: float = 0.01
    injected_weight_decay: float = 5e-4
    injected_epochs: int = 200
    injected_val_every: int = 5
    # GCN baseline
    gcn_epochs: int = 200
    # bookkeeping
    trace_points: int = 3                 # forward traces per unit (first, middle, last eval)
    on_failure: str = "ignore"
    checkpoint_every: int = 100           # epochs
    interrupt_after_epochs: int | None = None   # testing hook: KeyboardInterrupt after k epochs
    threads: int = 1

    def seed_list(self, dataset: str | None = None) -> list[int]:
        """The seeds to run (on ``dataset``, when ``dataset_seeds`` names it)."""
        if dataset is not None and dataset in self.dataset_seeds:
            return list(self.dataset_seeds[dataset])
        return list(self.seeds) if self.seeds is not None else [
            self.seed + i for i in range(self.num_seeds)]

    def validate(self) -> None:
        """Reject impossible settings before any work starts."""
        for name in self.dataset:
            if name.lower() not in PLANETOID_NAMES:
                raise ConfigError(
                    f"unknown dataset '{name}' (valid: {', '.join(PLANETOID_NAMES)})")
        for m in self.models:
            if m not in MODELS:
                raise ConfigError(f"unknown model '{m}' (valid: {', '.join(MODELS)})")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"unknown baseline '{b}' (valid: {', '.join(BASELINES)})")
        for m in [*self.methods, *(self.injected_methods or [])]:
            if m not in rbp.METHODS:
                raise ConfigError(f"unknown method '{m}' (valid: {', '.join(rbp.METHODS)})")
        if "paper" in self.models:
            missing = [d for d in self.dataset if d.lower() not in self.hidden]
            if missing:
                raise ConfigError(f"setting 'hidden' has no size for {missing}")
        if not self.seed_list() or any(not v for v in self.dataset_seeds.values()):
            raise ConfigError("no seeds to run (num_seeds must be >= 1)")
        ints = {"steps": self.steps, "truncate": self.truncate, "epochs": self.epochs,
                "val_every": self.val_every, "injected_steps": self.injected_steps,
                "injected_truncate": self.injected_truncate,
                "injected_epochs": self.injected_epochs,
                "injected_val_every": self.injected_val_every,
                "injected_hidden": self.injected_hidden, "threads": self.threads}
        for key, value in ints.items():
            if value < 1:
                raise ConfigError(f"setting '{key}' must be >= 1, got {value}")
        if self.truncate > self.steps or self.injected_truncate > self.injected_steps:
            raise ConfigError("truncate must not exceed steps (TBPTT back-propagates K steps)")
        if not 0.0 <= self.injected_dropout < 1.0:
            raise ConfigError("injected_dropout must be in [0, 1)")
        if self.on_failure not in ("raise", "warn", "ignore"):
            raise ConfigError("on_failure must be 'raise', 'warn' or 'ignore'")


@dataclass
class _Graph:
    """A dataset prepared once per run: tensors and adjacency matrices shared by all units."""

    name: str
    data: Planetoid
    adj_sum: torch.Tensor | None = None
    adj_norm: torch.Tensor | None = None
    h0: torch.Tensor | None = None


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    return float((logits[idx].argmax(1) == labels[idx]).double().mean())


class _Interrupt:
    """Counts trained epochs in this process and raises KeyboardInterrupt at the limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            raise KeyboardInterrupt(f"interrupt_after_epochs={self.limit} reached")


def _unit_settings(cfg: CitationConfig, model: str) -> dict[str, Any]:
    if model == "paper":
        return {"steps": cfg.steps, "truncate": cfg.truncate, "epochs": cfg.epochs,
                "val_every": cfg.val_every}
    return {"steps": cfg.injected_steps, "truncate": cfg.injected_truncate,
            "epochs": cfg.injected_epochs, "val_every": cfg.injected_val_every}


def _build(cfg: CitationConfig, g: _Graph, model: str) -> tuple[torch.nn.Module, Any]:
    d = g.data
    if model == "paper":
        net: torch.nn.Module = GGNN(cfg.hidden[g.name], d.num_classes)
        opt: Any = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    else:
        net = InjectedGNN(d.num_features, cfg.injected_hidden, d.num_classes,
                          cfg.injected_dropout)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.injected_lr,
                               weight_decay=cfg.injected_weight_decay)
    return net, opt


def _forward(net: torch.nn.Module, g: _Graph, model: str, method: str, s: dict[str, Any],
             trace: bool, on_failure: str) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
    if model == "paper":
        return net(g.adj_sum, g.h0, s["steps"], method, s["truncate"], trace=trace,
                   on_failure=on_failure)
    return net(g.adj_norm, g.data.features, s["steps"], method, s["truncate"], trace=trace,
               on_failure=on_failure)


def _trace_epochs(epochs: int, val_every: int, points: int) -> set[int]:
    evals = list(range(0, epochs + 1, val_every))
    if evals[-1] != epochs:
        evals.append(epochs)
    if points <= 0:
        return set()
    pick = np.linspace(0, len(evals) - 1, num=min(points, len(evals))).round().astype(int)
    return {evals[i] for i in pick}


def _train_unit(
    cfg: CitationConfig, ctx: RunContext, g: _Graph, model: str, method: str, seed: int,
    interrupt: _Interrupt,
) -> dict[str, Any]:
    """Train one (dataset, model, method, seed) unit; return its result record."""
    tag = f"{g.name}_{model}_{method}_s{seed}"
    state = ctx.load(tag)
    if state and state.get("done"):
        return state["result"]
    s = _unit_settings(cfg, model)
    d = g.data
    train, val, test = split_labelled(d.labelled, seed)
    seed_everything(seed)
    net, opt = _build(cfg, g, model)
    hist: dict[str, Any] = {"train_loss": [], "eval_epochs": [], "val_acc": [], "test_acc": [],
                            "traces": [], "backward_status": {}, "train_time_s": 0.0}
    epoch = 0
    if state:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        hist = state["history"]
        epoch = state["epoch"]
        set_rng_state(state["rng"])
    trace_at = _trace_epochs(s["epochs"], s["val_every"], cfg.trace_points)

    def evaluate(ep: int) -> None:
        net.eval()
        with torch.no_grad():
            logits, info = _forward(net, g, model, method, s, ep in trace_at, cfg.on_failure)
        hist["eval_epochs"].append(ep)
        hist["val_acc"].append(_accuracy(logits, d.labels, val))
        hist["test_acc"].append(_accuracy(logits, d.labels, test))
        if ep in trace_at:
            hist["traces"].append({"epoch": ep, "diff_norm": list(info.forward_trace)})
        net.train()

    if epoch == 0 and not hist["eval_epochs"]:
        evaluate(0)
    net.train()
    with progress(s["epochs"], desc=tag, enabled=ctx.progress, initial=epoch) as bar:
        while epoch < s["epochs"]:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits, info = _forward(net, g, model, method, s, False, cfg.on_failure)
            loss = F.cross_entropy(logits[train], d.labels[train])
            loss.backward()
            opt.step()
            hist["train_time_s"] += time.perf_counter() - t0
            for b in info.backward:
                hist["backward_status"][b.status] = hist["backward_status"].get(b.status, 0) + 1
            loss_v = float(loss.detach())
            if not np.isfinite(loss_v):
                raise rbp.DivergenceError(f"{tag}: non-finite training loss at epoch {epoch}")
            hist["train_loss"].append(loss_v)
            epoch += 1
            if epoch % s["val_every"] == 0 or epoch == s["epochs"]:
                evaluate(epoch)
            bar.update()
            bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{hist['val_acc'][-1]:.3f}")
            if ctx.should_checkpoint(epoch) and epoch < s["epochs"]:
                ctx.save(tag, {"epoch": epoch, "model": net.state_dict(),
                               "optim": opt.state_dict(), "history": hist, "rng": rng_state()})
            interrupt.tick()
    val_acc = np.asarray(hist["val_acc"])
    best = int(np.argmax(val_acc))       # first best epoch
    result = {
        "seed": seed, "method": method, "model": model, "dataset": g.name,
        "test_acc": hist["test_acc"][best], "best_val_acc": float(val_acc[best]),
        "best_epoch": hist["eval_epochs"][best], "n_train": int(train.numel()),
        "n_val": int(val.numel()), "n_test": int(test.numel()),
        "sec_per_epoch": hist["train_time_s"] / max(1, len(hist["train_loss"])),
        "train_time_s": hist["train_time_s"], "curves": {
            "train_loss": hist["train_loss"], "eval_epochs": hist["eval_epochs"],
            "val_acc": hist["val_acc"], "test_acc": hist["test_acc"]},
        "traces": hist["traces"], "backward_status": hist["backward_status"],
        "settings": s,
    }
    ctx.save(tag, {"done": True, "result": result})
    return result


def _baseline_unit(cfg: CitationConfig, ctx: RunContext, g: _Graph, name: str,
                   seed: int) -> dict[str, Any]:
    tag = f"{g.name}_baseline_{name}_s{seed}"
    state = ctx.load(tag)
    if state and state.get("done"):
        return state["result"]
    d = g.data
    train, val, test = split_labelled(d.labelled, seed)
    t0 = time.perf_counter()
    if name == "logreg":
        res: dict[str, Any] = logreg_baseline(d.features, d.labels, train, val, test, seed)
    else:
        res = gcn_baseline(d.features, d.labels, d.edge_index, d.num_classes, train, val,
                           test, seed, GCNSettings(epochs=cfg.gcn_epochs))
    res.update({"seed": seed, "wall_s": time.perf_counter() - t0})
    ctx.save(tag, {"done": True, "result": res})
    return res


def summarise(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-seed records: test accuracies, mean and (population) std in percent."""
    acc = np.asarray([u["test_acc"] for u in units], dtype=float) * 100.0
    out: dict[str, Any] = {
        "seeds": [u["seed"] for u in units], "test_acc": acc.round(4).tolist(),
        "mean": float(acc.mean()) if acc.size else float("nan"),
        "std": float(acc.std()) if acc.size else float("nan"), "n": int(acc.size),
    }
    if units and "curves" in units[0]:
        out["best_epoch"] = [u["best_epoch"] for u in units]
        out["sec_per_epoch"] = float(np.mean([u["sec_per_epoch"] for u in units]))
        out["train_time_s"] = float(np.sum([u["train_time_s"] for u in units]))
        out["per_seed"] = units
    else:
        out["per_seed"] = units
    return out


def _prepare(cfg: CitationConfig, name: str, ctx: RunContext) -> _Graph:
    key = name.lower()
    data = load_planetoid(key, cfg.data_dir)
    g = _Graph(name=key, data=data)
    if "paper" in cfg.models:
        g.adj_sum = sum_adjacency(data.edge_index, data.num_nodes)
        t0 = time.perf_counter()
        g.h0 = pca_features(data.features, cfg.hidden[key])
        ctx.log.info("%s: PCA to %d dims in %.1f s", key, cfg.hidden[key],
                     time.perf_counter() - t0)
    if "injected" in cfg.models:
        g.adj_norm = normalised_adjacency(data.edge_index, data.num_nodes)
    return g


def run(cfg: CitationConfig, ctx: RunContext) -> dict[str, Any]:
    """Run every (dataset, model, method, seed) unit and the baselines; write figures/table."""
    torch.set_num_threads(cfg.threads)
    interrupt = _Interrupt(cfg.interrupt_after_epochs)
    results: dict[str, Any] = {"datasets": {}, "seeds": cfg.seed_list(),
                               "curves_note": "curves and traces are stored per seed"}
    ds_results = results["datasets"]
    for name in cfg.dataset:
        g = _prepare(cfg, name, ctx)
        d = g.data
        seeds = cfg.seed_list(g.name)
        entry: dict[str, Any] = {
            "seeds": seeds,
            "stats": {"nodes": d.num_nodes, "features": d.num_features,
                      "classes": d.num_classes, "labelled": int(d.labelled.sum()),
                      "undirected_edges": d.num_undirected_edges},
            "baselines": {}, "models": {}}
        ds_results[g.name] = entry
        for b in cfg.baselines:
            units = [_baseline_unit(cfg, ctx, g, b, s) for s in seeds]
            entry["baselines"][b] = summarise(units)
            ctx.write_results(results)
        for model in cfg.models:
            methods = cfg.methods if model == "paper" else (cfg.injected_methods or cfg.methods)
            per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            entry["models"][model] = {}
            for seed in seeds:
                for method in methods:
                    per[method].append(_train_unit(cfg, ctx, g, model, method, seed, interrupt))
                    entry["models"][model][method] = summarise(per[method])
                    ctx.write_results(results)
    from .figures import write_figures, write_table1

    results["figures"] = [str(p.name) for p in write_figures(ctx.out_dir, results)]
    results["table1"] = str(write_table1(Path(ctx.out_dir) / "table1.md", results).name)
    return results
