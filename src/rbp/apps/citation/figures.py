"""Figure 3: training loss, validation accuracy and ``||h_t - h_{t-1}||`` per method (drawing only).

Tables and the merging of runs live in :mod:`rbp.apps.citation.tables`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
    Colours, axes and the "X and Y coincide" notes come from :mod:`rbp.runner.plots`.
    """
    import matplotlib.pyplot as plt

    from rbp.runner import plots

    paths = []
    for ds, entry in results.get("datasets", {}).items():
        models = [m for m, v in entry.get("models", {}).items() if v]
        if not models:
            continue
        fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
        for row, model in zip(axes, models, strict=True):
            methods = entry["models"][model]
            panels: list[dict[str, tuple[Any, Any]]] = [{}, {}, {}]
            for method, summary in methods.items():
                u = _first_seed(summary)
                if u is None:
                    continue
                lab = LABELS.get(method, method)
                loss = u["curves"]["train_loss"]
                panels[0][lab] = (np.arange(1, len(loss) + 1), loss)
                panels[1][lab] = (u["curves"]["eval_epochs"],
                                  np.asarray(u["curves"]["val_acc"]) * 100)
                if u["traces"]:
                    tr = u["traces"][-1]
                    panels[2][f"{lab} (epoch {tr['epoch']})"] = (
                        np.arange(1, len(tr["diff_norm"]) + 1), tr["diff_norm"])
            for ax, series, logy in zip(row, panels, (False, False, True), strict=True):
                lines = {name: ax.plot(xs, ys, color=plots.method_color(name), label=name,
                                       lw=1)[0] for name, (xs, ys) in series.items()}
                plots.style_axes(ax, [ys for _, ys in series.values()], logy=logy,
                                 integer_x=True)
                plots.note_coinciding(ax, series, lines)
            seed = _first_seed(next(iter(methods.values())))["seed"]  # type: ignore[index]
            row[0].set(xlabel="epoch", ylabel="training loss",
                       title=f"{ds} / {model} model: training loss (seed {seed})")
            row[1].set(xlabel="epoch", ylabel="validation accuracy (%)",
                       title="validation accuracy")
            row[2].set(xlabel="propagation step $t$", ylabel=r"$\|h_t - h_{t-1}\|$",
                       title="difference norm (last evaluation)")
            for ax in row:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(plots.save_figure(fig, Path(out_dir) / f"fig3_{ds}.png"))
    return paths
