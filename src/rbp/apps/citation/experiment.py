"""Semi-supervised document classification with a recurrent GNN (paper Sec. 5.2, Table 1, Fig. 3).

One *unit* of work is (dataset, model, method, seed): train on the 1% training split of that
seed, evaluate every ``val_every`` epochs, and report the test accuracy at the epoch of best
validation accuracy. Units are checkpointed (mid-run every ``checkpoint_every`` epochs, at an
interrupt once the epoch under way ends, and when done) so that ``--resume`` skips finished
units and continues an interrupted one exactly.
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
from rbp.data import (
    DataError,
    Planetoid,
    describe_planetoid_source,
    load_planetoid,
    split_labelled,
)
from rbp.runner import (
    RunContext,
    progress,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rbp.runner.config import DATA_DIR_ENV
from rbp.runner.device import describe_device, resolve_device

from .baselines import (
    GCNSettings,
    gcn_baseline,
    gcn_baseline_seeds,
    logreg_baseline,
)
from .config import BATCHED_MODELS, FIXED_POINT_MODELS, MODELS, CitationConfig
from .figures import write_figures
from .model import (
    IGNN,
    PPRGNN,
    InjectedGNN,
    normalised_adjacency,
    pca_features,
    row_normalise,
    sum_adjacency,
)
from .seeds import SeedBatchedGGNN, SeedBatchedPPR, SeededUniformRBP
from .tables import summarise, write_table1

__all__ = ["FIXED_POINT_MODELS", "MODELS", "CitationConfig", "check_data", "run", "summarise"]


@dataclass
class _Graph:
    """A dataset prepared once per run: tensors and adjacency matrices shared by all units."""

    name: str
    data: Planetoid
    adj_sum: torch.Tensor | None = None
    adj_norm: torch.Tensor | None = None
    h0: torch.Tensor | None = None
    x_fp: torch.Tensor | None = None      # features as the fixed-point models see them
    features: torch.Tensor | None = None  # on the run's device (injected model)
    labels: torch.Tensor | None = None    # on the run's device
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    return float((logits[idx].argmax(1) == labels[idx]).double().mean())


class _SavedBytes:
    """Bytes autograd keeps for backward (distinct storages of the saved tensors).

    A deterministic measure of a method's graph memory: BPTT keeps every step, the implicit
    methods one. Sparse tensors (the constant adjacency) have no strided storage and are skipped.
    """

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:
            st = t.untyped_storage()
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    @property
    def megabytes(self) -> float:
        return sum(self.storages.values()) / 2**20


def _unit_settings(cfg: CitationConfig, model: str) -> dict[str, Any]:
    if model == "paper":
        return {"steps": cfg.steps, "truncate": cfg.truncate, "epochs": cfg.epochs,
                "val_every": cfg.val_every}
    if model in FIXED_POINT_MODELS:
        k = cfg.fp_K(model)
        rate = cfg.fp_rate(model)
        return {"steps": cfg.fp_steps or k + 1, "truncate": k, "epochs": cfg.fp_epochs,
                "val_every": cfg.fp_val_every, "rate": rate,
                "prop2_bound": rate ** (k + 1) / (1.0 - rate),
                "backward_tol": cfg.fp_backward_tol, "tol": cfg.fp_tol,
                "warm_start": cfg.fp_warm_start, "hidden": cfg.fp_hidden,
                "dropout": cfg.fp_dropout, "lr": cfg.fp_lr, "weight_decay": cfg.fp_weight_decay,
                "row_normalise": cfg.fp_row_normalise}
    return {"steps": cfg.injected_steps, "truncate": cfg.injected_truncate,
            "epochs": cfg.injected_epochs, "val_every": cfg.injected_val_every}


def _build(cfg: CitationConfig, g: _Graph, model: str) -> tuple[torch.nn.Module, Any]:
    """One seed's model (weights drawn on the CPU) on the run's device, and its optimiser."""
    d = g.data
    net: torch.nn.Module
    if model in FIXED_POINT_MODELS:
        if model == "ppr":
            net = PPRGNN(d.num_features, cfg.fp_hidden, d.num_classes, cfg.fp_alpha,
                         cfg.fp_dropout)
        else:
            net = IGNN(d.num_features, cfg.fp_hidden, d.num_classes, cfg.fp_kappa,
                       cfg.fp_dropout)
    else:
        net = InjectedGNN(d.num_features, cfg.injected_hidden, d.num_classes,
                          cfg.injected_dropout)
    net = net.to(g.device)
    lr, decay = ((cfg.fp_lr, cfg.fp_weight_decay) if model in FIXED_POINT_MODELS
                 else (cfg.injected_lr, cfg.injected_weight_decay))
    return net, torch.optim.Adam(net.parameters(), lr=lr, weight_decay=decay)


def _forward(net: torch.nn.Module, g: _Graph, model: str, method: str, s: dict[str, Any],
             trace: bool, on_failure: str) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
    if model in FIXED_POINT_MODELS:
        return net(g.adj_norm, g.x_fp, s["steps"], method, s["truncate"], trace=trace,
                   on_failure=on_failure, backward_tol=s["backward_tol"])
    return net(g.adj_norm, g.features, s["steps"], method, s["truncate"], trace=trace,
               on_failure=on_failure)


def _trace_epochs(epochs: int, val_every: int, points: int) -> set[int]:
    evals = list(range(0, epochs + 1, val_every))
    if evals[-1] != epochs:
        evals.append(epochs)
    if points <= 0:
        return set()
    pick = np.linspace(0, len(evals) - 1, num=min(points, len(evals))).round().astype(int)
    return {evals[i] for i in pick}


def _unit_result(hist: dict[str, Any], seed: int, method: str, model: str, dataset: str,
                 split: tuple[torch.Tensor, ...], s: dict[str, Any],
                 seed_batch: int = 1) -> dict[str, Any]:
    """The result record of one seed: test accuracy at the first best validation epoch, its
    curves and costs (time per epoch amortised over the ``seed_batch`` seeds trained together).
    """
    train, val, test = split
    val_acc = np.asarray(hist["val_acc"])
    best = int(np.argmax(val_acc))       # first best epoch
    rel = hist.get("rel_diff") or []
    return {
        "seed": seed, "method": method, "model": model, "dataset": dataset,
        "test_acc": hist["test_acc"][best], "best_val_acc": float(val_acc[best]),
        "best_epoch": hist["eval_epochs"][best], "n_train": int(train.numel()),
        "n_val": int(val.numel()), "n_test": int(test.numel()),
        "sec_per_epoch": hist["train_time_s"] / max(1, len(hist["train_loss"])),
        "train_time_s": hist["train_time_s"], "seed_batch": seed_batch, "curves": {
            "train_loss": hist["train_loss"], "eval_epochs": hist["eval_epochs"],
            "val_acc": hist["val_acc"], "test_acc": hist["test_acc"]},
        "traces": hist["traces"], "backward_status": hist["backward_status"],
        "settings": s, "saved_mb": hist.get("saved_mb"),
        # the epoch at which training diverged (non-finite state or loss) and stopped, if it did
        "diverged_at": hist.get("diverged_at"),
        # ||h_T - h_T-1|| / ||h_T||: last training step, and eval forward at the reported epoch
        "final_rel_diff": hist.get("train_rel_diff"),
        "best_rel_diff": rel[best] if best < len(rel) else None,
        # evaluations of F per training forward (fixed steps, or a solve to a tolerance)
        "forward_steps_mean": (float(np.mean(hist["forward_steps"]))
                               if hist.get("forward_steps") else None),
    }


def _seed_groups(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def _paper_method(method: str, truncate: int, generators: list[torch.Generator],
                  shape: tuple[int, ...]) -> Any:
    """The backward of the batched GG-NN: the method's name, or for original RBP the paper's
    uniform start drawn per seed (:class:`SeededUniformRBP`)."""
    if method == "rbp":
        return rbp.Implicit(SeededUniformRBP(truncate, generators, shape))
    return method


def _build_group(cfg: CitationConfig, g: _Graph, model: str, method: str, seeds: list[int],
                 s_cfg: dict[str, Any]) -> tuple[torch.nn.Module, Any, list[torch.Generator],
                                                 Any]:
    """The batched model of ``seeds``, its optimiser, the seeds' generators and its forward
    (``trace -> (logits (S, N, C), info)``)."""
    d, dev = g.data, g.device
    if model not in BATCHED_MODELS:   # one seed's own model, drawing from the global generator
        (seed,) = seeds
        seed_everything(seed)
        one, opt_one = _build(cfg, g, model)

        def forward_one(trace: bool) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
            logits, info = _forward(one, g, model, method, s_cfg, trace, cfg.on_failure)
            return logits[None], info
        return one, opt_one, [], forward_one
    if model == "paper":
        net: Any = SeedBatchedGGNN.from_seeds(cfg.hidden[g.name], d.num_classes, seeds).to(dev)
        opt: Any = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        how = _paper_method(method, s_cfg["truncate"], gens, (len(seeds), *g.h0.shape))

        def forward(trace: bool) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
            return net(g.adj_sum, g.h0, s_cfg["steps"], how, s_cfg["truncate"], trace=trace,
                       on_failure=cfg.on_failure)
        return net, opt, gens, forward
    net = SeedBatchedPPR.from_seeds(d.num_features, cfg.fp_hidden, d.num_classes, seeds,
                                    cfg.fp_alpha, cfg.fp_dropout, device=dev).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.fp_lr, weight_decay=cfg.fp_weight_decay)
    warm = rbp.WarmStart() if cfg.fp_warm_start else None

    def forward_ppr(trace: bool) -> tuple[torch.Tensor, rbp.FixedPointInfo]:
        # the warm start serves the training forwards; evaluation starts cold (H)
        return net(g.adj_norm, g.x_fp, s_cfg["steps"], method, s_cfg["truncate"], trace=trace,
                   on_failure=cfg.on_failure, backward_tol=s_cfg["backward_tol"],
                   tol=cfg.fp_tol, warm=warm if net.training else None)
    return net, opt, net.generators, forward_ppr


def _train_group(
    cfg: CitationConfig, ctx: RunContext, g: _Graph, model: str, method: str,
    seeds: list[int],
) -> list[dict[str, Any]]:
    """Train ``model`` for ``seeds`` as one batched model (:data:`BATCHED_MODELS`; the others
    one seed at a time, ``seeds`` of one); one result per seed.

    Each seed keeps its own weights (built as a lone run of that seed builds them), training
    split, and random draws, so the results equal those of the seeds run one by one. Seeds
    finished earlier (in this run or a resumed one) are not trained again.
    """
    tags = {s: f"{g.name}_{model}_{method}_s{s}" for s in seeds}
    done = {s: ctx.finished(tags[s]) for s in seeds}
    todo = [s for s in seeds if done[s] is None]
    if not todo:
        return [done[s] for s in seeds]
    tag = f"{g.name}_{model}_{method}_seeds{'-'.join(map(str, todo))}"
    s_cfg = _unit_settings(cfg, model)
    d, dev = g.data, g.device
    splits = [tuple(i.to(dev) for i in split_labelled(d.labelled, s)) for s in todo]
    labels = d.labels.to(dev)
    net, opt, gens, forward = _build_group(cfg, g, model, method, todo, s_cfg)
    hists = [{"train_loss": [], "eval_epochs": [], "val_acc": [], "test_acc": [], "traces": [],
              "rel_diff": [], "backward_status": {}, "train_time_s": 0.0} for _ in todo]
    epoch = 0
    state = ctx.load(tag)
    if state:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        hists, epoch = state["history"], state["epoch"]
        for gen, st in zip(gens, state["generators"], strict=True):
            gen.set_state(st)
        if "rng" in state:  # absent from checkpoints of batched models written before it was kept
            set_rng_state(state["rng"])
        elif model not in BATCHED_MODELS:
            raise RuntimeError(f"checkpoint {tag} lacks the random state this model needs; "
                               "delete it to restart this model, or run without --resume")
    trace_at = _trace_epochs(s_cfg["epochs"], s_cfg["val_every"], cfg.trace_points)

    def evaluate(ep: int) -> None:
        net.eval()
        with torch.no_grad():
            logits, info = forward(ep in trace_at)
        diffs = _per_seed_rel_diff(info, len(todo), model in BATCHED_MODELS)
        for i, (hist, (_, val, test)) in enumerate(zip(hists, splits, strict=True)):
            hist["eval_epochs"].append(ep)
            hist["val_acc"].append(_accuracy(logits[i], labels, val))
            hist["test_acc"].append(_accuracy(logits[i], labels, test))
            hist["rel_diff"].append(diffs[i])
            if ep in trace_at:
                hist["traces"].append({"epoch": ep, "diff_norm": list(info.forward_trace)})
        net.train()

    def checkpoint() -> dict[str, Any]:
        return {"epoch": epoch, "model": net.state_dict(), "optim": opt.state_dict(),
                "history": hists, "generators": [gen.get_state() for gen in gens],
                "rng": rng_state()}

    def train_epoch() -> list[float]:
        nonlocal epoch
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if "saved_mb" not in hists[0]:   # graph memory of one training forward
            saved = _SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                logits, info = forward(False)
            for hist in hists:
                hist["saved_mb"] = saved.megabytes / len(todo)
        else:
            logits, info = forward(False)
        losses = torch.stack([F.cross_entropy(logits[i, train], labels[train])
                              for i, (train, _, _) in enumerate(splits)])
        losses.sum().backward()          # seeds share nothing: each gets its own gradient
        opt.step()
        share = (time.perf_counter() - t0) / len(todo)
        loss_v = losses.detach().cpu().tolist()
        diffs = _per_seed_rel_diff(info, len(todo), model in BATCHED_MODELS)
        for i, hist in enumerate(hists):
            hist["train_time_s"] += share
            for b in info.backward:
                counts = hist["backward_status"]
                counts[b.status] = counts.get(b.status, 0) + 1
            if not np.isfinite(loss_v[i]):
                raise rbp.DivergenceError(f"{tags[todo[i]]}: non-finite training loss at "
                                          f"epoch {epoch}")
            hist["train_loss"].append(loss_v[i])
            hist["train_rel_diff"] = diffs[i]
            steps_i = info.forward_steps
            hist.setdefault("forward_steps", []).append(
                int(steps_i[i] if isinstance(steps_i, list) else steps_i))
        epoch += 1
        if epoch % s_cfg["val_every"] == 0 or epoch == s_cfg["epochs"]:
            evaluate(epoch)
        return loss_v

    def train() -> None:
        with ctx.saving_on_interrupt(tag, checkpoint):
            if epoch == 0 and not hists[0]["eval_epochs"]:
                with ctx.step():
                    evaluate(0)
            net.train()
            with progress(s_cfg["epochs"], desc=tag, enabled=ctx.progress,
                          initial=epoch) as bar:
                while epoch < s_cfg["epochs"]:
                    with ctx.step():
                        loss_v = train_epoch()
                    bar.update()
                    bar.set_postfix(loss=f"{np.mean(loss_v):.3f}",
                                    val=f"{np.mean([h['val_acc'][-1] for h in hists]):.3f}")
                    if ctx.should_checkpoint(epoch) and epoch < s_cfg["epochs"]:
                        ctx.save(tag, checkpoint())
                    ctx.tick()

    try:
        train()
    except rbp.DivergenceError as exc:
        if len(todo) > 1:  # the others' numbers must not depend on it: again one by one
            ctx.log.warning("%s: %s; its seeds are trained again one at a time", tag, exc)
            ctx.checkpoint_path(tag).unlink(missing_ok=True)
            return [r for s in seeds for r in _train_group(cfg, ctx, g, model, method, [s])]
        hists[0]["diverged_at"] = epoch
        ctx.log.warning("%s: training diverged at epoch %d (%s); the seed's result is its best "
                        "validation epoch before it", tag, epoch, str(exc).splitlines()[0])
    for i, s in enumerate(todo):
        done[s] = _unit_result(hists[i], s, method, model, g.name, splits[i], s_cfg,
                               seed_batch=len(todo))
        ctx.finish(tags[s], done[s])
    ctx.checkpoint_path(tag).unlink(missing_ok=True)   # the seeds' own records replace it
    return [done[s] for s in seeds]


def _per_seed_rel_diff(info: rbp.FixedPointInfo, seeds: int, batched: bool) -> list[float]:
    """``||h_T - h_T-1|| / ||h_T||`` as the seeds see it: for a batched model the batch's worst
    seed where the solve measured it per seed, else the ratio over the whole state."""
    worst = info.worst_relative_difference
    ratio = worst if batched and worst == worst else info.relative_final_difference
    return [ratio] * seeds


def _baseline_unit(cfg: CitationConfig, ctx: RunContext, g: _Graph, name: str,
                   seed: int) -> dict[str, Any]:
    tag = f"{g.name}_baseline_{name}_s{seed}"
    prior = ctx.finished(tag)
    if prior is not None:
        return prior
    d = g.data
    train, val, test = split_labelled(d.labelled, seed)
    t0 = time.perf_counter()
    if name == "logreg":
        res: dict[str, Any] = logreg_baseline(d.features, d.labels, train, val, test, seed)
    else:
        x = row_normalise(d.features) if cfg.gcn_row_normalise else d.features
        if cfg.gcn_backend == "torch":
            x = x.to_sparse()   # the plain-torch GCN's sparse feature product
        res = gcn_baseline(x, d.labels, d.edge_index, d.num_classes, train, val, test, seed,
                           GCNSettings(hidden=cfg.gcn_hidden, dropout=cfg.gcn_dropout,
                                       lr=cfg.gcn_lr, weight_decay=cfg.gcn_weight_decay,
                                       epochs=cfg.gcn_epochs), backend=cfg.gcn_backend,
                           device=g.device)
    res.update({"seed": seed, "wall_s": time.perf_counter() - t0})
    ctx.finish(tag, res)
    return res


def _gcn_group(cfg: CitationConfig, ctx: RunContext, g: _Graph,
               seeds: list[int]) -> list[dict[str, Any]]:
    """The GCN baseline (plain-torch backend) for ``seeds`` as one batched model; the same
    per-seed results as :func:`_baseline_unit` one seed at a time (to round-off)."""
    tags = {s: f"{g.name}_baseline_gcn_s{s}" for s in seeds}
    done = {s: ctx.finished(tags[s]) for s in seeds}
    todo = [s for s in seeds if done[s] is None]
    if todo:
        d = g.data
        x = (row_normalise(d.features) if cfg.gcn_row_normalise else d.features).to_sparse()
        t0 = time.perf_counter()
        res = gcn_baseline_seeds(
            x, d.labels, d.edge_index, d.num_classes,
            [split_labelled(d.labelled, s) for s in todo], todo,
            GCNSettings(hidden=cfg.gcn_hidden, dropout=cfg.gcn_dropout, lr=cfg.gcn_lr,
                        weight_decay=cfg.gcn_weight_decay, epochs=cfg.gcn_epochs),
            device=g.device)
        share = (time.perf_counter() - t0) / len(todo)
        for s, r in zip(todo, res, strict=True):
            done[s] = {**r, "seed": s, "wall_s": share}
            ctx.finish(tags[s], done[s])
    return [done[s] for s in seeds]


def check_data(cfg: CitationConfig) -> list[str]:
    """Where each data set comes from, for ``--dry-run``; DataError when one would need a
    download (or is not in the given ``data_dir``)."""
    lines = [describe_planetoid_source(name, cfg.data_dir) for name in cfg.dataset]
    missing = [line for line in lines if "not found" in line]
    if missing:
        raise DataError("; ".join(missing) + f"; pass --data-dir (or set {DATA_DIR_ENV}) to a "
                        "folder holding the ind.<name>.* files")
    return lines


def _prepare(cfg: CitationConfig, name: str, ctx: RunContext, device: torch.device) -> _Graph:
    key = name.lower()
    data = load_planetoid(key, cfg.data_dir)
    ctx.record_data(key, data.features, data.labels, data.edge_index)
    g = _Graph(name=key, data=data, device=device)
    if "paper" in cfg.models:
        g.adj_sum = sum_adjacency(data.edge_index, data.num_nodes).to(device)
        t0 = time.perf_counter()
        g.h0 = pca_features(data.features, cfg.hidden[key]).to(device)
        ctx.log.info("%s: PCA to %d dims in %.1f s", key, cfg.hidden[key],
                     time.perf_counter() - t0)
    if {"injected", *FIXED_POINT_MODELS} & set(cfg.models):
        g.adj_norm = normalised_adjacency(data.edge_index, data.num_nodes).to(device)
        g.features = data.features.to(device)
        g.labels = data.labels.to(device)
    if set(FIXED_POINT_MODELS) & set(cfg.models):
        x = row_normalise(data.features) if cfg.fp_row_normalise else data.features
        # bag-of-words: 1-10 % non-zero, a sparse product is faster
        g.x_fp = x.to_sparse().to(device)
    return g


def _seed_batch(cfg: CitationConfig, seeds: list[int], device: torch.device) -> int:
    """Seeds per batched model: the setting, else all of them on a GPU and one on the CPU
    (measured, ``benchmarks/citation_seeds.py``: on the CPU the GG-NN's products already fill
    the core and a batch leaves the caches; the PPR GNN's gain in BPTT is lost in the
    per-seed adjoint solves; the GCN's varies from 0.5x to 1.1x with the load)."""
    if cfg.seed_batch is not None:
        return cfg.seed_batch
    return len(seeds) if device.type != "cpu" else 1


def run(cfg: CitationConfig, ctx: RunContext) -> dict[str, Any]:
    """Run every (dataset, model, method, seed) unit and the baselines; write figures/table."""
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # each dataset's own seeds (its overrides may name others) are in its entry
    results: dict[str, Any] = {"datasets": {},
                               "curves_note": "curves and traces are stored per seed",
                               **describe_device(device)}
    ds_results = results["datasets"]
    base = cfg
    for name in base.dataset:
        cfg = base.for_dataset(name.lower())
        g = _prepare(cfg, name, ctx, device)
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
            if b == "gcn" and cfg.gcn_backend == "torch":   # seeds batched
                size = _seed_batch(cfg, seeds, g.device)
                units = [u for grp in _seed_groups(seeds, size)
                         for u in _gcn_group(cfg, ctx, g, grp)]
            else:
                units = [_baseline_unit(cfg, ctx, g, b, s) for s in seeds]
            entry["baselines"][b] = summarise(units)
            ctx.write_results(results)
        for model in cfg.models:
            if model == "paper":
                methods = cfg.methods
            elif model in FIXED_POINT_MODELS:
                methods = cfg.fp_methods or cfg.methods
            else:
                methods = cfg.injected_methods or cfg.methods
            per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            entry["models"][model] = {}
            size = _seed_batch(cfg, seeds, device) if model in BATCHED_MODELS else 1
            for group in _seed_groups(seeds, size):
                for method in methods:
                    per[method] += _train_group(cfg, ctx, g, model, method, group)
                    entry["models"][model][method] = summarise(per[method])
                    ctx.write_results(results)
    results["figures"] = [str(p.name) for p in write_figures(ctx.out_dir, results)]
    results["table1"] = str(write_table1(Path(ctx.out_dir) / "table1.md", results).name)
    from .summary import accuracy_lines  # each method's accuracy before and after training

    for line in accuracy_lines(results):
        ctx.log.info("%s", line)
    return results
