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


def _smooth(ys: Any, points: int = 40) -> np.ndarray:
    """Moving average over ``len / points`` values (the curve's shape, not its noise)."""
    ys = np.asarray(ys, dtype=float)
    width = max(1, len(ys) // points)
    if width == 1:
        return ys
    kernel = np.ones(width) / width
    pad = np.concatenate([np.full(width // 2, ys[0]), ys, np.full(width - 1 - width // 2,
                                                                    ys[-1])])
    return np.convolve(pad, kernel, mode="valid")


def write_figures(out_dir: Path | str, results: dict[str, Any]) -> list[Path]:
    """Write ``fig3_<dataset>.png``: one row per model, three panels, curves of the first seed.

    Panels: training loss per epoch; validation accuracy per evaluation; the forward
    difference norm ``||h_t - h_{t-1}||`` over the propagation steps at the last evaluation.
    Long curves (over 200 points) are drawn faint with a moving average on top. Methods keep
    one order and colour in every panel, with one legend for the figure; the "X and Y
    coincide" notes go under their panel, where they cover no curve.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from rbp.runner import plots

    order = {m: i for i, m in enumerate(LABELS)}
    paths = []
    for ds, entry in results.get("datasets", {}).items():
        models = [m for m, v in entry.get("models", {}).items() if v]
        if not models:
            continue
        fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.4 * len(models)),
                                 squeeze=False)
        shown: dict[str, str] = {}
        for row, model in zip(axes, models, strict=True):
            methods = entry["models"][model]
            panels: list[dict[str, tuple[Any, Any]]] = [{}, {}, {}]
            trace_epoch = None
            for method in sorted(methods, key=lambda m: order.get(m, len(order))):
                u = _first_seed(methods[method])
                if u is None:
                    continue
                lab = LABELS.get(method, method)
                shown[lab] = plots.method_color(lab)
                loss = u["curves"]["train_loss"]
                panels[0][lab] = (np.arange(1, len(loss) + 1), loss)
                panels[1][lab] = (u["curves"]["eval_epochs"],
                                  np.asarray(u["curves"]["val_acc"]) * 100)
                if u["traces"]:
                    tr = u["traces"][-1]
                    trace_epoch = tr["epoch"]
                    panels[2][lab] = (np.arange(1, len(tr["diff_norm"]) + 1), tr["diff_norm"])
            for ax, series, logy in zip(row, panels, (False, False, True), strict=True):
                lines = {}
                for name, (xs, ys) in series.items():
                    color = plots.method_color(name)
                    if len(ys) > 200:
                        ax.plot(xs, ys, color=color, lw=0.5, alpha=0.25)
                        (lines[name],) = ax.plot(xs, _smooth(ys), color=color, lw=1.4)
                    else:
                        (lines[name],) = ax.plot(xs, ys, color=color, lw=1)
                plots.style_axes(ax, [ys for _, ys in series.values()], logy=logy,
                                 integer_x=True)
                plots.note_coinciding(ax, series, lines, below=True)
                ax.grid(alpha=0.3)
            seed = _first_seed(next(iter(methods.values())))["seed"]  # type: ignore[index]
            row[0].set(xlabel="epoch", ylabel="training loss",
                       title=f"{ds} / {model} model: training loss (seed {seed})")
            row[1].set(xlabel="epoch", ylabel="validation accuracy (%)",
                       title="validation accuracy")
            at = f" at epoch {trace_epoch}" if trace_epoch is not None else ""
            row[2].set(xlabel="propagation step $t$", ylabel=r"$\|h_t - h_{t-1}\|$",
                       title=f"difference norm{at}")
        handles = [Line2D([], [], color=c, lw=2) for c in shown.values()]
        fig.legend(handles, list(shown), loc="upper center", ncol=len(shown), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
        paths.append(plots.save_figure(fig, Path(out_dir) / f"fig3_{ds}.png"))
    return paths
