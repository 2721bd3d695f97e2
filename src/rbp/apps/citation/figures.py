"""Figure 3 (training loss, validation accuracy, ``||h_t - h_{t-1}||`` per method) and Table 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rbp.runner import method_colors

__all__ = ["LABELS", "PAPER_TABLE1", "merge_runs", "sweep_summary", "write_figures",
           "write_table1"]

LABELS = {"bptt": "BPTT", "tbptt": "TBPTT", "rbp": "RBP", "cg": "CG-RBP",
          "neumann": "Neumann-RBP", "gmres": "GMRES-RBP"}

#: Paper Table 1, test accuracy in percent: (mean, std) per dataset.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "logreg": {"cora": (39.96, 3.4), "pubmed": (40.41, 3.1)},
    "bptt": {"cora": (24.48, 6.6), "pubmed": (47.05, 3.1)},
    "tbptt": {"cora": (46.55, 6.4), "pubmed": (53.41, 6.7)},
    "rbp": {"cora": (29.25, 3.3), "pubmed": (48.55, 3.4)},
    "cg": {"cora": (39.26, 6.5), "pubmed": (49.12, 2.9)},
    "neumann": {"cora": (46.63, 8.3), "pubmed": (53.56, 5.3)},
}


def _first_seed(summary: dict[str, Any]) -> dict[str, Any] | None:
    per = summary.get("per_seed") or []
    return per[0] if per else None


def write_figures(out_dir: Path | str, results: dict[str, Any]) -> list[Path]:
    """Write ``fig3_<dataset>.png``: one row per model, three panels, curves of the first seed.

    Panels: training loss per epoch; validation accuracy per evaluation; the forward
    difference norm ``||h_t - h_{t-1}||`` over the propagation steps at the last evaluation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ds, entry in results.get("datasets", {}).items():
        models = [m for m, v in entry.get("models", {}).items() if v]
        if not models:
            continue
        fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
        for row, model in zip(axes, models, strict=True):
            methods = entry["models"][model]
            colors = method_colors(methods)
            for method, summary in methods.items():
                u = _first_seed(summary)
                if u is None:
                    continue
                c, lab = colors[method], LABELS.get(method, method)
                loss = u["curves"]["train_loss"]
                row[0].plot(np.arange(1, len(loss) + 1), loss, color=c, label=lab, lw=1)
                row[1].plot(u["curves"]["eval_epochs"], np.asarray(u["curves"]["val_acc"]) * 100,
                            color=c, label=lab, lw=1)
                if u["traces"]:
                    tr = u["traces"][-1]
                    row[2].semilogy(np.arange(1, len(tr["diff_norm"]) + 1), tr["diff_norm"],
                                    color=c, label=f"{lab} (epoch {tr['epoch']})", lw=1)
            seed = _first_seed(next(iter(methods.values())))["seed"]  # type: ignore[index]
            row[0].set(xlabel="epoch", ylabel="training loss",
                       title=f"{ds} / {model} model: training loss (seed {seed})")
            row[1].set(xlabel="epoch", ylabel="validation accuracy (%)",
                       title="validation accuracy")
            row[2].set(xlabel="propagation step t", ylabel="||h_t - h_{t-1}||",
                       title="difference norm (last evaluation)")
            for ax in row:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"fig3_{ds}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "—"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f} (n={summary['n']})"


def write_table1(path: Path | str, results: dict[str, Any]) -> Path:
    """Markdown Table 1: the paper's test accuracies (%) beside ours (mean ± std over seeds)."""
    dss = list(results.get("datasets", {}))
    head = "| method |" + "".join(
        f" {d} (paper) | {d} (ours) |" if d in ("cora", "pubmed") else f" {d} (ours) |"
        for d in dss)
    sep = "|---|" + "".join("---|---|" if d in ("cora", "pubmed") else "---|" for d in dss)
    rows = []

    def row(label: str, key: str, get: Any) -> None:
        cells = []
        for d in dss:
            if d in ("cora", "pubmed"):
                p = PAPER_TABLE1.get(key, {}).get(d)
                cells.append(f"{p[0]:.2f} ± {p[1]:.1f}" if p else "—")
            cells.append(_fmt(get(results["datasets"][d])))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("Baseline (logistic regression)", "logreg",
        lambda e: e.get("baselines", {}).get("logreg"))
    def methods_of(model: str) -> list[str]:  # in order of appearance over the datasets
        names = [m for d in dss for m in results["datasets"][d].get("models", {}).get(model, {})]
        return list(dict.fromkeys(names))

    for m in methods_of("paper"):
        row(LABELS.get(m, m), m, lambda e, m=m: e.get("models", {}).get("paper", {}).get(m))
    for m in methods_of("injected"):
        row(f"Injected GNN, {LABELS.get(m, m)} (ours, not in paper)", f"inj_{m}",
            lambda e, m=m: e.get("models", {}).get("injected", {}).get(m))
    row("GCN (PyG, not in paper)", "gcn", lambda e: e.get("baselines", {}).get("gcn"))
    seeds = "; ".join(f"{d}: {results['datasets'][d].get('seeds', results.get('seeds'))}"
                      for d in dss)
    text = ("Test accuracy (%) on 1% / 49% / 50% random splits, mean ± std (population std) "
            f"over seeds ({seeds}); n = number of seeds.\n\n" + head + "\n" + sep + "\n"
            + "\n".join(rows) + "\n")
    Path(path).write_text(text)
    return Path(path)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several ``rbp citation`` runs (e.g. one per method and seed of a
    sweep): every (dataset, model or baseline, method) gets the per-seed records of all runs,
    one per seed, in seed order, summarised as a single run over those seeds would be."""
    from .experiment import summarise

    units: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    stats: dict[str, Any] = {}
    for res in runs:
        for ds, entry in (res.get("datasets") or {}).items():
            stats.setdefault(ds, entry.get("stats"))
            groups = [("baselines", name, s) for name, s in entry.get("baselines", {}).items()]
            groups += [(model, method, s) for model, ms in entry.get("models", {}).items()
                       for method, s in ms.items()]
            for kind, name, summary in groups:
                per = units.setdefault((ds, kind, name), {})
                for unit in summary.get("per_seed") or []:
                    per.setdefault(int(unit["seed"]), unit)  # a repeated seed: same numbers
    merged: dict[str, Any] = {"datasets": {}}
    for (ds, kind, name), per in units.items():
        entry = merged["datasets"].setdefault(ds, {"seeds": [], "stats": stats[ds],
                                                   "baselines": {}, "models": {}})
        where = entry["baselines"] if kind == "baselines" else \
            entry["models"].setdefault(kind, {})
        where[name] = summarise([per[s] for s in sorted(per)])
        entry["seeds"] = sorted(set(entry["seeds"]) | set(per))
    merged["seeds"] = sorted({s for e in merged["datasets"].values() for s in e["seeds"]})
    return merged


def sweep_summary(agg: dict[str, Any], sweep_dir: Path) -> Path | None:
    """After ``rbp sweep``: Table 1 and Fig. 3 over every finished point, in ``summary/``."""
    from rbp.runner.sweep import write_merged_run

    done = [(name, p["results"]) for name, p in agg["points"].items()
            if p["status"] == "finished" and p["results"]]
    if not done:
        return None
    merged = merge_runs([res for _, res in done])
    out = Path(sweep_dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    merged["figures"] = [str(p.name) for p in write_figures(out, merged)]
    merged["table1"] = str(write_table1(out / "table1.md", merged).name)
    return write_merged_run(out, agg["experiment"], merged, [name for name, _ in done])
