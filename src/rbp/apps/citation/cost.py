"""Cost of one training step of the fixed-point models, every method against BPTT, same run.

    python -m rbp.apps.citation.cost --data-dir ../shared/data/planetoid --out cost.json

For ``ppr`` and ``ignn`` on one Planetoid graph (untrained weights, seed 0, T = K + 1 steps with
K from the contraction rate as in the experiment), each method's training step (forward,
cross-entropy on the 1 % training nodes, backward) is timed (best of ``--repeats``) and its graph
memory measured: the bytes of the distinct storages autograd saves in the forward
(``torch.autograd.graph.saved_tensors_hooks``). Prints a table with ratios to BPTT and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import rbp
from rbp.data import load_planetoid, split_labelled

from .experiment import _SavedBytes
from .model import IGNN, PPRGNN, normalised_adjacency, truncation_for

__all__ = ["measure", "main"]


def measure(dataset: str, data_dir: str | None, rate: float = 0.95, bound: float = 1e-3,
            hidden: int = 64, backward_tol: float = 1e-3, repeats: int = 3,
            models: tuple[str, ...] = ("ppr", "ignn")) -> list[dict[str, Any]]:
    """One row per (model, method): ``saved_mb``, ``s_per_step`` and their ratios to BPTT."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    d = load_planetoid(dataset, data_dir)
    adj = normalised_adjacency(d.edge_index, d.num_nodes)
    x = d.features.to_sparse()
    train, _, _ = split_labelled(d.labelled, 0)
    k = truncation_for(rate, bound)
    rows: list[dict[str, Any]] = []
    for kind in models:
        for method in rbp.METHODS:
            torch.manual_seed(0)
            net: torch.nn.Module
            if kind == "ppr":
                net = PPRGNN(d.num_features, hidden, d.num_classes, alpha=1.0 - rate)
            else:
                net = IGNN(d.num_features, hidden, d.num_classes, kappa=rate)

            def step(net: torch.nn.Module = net, method: str = method) -> rbp.FixedPointInfo:
                net.zero_grad()
                logits, info = net(adj, x, k + 1, method, k, backward_tol=backward_tol)
                F.cross_entropy(logits[train], d.labels[train]).backward()
                return info

            saved = _SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                info = step()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                info = step()
                times.append(time.perf_counter() - t0)
            rows.append({"dataset": dataset, "model": kind, "method": method, "steps": k + 1,
                         "K": k, "rate": rate, "saved_mb": saved.megabytes,
                         "s_per_step": min(times),
                         "backward_status": [str(getattr(b.status, "value", b.status))
                                             for b in info.backward]})
    for r in rows:
        ref = next(q for q in rows if q["model"] == r["model"] and q["method"] == "bptt")
        r["memory_vs_bptt"] = r["saved_mb"] / ref["saved_mb"]
        r["time_vs_bptt"] = r["s_per_step"] / ref["s_per_step"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cora")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rate", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="citation_cost.json")
    a = p.parse_args(argv)
    if not 0.0 < a.rate < 1.0:
        p.error(f"--rate must be in (0, 1), got {a.rate}")
    torch.set_num_threads(a.threads)
    rows = measure(a.dataset, a.data_dir, rate=a.rate, repeats=a.repeats)
    print(f"{'model':6} {'method':8} {'graph MB':>9} {'x BPTT':>7} {'s/step':>8} {'x BPTT':>7}"
          "  backward")
    for r in rows:
        print(f"{r['model']:6} {r['method']:8} {r['saved_mb']:9.2f} {r['memory_vs_bptt']:7.3f} "
              f"{r['s_per_step']:8.4f} {r['time_vs_bptt']:7.2f}  {','.join(r['backward_status'])}")
    Path(a.out).write_text(json.dumps({"threads": a.threads, "rows": rows}, indent=1))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
