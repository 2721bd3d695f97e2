"""Figure 3: training loss, validation accuracy and ``||h_t - h_{t-1}||`` per method (drawing only).

Tables and the merging of runs live in :mod:`rbp.apps.citation.tables`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rbp.runner import method_colors

__all__ = ["LABELS", "write_figures"]

LABELS = {"bptt": "BPTT", "tbptt": "TBPTT", "rbp": "RBP", "cg": "CG-RBP",
          "neumann": "Neumann-RBP", "gmres": "GMRES-RBP"}

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
