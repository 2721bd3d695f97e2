"""Figures of ``rbp hyperopt``: paper Fig. 4 (t-SNE), Fig. 5 (meta loss), Fig. 6 (last inner
training curve) and the learned learning-rate / momentum trajectories."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rbp.runner import line_plot, multi_panel
from rbp.runner.tables import Table, write_table


def _smooth(values: list[float], width: int) -> np.ndarray:
    """Trailing moving average ``m_t = mean(x_{t-w+1..t})`` (shorter at the start)."""
    x = np.asarray(values, dtype=float)
    if width <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - width, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _by_setting(units: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    grouped: dict[tuple[int, int], dict[str, Any]] = {}
    for unit in units.values():
        key = (int(unit["train_steps"]), int(unit["truncate"]))
        grouped.setdefault(key, {})[unit["method"]] = unit
    return grouped


def fig5(units: dict[str, Any], path: Path) -> Path:
    """Meta training loss vs meta step, one panel per (T, K), one line per method."""
    panels = []
    for (t, k), methods in _by_setting(units).items():
        series = {m: (list(range(1, len(u["meta_loss"]) + 1)), u["meta_loss"])
                  for m, u in methods.items() if u["meta_loss"]}
        panels.append({"series": series, "title": f"T={t}, K={k}", "xlabel": "meta step",
                       "ylabel": "meta training loss", "logy": True})
    return multi_panel(path, panels, ncols=None)


def fig6(units: dict[str, Any], path: Path, smooth: int = 10) -> Path:
    """Inner mini-batch training loss over the run at the last meta step (smoothed)."""
    panels = []
    for (t, k), methods in _by_setting(units).items():
        series = {}
        for m, u in methods.items():
            curve = u["inner_loss_last"][:-1]  # the last entry is the full-batch step
            if curve:
                series[m] = (list(range(1, len(curve) + 1)), _smooth(curve, smooth).tolist())
        panels.append({"series": series, "title": f"T={t}, K={k} (last meta step)",
                       "xlabel": "training step", "ylabel": "training loss (mini-batch)",
                       "logy": True})
    return multi_panel(path, panels, ncols=None)


def fig_hyper(units: dict[str, Any], out_dir: Path) -> list[Path]:
    """Learned learning rates and momenta per parameter tensor vs meta step, per setting:
    one row per method; colour = layer, solid = weights, dashed = biases."""
    import matplotlib.pyplot as plt

    from rbp.runner import plots

    paths = []
    for (t, k), methods in _by_setting(units).items():
        rows = [(m, u) for m, u in methods.items() if u["learning_rate"]]
        if not rows:
            continue
        fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.8 * len(rows) + 0.9),
                                 squeeze=False)
        handles: list[Any] = []
        for r, (m, u) in enumerate(rows):
            steps = np.arange(1, len(u["learning_rate"]) + 1)
            for c, (what, key, logy) in enumerate((("learning rate", "learning_rate", True),
                                                   ("momentum", "momentum", False))):
                ax = axes[r, c]
                arr = np.asarray(u[key])
                lines = [ax.plot(steps, arr[:, i], color=plt.cm.tab10(i // 2),
                                 linestyle="-" if i % 2 == 0 else "--",
                                 label=_tensor_name(i))[0] for i in range(arr.shape[1])]
                handles = handles or lines
                plots.style_axes(ax, [arr.ravel()], logy=logy, integer_x=True)
                ax.set_title(f"{m}: {what}", color=plots.method_color(m))
                ax.set_xlabel("meta step")
                ax.set_ylabel(what)
                ax.grid(True, alpha=0.3)
        fig.suptitle(f"learned hyperparameters per parameter tensor, T={t}, K={k}")
        # one legend for every panel, above them: colour = layer, solid = weights, dashed =
        # biases, the same in each panel
        fig.legend(handles, [h.get_label() for h in handles], loc="upper center",
                   ncol=len(handles), bbox_to_anchor=(0.5, 1.0 - 0.35 / fig.get_figheight()),
                   fontsize="small", frameon=False,
                   title="parameter tensor (every panel): colour = layer, solid = weights W, "
                         "dashed = biases b", title_fontsize="small")
        fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.9 / fig.get_figheight()))
        paths.append(plots._save(fig, out_dir / f"hyperparams_T{t}_K{k}.png"))
    return paths


def _tensor_name(i: int) -> str:
    return f"{'W' if i % 2 == 0 else 'b'}{i // 2 + 1}"


def unpack_array(value: Any) -> np.ndarray:
    """An array stored in ``results.json``: a nested list, or the compact form of committed
    results (``tools/compact_results.py``), ``{"float16_base64": ..., "shape": [...]}``."""
    if isinstance(value, dict) and "float16_base64" in value:
        raw = base64.b64decode(value["float16_base64"])
        return np.frombuffer(raw, dtype="<f2").astype(np.float64).reshape(value["shape"])
    return np.asarray(value, dtype=np.float64)


def tsne_embed(trajectories: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """2-D t-SNE of all (projected) weight snapshots together, split back per trajectory."""
    from sklearn.manifold import TSNE

    names = list(trajectories)
    stacked = np.concatenate([trajectories[n] for n in names])
    perplexity = float(min(30.0, max(2.0, (len(stacked) - 1) / 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, random_state=seed,
               init="pca").fit_transform(stacked)
    out, start = {}, 0
    for n in names:
        out[n] = emb[start:start + len(trajectories[n])]
        start += len(trajectories[n])
    return out


def fig4(units: dict[str, Any], path: Path, seed: int,
         coords: dict[str, Any] | None = None) -> tuple[Path | None, dict[str, Any]]:
    """t-SNE of the inner weight trajectories per method (its colour, light at the start of
    the inner run, full at the end), one panel per recorded meta step; the end point of each
    trajectory is annotated. ``coords``: embeddings computed before (``results.json``'s
    ``fig4_tsne_coordinates``), reused instead of running t-SNE again."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D

    from rbp.runner import plots

    recorded = sorted({int(s) for u in units.values() for s in u.get("trajectories", {})})
    if not recorded:
        return None, {}
    known = coords or {}
    out_coords: dict[str, Any] = {}
    fig, axes = plt.subplots(1, len(recorded), figsize=(5.5 * len(recorded), 4.5),
                             squeeze=False)
    for ax, meta in zip(axes[0], recorded, strict=True):
        trajs = {u["method"]: unpack_array(u["trajectories"][str(meta)])
                 for u in units.values() if str(meta) in u.get("trajectories", {})}
        if known.get(str(meta)) and set(known[str(meta)]) == set(trajs):
            emb = {m: np.asarray(known[str(meta)][m], dtype=float) for m in trajs}
        else:
            emb = tsne_embed(trajs, seed)
        out_coords[str(meta)] = {m: e.tolist() for m, e in emb.items()}
        markers = ["o", "^", "s", "D"]
        centre = np.concatenate(list(emb.values())).mean(axis=0)
        handles = []
        for i, (m, e) in enumerate(emb.items()):
            # the method's colour of every other figure, light at the start of the inner run
            # and full at its end (the legend shows the full colour)
            colour = np.asarray(to_rgb(plots.method_color(m)))
            frac = np.linspace(0.0, 1.0, len(e))[:, None]
            fills = (1 - (0.2 + 0.8 * frac)) * 1.0 + (0.2 + 0.8 * frac) * colour
            marker = markers[i % len(markers)]
            ax.scatter(e[:, 0], e[:, 1], c=fills, marker=marker, s=16,
                       edgecolors=plots.method_color(m), linewidths=0.4)
            handles.append(Line2D([], [], linestyle="", marker=marker, markersize=6,
                                  markerfacecolor=plots.method_color(m),
                                  markeredgecolor=plots.method_color(m), label=m))
            # the end-point label points inwards, so it never leaves the axes
            right = e[-1, 0] > centre[0]
            ax.annotate(f"{m} (end)", e[-1], xytext=(-8 if right else 8, 0),
                        textcoords="offset points", ha="right" if right else "left",
                        va="center", fontsize=9, weight="bold", color=plots.method_color(m),
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white",
                              "alpha": 0.8, "edgecolor": "none"})
        ax.margins(0.08)
        ax.set_title(f"meta step {meta}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(handles=handles, fontsize="small", title="light → full colour: start → "
                  "end of the inner run", title_fontsize="x-small")
    fig.tight_layout()
    return plots._save(fig, path), out_coords


