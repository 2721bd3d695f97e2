"""Seeds per hour on Cora or Pubmed: one seed at a time against S seeds batched in one model.

One training epoch of ``rbp citation``'s paper model (``--model paper``: 100 propagation
steps, K = 5, SGD) or of the PPR fixed-point GNN (``--model ppr``: 194 steps, K = 193, Adam,
dropout) is timed for

* ``single``: the per-seed model (``GGNN`` with torch's ``nn.GRUCell``, or ``PPRGNN``), the
  code before seeds were batched;
* ``batched S``: ``SeedBatchedGGNN`` / ``SeedBatchedPPR`` with S seeds (time per epoch
  divided by S);

and beside them the *arithmetic floor*: the same step's products alone (the sparse product
``A [h_1 .. h_S]`` and the two batched GEMMs of the GRU, 100 times), to say how close the
forward runs to what torch's kernels reach on those shapes. Each setting is timed as the
median of ``--repeats`` epochs after one warm-up, settings of one thread count interleaved
round-robin so that load from other jobs falls on them alike.

    python benchmarks/citation_seeds.py [--quick] [--device cpu] [--threads 1 2] [--model ppr]
                                        [--dataset pubmed --data-dir DIR]

prints a table and writes ``results/citation_seeds/bench[_ppr|_gcn][_pubmed].json``
(``--model gcn``:
20 epochs of the GCN baseline for S seeds, one call per seed against one batched call). Seeds
per hour is ``3600 / (epochs x seconds per epoch per seed)`` with the protocol's epochs (2000;
PPR 200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_bench  # noqa: E402  (the option types, the --out check)

import rbp  # noqa: E402
from rbp.apps.citation.baselines import GCNSettings, gcn_baseline, gcn_baseline_seeds
from rbp.apps.citation.config import CitationConfig
from rbp.apps.citation.experiment import _paper_method
from rbp.apps.citation.model import (
    GGNN,
    PPRGNN,
    normalised_adjacency,
    pca_features,
    sum_adjacency,
    truncation_for,
)
from rbp.apps.citation.seeds import SeedBatchedGGNN, SeedBatchedPPR
from rbp.data import DataError, load_planetoid, split_labelled
from rbp.runner.device import resolve_device

EPOCHS = 2000   # the paper's protocol: seconds per epoch x EPOCHS = seconds per seed
HIDDEN = CitationConfig().hidden   # the paper model's state size per dataset (the protocol's)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _single_epoch(adj: torch.Tensor, h0: torch.Tensor, labels: torch.Tensor, method: str,
                  device: torch.device) -> Any:
    train = split_labelled(labels >= 0, 0)[0].to(device)
    torch.manual_seed(0)
    net = GGNN(h0.shape[1], int(labels.max()) + 1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def epoch() -> None:       # GGNN starts original RBP from the paper's uniform draw
        opt.zero_grad()
        logits, _ = net(adj, h0, 100, method, 5, on_failure="ignore")
        F.cross_entropy(logits[train], labels[train]).backward()
        opt.step()
    return epoch


def _batched_epoch(adj: torch.Tensor, h0: torch.Tensor, labels: torch.Tensor, method: str,
                   seeds: int, device: torch.device) -> Any:
    ids = list(range(seeds))
    trains = [split_labelled(labels >= 0, s)[0].to(device) for s in ids]
    net = SeedBatchedGGNN.from_seeds(h0.shape[1], int(labels.max()) + 1, ids).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    how = _paper_method(method, 5, [torch.Generator().manual_seed(s) for s in ids],
                        (seeds, *h0.shape))

    def epoch() -> None:
        opt.zero_grad()
        logits, _ = net(adj, h0, 100, how, 5, on_failure="ignore")
        torch.stack([F.cross_entropy(logits[i, t], labels[t])
                     for i, t in enumerate(trains)]).sum().backward()
        opt.step()
    return epoch


def _ppr_single(adj: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, method: str,
                device: torch.device) -> Any:
    train = split_labelled(labels >= 0, 0)[0].to(device)
    torch.manual_seed(0)
    net = PPRGNN(x.shape[1], 64, int(labels.max()) + 1, 0.05, 0.5).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    k = truncation_for(0.95, 1e-3)

    def epoch() -> None:
        opt.zero_grad()
        z, _ = net(adj, x, k + 1, method, k, on_failure="ignore", backward_tol=1e-3)
        F.cross_entropy(z[train], labels[train]).backward()
        opt.step()
    return epoch


def _ppr_batched(adj: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, method: str,
                 seeds: int, device: torch.device) -> Any:
    ids = list(range(seeds))
    trains = [split_labelled(labels >= 0, s)[0].to(device) for s in ids]
    net = SeedBatchedPPR.from_seeds(x.shape[1], 64, int(labels.max()) + 1, ids, 0.05, 0.5,
                                    device=device).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    k = truncation_for(0.95, 1e-3)

    def epoch() -> None:
        opt.zero_grad()
        z, _ = net(adj, x, k + 1, method, k, on_failure="ignore", backward_tol=1e-3)
        torch.stack([F.cross_entropy(z[i, t], labels[t])
                     for i, t in enumerate(trains)]).sum().backward()
        opt.step()
    return epoch


def _gcn_single(x: torch.Tensor, d: Any, seeds: int, device: torch.device) -> Any:
    """``gcn_baseline`` (20 epochs, the plain-torch backend) for each seed in turn."""
    settings = GCNSettings(hidden=128, dropout=0.7, epochs=20)

    def run() -> None:
        for s in range(seeds):
            gcn_baseline(x, d.labels, d.edge_index, d.num_classes,
                         *split_labelled(d.labelled, s), s, settings, backend="torch",
                         device=device)
    return run


def _gcn_batched(x: torch.Tensor, d: Any, seeds: int, device: torch.device) -> Any:
    settings = GCNSettings(hidden=128, dropout=0.7, epochs=20)
    splits = [split_labelled(d.labelled, s) for s in range(seeds)]

    def run() -> None:
        gcn_baseline_seeds(x, d.labels, d.edge_index, d.num_classes, splits,
                           list(range(seeds)), settings, device=device)
    return run


def _floor(adj: torch.Tensor, h0: torch.Tensor, seeds: int) -> Any:
    """100 steps of the products alone: ``A [h_1 .. h_S]`` and two ``(S, N, H) x (S, H, 3H)``."""
    n, k = h0.shape
    h = torch.randn(seeds, n, k, device=h0.device)
    w = torch.randn(seeds, k, 3 * k, device=h0.device)

    def products() -> None:
        with torch.no_grad():
            for _ in range(100):
                torch.sparse.mm(adj, h.transpose(0, 1).reshape(n, seeds * k))
                torch.bmm(h, w)
                torch.bmm(h, w)
    return products


def _forward_only(adj: torch.Tensor, h0: torch.Tensor, seeds: int, classes: int) -> Any:
    net = SeedBatchedGGNN.from_seeds(h0.shape[1], classes, list(range(seeds))).to(h0.device)

    def forward() -> None:
        with torch.no_grad():
            net(adj, h0, 100, "neumann", 5, on_failure="ignore")
    return forward


def _median_times(fns: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    for fn in fns.values():       # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 repeats, bptt and neumann, S <= 2")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=core_bench.int_at_least(1), nargs="+", default=[1, 2],
                   help="torch thread counts to time (default: 1 2)")
    p.add_argument("--seeds", type=core_bench.int_at_least(1), nargs="+", default=None,
                   help="batch sizes S")
    p.add_argument("--methods", nargs="+", choices=list(rbp.METHODS), default=None,
                   help="gradient methods (default: all six; --quick bptt neumann; not with "
                        "--model gcn)")
    p.add_argument("--repeats", type=core_bench.int_at_least(1), default=None,
                   help="timed epochs per setting (default 3; --quick 2)")
    p.add_argument("--data-dir", default=None, help="Planetoid folder (default: shipped Cora)")
    p.add_argument("--model", choices=["paper", "ppr", "gcn"], default="paper")
    p.add_argument("--dataset", choices=sorted(HIDDEN), default="cora",
                   help="the paper model's hidden size is the protocol's for it (cora 64, "
                        "pubmed 16); pubmed needs --data-dir")
    p.add_argument("--out", type=Path, default=Path("results/citation_seeds"))
    args = p.parse_args(argv)
    core_bench.refuse_repeats(p, args, "threads", "seeds", "methods")
    if args.model == "gcn" and args.methods is not None:
        p.error("--methods does not apply with --model gcn (the GCN baseline has no gradient "
                "method); leave it out")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"citation_seeds: error: {exc}", file=sys.stderr)
        return 2
    core_bench.out_dir_or_exit("citation_seeds", args.out)
    methods = args.methods or (["bptt", "neumann"] if args.quick else
                               ["bptt", "tbptt", "rbp", "cg", "neumann", "gmres"])
    sizes = args.seeds or ([1, 2] if args.quick else [1, 2, 5, 10])
    repeats = args.repeats or (2 if args.quick else 3)
    try:
        d = load_planetoid(args.dataset, args.data_dir)
    except DataError as exc:  # a missing or damaged data folder: one line, not a traceback
        print(f"citation_seeds: error: {exc}", file=sys.stderr)
        return 2
    if args.model == "gcn":
        return _gcn_main(args, d, device, sizes, repeats)
    ppr = args.model == "ppr"
    epochs = 200 if ppr else EPOCHS
    adj = (normalised_adjacency if ppr else sum_adjacency)(d.edge_index, d.num_nodes).to(device)
    h0 = (d.features.to_sparse().to(device) if ppr
          else pca_features(d.features, HIDDEN[args.dataset]).to(device))
    labels = d.labels.to(device)
    single, batched = (_ppr_single, _ppr_batched) if ppr else (_single_epoch, _batched_epoch)
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for method in methods:
            fns = {"single": single(adj, h0, labels, method, device)}
            fns.update({f"batched {s}": batched(adj, h0, labels, method, s, device)
                        for s in sizes})
            t = _median_times(fns, repeats, device)
            for name, sec in t.items():
                s = 1 if name == "single" else int(name.split()[1])
                per_seed = sec / s
                rows.append({"threads": threads, "method": method, "model": name, "seeds": s,
                             "sec_per_epoch": sec, "sec_per_epoch_per_seed": per_seed,
                             "seeds_per_hour": 3600.0 / (epochs * per_seed),
                             "x_single": per_seed / t["single"]})
                print(f"threads {threads}  {method:8s} {name:11s} {sec:8.3f} s/epoch  "
                      f"{per_seed:7.3f} s/epoch/seed  {rows[-1]['seeds_per_hour']:6.2f} seeds/h "
                      f" x{rows[-1]['x_single']:.2f} of single", flush=True)
        if ppr:
            continue
        floor_fns = {f"forward {s}": _forward_only(adj, h0, s, d.num_classes) for s in sizes}
        floor_fns.update({f"floor {s}": _floor(adj, h0, s) for s in sizes})
        t = _median_times(floor_fns, repeats, device)
        for s in sizes:
            fwd, flo = t[f"forward {s}"], t[f"floor {s}"]
            rows.append({"threads": threads, "model": f"forward {s}", "seeds": s,
                         "forward_s": fwd, "floor_s": flo, "x_floor": fwd / flo})
            print(f"threads {threads}  no-grad forward, 100 steps, S={s:2d}: {fwd:.3f} s; "
                  f"products alone {flo:.3f} s (x{fwd / flo:.2f} of the floor)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "dataset": args.dataset, "device": str(device),
           "epochs_per_seed": epochs,
           "repeats": repeats, "torch": torch.__version__, "rows": rows}
    name = ("bench_ppr" if ppr else "bench") + ("" if args.dataset == "cora" else
                                               f"_{args.dataset}") + ".json"
    (args.out / name).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out / name}")
    return 0


def _gcn_main(args: Any, d: Any, device: torch.device, sizes: list[int], repeats: int) -> int:
    """The GCN baseline: 20 epochs of S seeds one call each against one batched call."""
    x = d.features.to_sparse()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for s in sizes:
            t = _median_times({"single": _gcn_single(x, d, s, device),
                               "batched": _gcn_batched(x, d, s, device)}, repeats, device)
            rows.append({"threads": threads, "seeds": s, "single_s": t["single"],
                         "batched_s": t["batched"], "x_single": t["batched"] / t["single"]})
            print(f"threads {threads}  gcn, 20 epochs, S={s:2d}: one seed at a time "
                  f"{t['single']:.2f} s, batched {t['batched']:.2f} s "
                  f"(x{rows[-1]['x_single']:.2f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"model": "gcn", "dataset": args.dataset, "device": str(device), "epochs": 20,
           "repeats": repeats,
           "torch": torch.__version__, "rows": rows}
    path = args.out / ("bench_gcn.json" if args.dataset == "cora"
                       else f"bench_gcn_{args.dataset}.json")
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
