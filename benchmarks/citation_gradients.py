"""The paper model's gradient at initialisation, per method: how large, and how exact in float32.

For each dataset (``--datasets``) and method, the GG-NN of ``rbp citation`` (seed ``--seed``'s
weights, split and PCA start; 100 steps, K = 5) computes the gradient of the training loss once in
float32 and once in float64 from the same weights, and records

* ``grad_norm``: ``||dL/dw||`` in float64;
* ``float32_error``: ``||g_32 - g_64|| / ||g_64||``, how much of the float32 gradient that
  training uses is round-off amplified through the 100 steps;
* ``forward_change``: the forward's relative change over its last step (float64): whether the
  100 steps settled at all (the implicit methods assume they did).

The point: at initialisation BPTT's and original RBP's gradients are 10^3-10^5 times the
others', and in float32 much of BPTT's is round-off, which is why those rows of Table 1 trail.

    python benchmarks/citation_gradients.py [--quick] [--datasets cora pubmed] [--data-dir DIR]

prints a table and writes ``results/citation_gradients/gradients.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_bench  # noqa: E402  (device check, result writer)

import rbp  # noqa: E402
from rbp.apps.citation.config import CitationConfig
from rbp.apps.citation.experiment import _paper_method  # noqa: E402
from rbp.apps.citation.model import pca_features, sum_adjacency  # noqa: E402
from rbp.apps.citation.seeds import SeedBatchedGGNN  # noqa: E402
from rbp.data import DataError, load_planetoid, split_labelled  # noqa: E402

STEPS, TRUNCATE = 100, 5   # the paper model's protocol


def gradient(data: Any, adj: torch.Tensor, h0: torch.Tensor, method: str, seed: int,
             dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float]:
    """The training loss's gradient (flattened, float64) and the forward's last relative
    change, for seed ``seed``'s model in ``dtype`` (``adj``, ``h0``: the dataset's summed
    adjacency and PCA start)."""
    adj, h0 = adj.to(device, dtype), h0.to(device, dtype)
    hidden = h0.shape[1]
    train = split_labelled(data.labelled, seed)[0].to(device)
    labels = data.labels.to(device)
    net = SeedBatchedGGNN.from_seeds(hidden, data.num_classes, [seed]).to(device, dtype)
    how = _paper_method(method, TRUNCATE, [torch.Generator().manual_seed(seed)],
                        (1, *h0.shape))
    logits, info = net(adj, h0, STEPS, how, TRUNCATE)
    F.cross_entropy(logits[0, train], labels[train]).backward()
    flat = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
    return flat, float(info.relative_final_difference)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=["cora", "pubmed", "citeseer"],
                   default=None, help="default: cora pubmed (--quick: cora)")
    p.add_argument("--methods", nargs="+", choices=list(rbp.METHODS), default=None,
                   help="default: all six (--quick: bptt neumann)")
    p.add_argument("--quick", action="store_true", help="Cora, BPTT and Neumann-RBP")
    p.add_argument("--seed", type=core_bench.int_at_least(0, core_bench.MAX_SEED), default=0,
                   help="the model's weights, split and PCA start (0 .. 2^32 - 1)")
    p.add_argument("--data-dir", default=None, help="Planetoid folder (pubmed needs one offline)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", type=Path, default=Path("results/citation_gradients"),
                   help="folder for gradients.json (default: results/citation_gradients)")
    args = p.parse_args(argv)
    core_bench.refuse_repeats(p, args, "datasets", "methods")
    datasets = args.datasets or (["cora"] if args.quick else ["cora", "pubmed"])
    methods = args.methods or (["bptt", "neumann"] if args.quick else list(rbp.METHODS))
    device = core_bench.device_or_exit("citation_gradients", args.device, ["float64"])
    core_bench.out_dir_or_exit("citation_gradients", args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    lines = ["| dataset | method | gradient norm | float32 error | forward's last change |",
             "|---|---|---|---|---|"]
    for ds in datasets:
        try:
            data = load_planetoid(ds, args.data_dir)
        except DataError as exc:
            print(f"citation_gradients: error: {exc}", file=sys.stderr)
            return 2
        adj = sum_adjacency(data.edge_index, data.num_nodes)   # once a dataset (PCA is slow)
        h0 = pca_features(data.features, CitationConfig().hidden[ds])
        for method in methods:
            g32, _ = gradient(data, adj, h0, method, args.seed, torch.float32, device)
            g64, change = gradient(data, adj, h0, method, args.seed, torch.float64, device)
            norm = float(g64.norm())
            err = float((g32 - g64).norm()) / norm
            rows.append({"dataset": ds, "method": method, "grad_norm": norm,
                         "float32_error": err, "forward_change": change})
            lines.append(f"| {ds} | {method} | {norm:.3g} | {err:.2e} | {change:.2e} |")
            print(lines[-1], flush=True)
    result = {"seed": args.seed, "steps": STEPS, "truncate": TRUNCATE, "device": str(device),
              "torch": torch.__version__, "rows": rows,
              "wall_time_s": time.perf_counter() - t0}
    core_bench.write_result(args.out, "gradients.json", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