def meta_loss_table(units: dict[str, Any]) -> Table:
    """The final meta loss per (T, K) and method, and the meta loss at the first meta step
    (the untrained hyperparameters, the same for every method)."""
    grouped = _by_setting(units)
    methods = list(dict.fromkeys(m for by in grouped.values() for m in by))
    rows = []
    for (t, k), by in grouped.items():
        firsts = [u["meta_loss"][0] for u in by.values() if u.get("meta_loss")]
        steps = sorted({int(u.get("meta_steps_done") or len(u.get("meta_loss") or []))
                        for u in by.values()})
        rows.append([f"({t}, {k})", "/".join(map(str, steps)),
                     *(_fmt(by[m].get("final_meta_loss")) if m in by else "—"
                       for m in methods),
                     _fmt(firsts[0]) if firsts else "—"])
    return Table(columns=["(T, K)", "meta steps", *methods, "first meta step"], rows=rows,
                 title="Final meta loss (training set)",
                 align=["left", "right", *["right"] * len(methods), "right"],
                 notes="Meta loss at the last meta step per method; the last column is the "
                       "meta loss at the first meta step (the initial hyperparameters).")


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def make_all(results: dict[str, Any], cfg: Any, out_dir: Path,
             log: logging.Logger | None = None) -> dict[str, Any]:
    """Draw every figure into ``out_dir`` and write the table of final meta losses
    (``meta_loss.md`` / ``.table.json``); returns the figures' paths (and the t-SNE
    coordinates, reused from ``results["figures"]`` when they are there)."""
    units = results["units"]
    write_table(Path(out_dir) / "meta_loss", meta_loss_table(units))
    known = (results.get("figures") or {}).get("fig4_tsne_coordinates")
    paths: dict[str, Any] = {
        "fig5": str(fig5(units, out_dir / "fig5_meta_loss.png")),
        "fig6": str(fig6(units, out_dir / "fig6_last_training_loss.png")),
        "hyperparams": [str(p) for p in fig_hyper(units, out_dir)],
    }
    try:
        p4, coords = fig4(units, out_dir / "fig4_tsne.png", cfg.seed, known)
    except ImportError as exc:  # scikit-learn missing
        if log is not None:
            log.warning("fig4 skipped: %s", exc)
        p4, coords = None, {}
    if p4 is not None:
        paths["fig4"] = str(p4)
        paths["fig4_tsne_coordinates"] = coords
    elif log is not None and cfg.tsne_meta_steps:  # asked for, but no unit recorded one
        log.warning("fig4 not drawn: no unit of this run is tsne_setting=%s with a method of "
                    "tsne_methods=%s that reached a meta step of tsne_meta_steps=%s; set them "
                    "to one of this run's units (or tsne_meta_steps=[] for none)",
                    list(cfg.tsne_setting), list(cfg.tsne_methods), list(cfg.tsne_meta_steps))
    # One summary line plot of the meta loss of every unit (handy for a quick look).
    series = {tag: (list(range(1, len(u["meta_loss"]) + 1)), u["meta_loss"])
              for tag, u in units.items() if u["meta_loss"]}
    if len(series) <= 10:
        paths["meta_loss_all"] = str(line_plot(out_dir / "meta_loss_all.png", series,
                                               "meta step", "meta loss", logy=True))
    return paths


