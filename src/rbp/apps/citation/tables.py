"""Table 1, the fixed-point models' cost table, and the merging of several runs' results.

``summarise`` turns per-seed records into mean ± sample std (percent, the one convention of
:mod:`rbp.runner.stats`); ``merge_runs``
joins the results of several runs (e.g. a sweep's points) as if one run had done every seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rbp import METHODS
from rbp.runner.stats import mean_std

from .figures import LABELS, write_figures

__all__ = ["FP_LABELS", "PAPER_TABLE1", "merge_runs", "ordering_text", "paired_differences",
           "summarise", "sweep_summary", "write_fp_table", "write_table1"]

#: Paper Table 1, test accuracy in percent: (mean, std) per dataset.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "logreg": {"cora": (39.96, 3.4), "pubmed": (40.41, 3.1)},
    "bptt": {"cora": (24.48, 6.6), "pubmed": (47.05, 3.1)},
    "tbptt": {"cora": (46.55, 6.4), "pubmed": (53.41, 6.7)},
    "rbp": {"cora": (29.25, 3.3), "pubmed": (48.55, 3.4)},
    "cg": {"cora": (39.26, 6.5), "pubmed": (49.12, 2.9)},
    "neumann": {"cora": (46.63, 8.3), "pubmed": (53.56, 5.3)},
}

#: Row labels of our models (not in the paper).
FP_LABELS = {"injected": "Injected GNN", "ppr": "PPR fixed-point GNN",
             "ignn": "IGNN-style fixed-point GNN"}


def summarise(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-seed records: test accuracies, mean and sample std (ddof 1,
    :func:`rbp.runner.stats.mean_std`) in percent.

    Graph models also get the mean seconds per epoch, the mean graph memory (``saved_mb``), the
    largest ``||h_T - h_T-1|| / ||h_T||`` at the end of training and the summed backward
    statuses.
    """
    acc = np.asarray([u["test_acc"] for u in units], dtype=float) * 100.0
    out: dict[str, Any] = {
        "seeds": [u["seed"] for u in units], "test_acc": acc.round(4).tolist(),
        **(mean_std(acc.tolist()).as_dict() if acc.size else
           {"mean": float("nan"), "std": float("nan"), "n": 0}),
    }
    val = [u["val_acc" if "val_acc" in u else "best_val_acc"] for u in units
           if "val_acc" in u or "best_val_acc" in u]
    if len(val) == len(units) and units:
        out["val_mean"] = float(np.mean(val) * 100.0)
    if units and "curves" in units[0]:
        out["best_epoch"] = [u["best_epoch"] for u in units]
        out["sec_per_epoch"] = float(np.mean([u["sec_per_epoch"] for u in units]))
        out["train_time_s"] = float(np.sum([u["train_time_s"] for u in units]))
        saved = [u["saved_mb"] for u in units if u.get("saved_mb") is not None]
        out["saved_mb"] = float(np.mean(saved)) if saved else None
        rel = [u["final_rel_diff"] for u in units if u.get("final_rel_diff") is not None]
        out["max_final_rel_diff"] = float(np.max(rel)) if rel else None
        status: dict[str, int] = {}
        for u in units:
            for k, v in (u.get("backward_status") or {}).items():
                status[k] = status.get(k, 0) + v
        out["backward_status"] = status
        out["diverged"] = [u["seed"] for u in units if u.get("diverged_at") is not None]
    out["per_seed"] = units
    return out


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "—"
    units = summary.get("per_seed") or [{}]
    epochs = {u.get("settings", {}).get("epochs") for u in units} - {None}
    ep = f", {'/'.join(str(e) for e in sorted(epochs))} ep" if epochs else ""
    spread = f" ± {summary['std']:.2f}" if summary["n"] > 1 else ""  # one seed: no spread
    diverged = sum(u.get("diverged_at") is not None for u in units)
    stopped = f", {diverged} diverged" if diverged else ""  # stopped early; best epoch before
    return f"{summary['mean']:.2f}{spread} (n={summary['n']}{ep}{stopped})"