def sweep_summary(agg: dict[str, Any], sweep_dir: Path) -> Path | None:
    """After ``rbp sweep``: merge the units of every finished point into ``summary/`` and draw
    Fig. 4-6 there, as if one ``rbp hyperopt`` run had covered the whole grid."""
    from types import SimpleNamespace

    from rbp.runner.sweep import write_merged_run

    done = [(name, p["results"]) for name, p in agg["points"].items()
            if p["status"] == "finished" and p["results"]]
    if not done:
        return None
    first = done[0][1]
    units: dict[str, Any] = {}
    for _, res in done:
        units.update(res.get("units") or {})
    settings = sorted({(int(u["train_steps"]), int(u["truncate"])) for u in units.values()})
    merged = {"units": units, "num_examples": first.get("num_examples"),
              "settings": [list(s) for s in settings], "config": first.get("config")}
    out = Path(sweep_dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    seed = int((first.get("config") or {}).get("seed", 0))
    merged["figures"] = make_all(merged, SimpleNamespace(seed=seed), out)
    return write_merged_run(out, agg["experiment"], merged, [name for name, _ in done])


def main(argv: list[str] | None = None) -> None:
    """``python -m rbp.apps.hyperopt.figures RUN_DIR``: redraw the figures (and the meta loss
    table) of a finished run from its ``results.json``, without running anything again (the
    t-SNE coordinates recorded there are reused)."""
    import argparse
    from types import SimpleNamespace

    from rbp.runner import read_json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    results = read_json(args.run_dir / "results.json")
    seed = int((results.get("config") or {}).get("seed", 0))
    paths = make_all(results, SimpleNamespace(seed=seed), args.run_dir)
    for key, value in paths.items():
        if key != "fig4_tsne_coordinates":
            print(value)


if __name__ == "__main__":
    main()