def paired_differences(results: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """For each pair of the paper model's methods that our means order otherwise than the
    paper's, the per-seed paired differences ``ours(a) - ours(b)`` on the seeds both ran:
    mean, sample std, n and a 95 % t interval (``real`` when it excludes 0)."""
    from scipy import stats

    methods = results["datasets"][dataset].get("models", {}).get("paper", {})
    named = [m for m in methods if dataset in PAPER_TABLE1.get(m, {})]
    out = []
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            paper = PAPER_TABLE1[a][dataset][0] - PAPER_TABLE1[b][dataset][0]
            acc = {m: {u["seed"]: 100.0 * u["test_acc"] for u in methods[m]["per_seed"]}
                   for m in (a, b)}
            common = sorted(set(acc[a]) & set(acc[b]))
            diff = np.asarray([acc[a][s] - acc[b][s] for s in common])
            if diff.size < 2 or np.sign(diff.mean()) == np.sign(paper) or paper == 0:
                continue
            sd = float(diff.std(ddof=1))
            half = float(stats.t.ppf(0.975, diff.size - 1) * sd / np.sqrt(diff.size))
            out.append({"a": a, "b": b, "paper": paper, "mean": float(diff.mean()), "std": sd,
                        "n": int(diff.size), "ci": [float(diff.mean()) - half,
                                                    float(diff.mean()) + half],
                        "real": bool(abs(diff.mean()) > half)})
    return out


def ordering_text(results: dict[str, Any]) -> str:
    """Markdown: where our ordering of the paper's methods differs from the paper's, whether
    the per-seed paired differences say the difference is real ('' if nowhere)."""
    lines = []
    for ds in results.get("datasets", {}):
        for p in paired_differences(results, ds):
            verdict = ("the interval excludes 0: the order differs" if p["real"] else
                       "the interval includes 0: no difference at this n")
            lines.append(
                f"| {ds} | {LABELS.get(p['a'], p['a'])} − {LABELS.get(p['b'], p['b'])} | "
                f"{p['paper']:+.2f} | {p['mean']:+.2f} ± {p['std']:.2f} (n={p['n']}) | "
                f"[{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] | {verdict} |")
    if not lines:
        return ""
    return ("Where our means order two of the paper's methods otherwise than the paper: the "
            "per-seed paired difference (same seed, same split), its sample std and 95 % t "
            "interval.\n\n| dataset | pair | paper | ours, paired | 95 % interval | verdict |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def _methods_of(results: dict[str, Any], model: str) -> list[str]:
    """Methods of ``model`` in order of appearance over the datasets."""
    names = list(dict.fromkeys(m for e in results.get("datasets", {}).values()
                               for m in e.get("models", {}).get(model, {})))
    order = {m: i for i, m in enumerate(METHODS)}   # the core's order, others after
    return sorted(names, key=lambda m: order.get(m, len(order)))


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

    def model_rows(model: str, label: str) -> None:
        for m in _methods_of(results, model):
            row(f"{label}, {LABELS.get(m, m)} (ours, not in paper)" if label else
                LABELS.get(m, m), m if not label else f"{model}_{m}",
                lambda e, m=m: e.get("models", {}).get(model, {}).get(m))

    def has_baseline(name: str) -> bool:
        return any(name in e.get("baselines", {}) for e in results["datasets"].values())

    if has_baseline("logreg"):
        row("Baseline (logistic regression)", "logreg",
            lambda e: e.get("baselines", {}).get("logreg"))
    model_rows("paper", "")
    for model, label in FP_LABELS.items():
        model_rows(model, label)
    if has_baseline("gcn"):
        row("GCN (not in paper)", "gcn", lambda e: e.get("baselines", {}).get("gcn"))
    seeds = "; ".join(f"{d}: {results['datasets'][d].get('seeds', results.get('seeds'))}"
                      for d in dss)
    text = ("Test accuracy (%) on 1% / 49% / 50% random splits, mean ± std (sample std) "
            f"over seeds ({seeds}); n = number of seeds.\n\n" + head + "\n" + sep + "\n"
            + "\n".join(rows) + "\n")
    order = ordering_text(results)
    if order:
        text += "\n" + order
    fp = fp_table(results)
    if fp:
        text += "\n" + fp
    Path(path).write_text(text)
    return Path(path)


def _status_text(status: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(status.items())) or "—"


def fp_table(results: dict[str, Any]) -> str:
    """Markdown table of the fixed-point models per method: accuracy, cost against BPTT
    through the same number of steps, forward settling and backward statuses ('' if none)."""
    lines = []
    for ds, entry in results.get("datasets", {}).items():
        for model in ("ppr", "ignn"):
            methods = entry.get("models", {}).get(model) or {}
            if not methods:
                continue
            ref = methods.get("bptt") or {}
            first = next(iter(methods.values()))
            s = (first.get("per_seed") or [{}])[0].get("settings", {})
            lines.append(
                f"{FP_LABELS[model]} on {ds}: T = {s.get('steps')} steps, K = "
                f"{s.get('truncate')}, contraction rate {s.get('rate')}, Prop. 2 bound "
                f"rate^(K+1)/(1-rate) = {s.get('prop2_bound', float('nan')):.2g}.\n")
            lines.append("| method | test acc. (%) | s / epoch | × BPTT time | graph MB | "
                         "× BPTT memory | max rel. ‖h_T − h_T−1‖ | backward solves |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for m in _methods_of({"datasets": {ds: entry}}, model):
                summ = methods[m]
                t, mb = summ.get("sec_per_epoch"), summ.get("saved_mb")
                t_ref, mb_ref = ref.get("sec_per_epoch"), ref.get("saved_mb")
                rel = summ.get("max_final_rel_diff")
                cells = [LABELS.get(m, m), _fmt(summ),
                         f"{t:.4f}" if t else "—",
                         f"{t / t_ref:.2f}" if t and t_ref else "—",
                         f"{mb:.2f}" if mb else "—",
                         f"{mb / mb_ref:.2f}" if mb and mb_ref else "—",
                         f"{rel:.1e}" if rel is not None else "—",
                         "—" if m in ("bptt", "tbptt") else
                         _status_text(summ.get("backward_status") or {})]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_fp_table(path: Path | str, results: dict[str, Any]) -> Path | None:
    """Write :func:`fp_table` to ``path``; ``None`` when no fixed-point model ran."""
    text = fp_table(results)
    if not text:
        return None
    Path(path).write_text(text)
    return Path(path)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several ``rbp citation`` runs (e.g. one per method and seed of a
    sweep): every (dataset, model or baseline, method) gets the per-seed records of all runs,
    one per seed, in seed order, summarised as a single run over those seeds would be."""
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
