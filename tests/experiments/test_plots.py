"""Shared figure helpers: one colour per method, tidy axes, notes on coinciding curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from rbp.runner import plots


def test_one_colour_per_method_whatever_the_label() -> None:
    fixed = plots.METHOD_COLORS
    assert len(set(fixed.values())) == len(fixed)  # no two methods share a colour
    for label in ("neumann", "Neumann-RBP", "neumann (blew up @ 12)", "NEUMANN, K=10"):
        assert plots.method_color(label) == fixed["neumann"], label
    assert plots.method_color("CG-RBP") == fixed["cg"]
    assert plots.method_color("T30_K10_rbp") == fixed["rbp"]  # hyperopt unit tags
    assert plots.method_color("logistic regression") == fixed["logreg"]
    # other names: a stable colour, independent of order and of the other names drawn
    a = plots.method_colors(["hand-written loop", "TorchDEQ"])
    b = plots.method_colors(["TorchDEQ", "bptt", "hand-written loop"])
    assert a["TorchDEQ"] == b["TorchDEQ"] and a["hand-written loop"] == b["hand-written loop"]
    assert a["TorchDEQ"] not in fixed.values()


def _labels(ax: plt.Axes) -> list[str]:
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels() if t.get_text()]


def test_narrow_log_range_becomes_linear_with_plain_labels() -> None:
    fig, ax = plt.subplots()
    ys = [1.9251, 1.9262, 1.9270]
    ax.plot([0, 1, 2], ys)
    plots.style_axes(ax, [ys], logy=True)
    assert ax.get_yscale() == "linear"
    labels = _labels(ax)
    assert labels and not any("10^" in s or "e" in s.lower() or "times" in s for s in labels)
    plt.close(fig)


def test_wide_log_range_stays_log_with_plain_labels() -> None:
    fig, ax = plt.subplots()
    ys = [0.002, 0.05, 0.4]
    ax.plot([0, 1, 2], ys)
    plots.style_axes(ax, [ys], logy=True)
    assert ax.get_yscale() == "log"
    labels = _labels(ax)
    assert "0.01" in labels and "0.1" in labels and not any("10^" in s for s in labels)
    plt.close(fig)


def test_integer_ticks_for_step_counts() -> None:
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3, 4, 5], [3, 1, 4, 1, 5])
    plots.style_axes(ax, integer_x=True)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


def test_coinciding_curves_are_found_and_noted() -> None:
    x = list(range(10))
    base = np.linspace(1.0, 0.1, 10)
    series = {"bptt": (x, base), "neumann": (x, base + 1e-6), "rbp": (x, base * 2),
              "cg": (x, base.copy()), "gmres": (x, base + 0.02)}  # 2 % of the range: visible
    assert plots.coinciding(series) == [["bptt", "neumann", "cg"]]
    assert plots.coinciding({"a": (x, base), "b": (x[::-1], base)}) == []  # other xs
    # on a log axis the comparison is in log space: tiny values that differ 2x do not coincide
    tiny = {"a": (x, np.full(10, 1e-6)), "b": (x, np.full(10, 2e-6)), "c": (x, base * 100)}
    assert plots.coinciding(tiny) == [["a", "b"]]
    assert plots.coinciding(tiny, log=True) == []

    fig, ax = plt.subplots()
    lines = {n: ax.plot(xs, ys)[0] for n, (xs, ys) in series.items()}
    notes = plots.note_coinciding(ax, series, lines)
    assert notes == ["bptt, neumann and cg coincide"]
    assert any(t.get_text() == notes[0] for t in ax.texts)
    assert lines["bptt"].get_linestyle() == "-" and lines["neumann"].get_linestyle() != "-"
    plt.close(fig)


def test_multi_panel_writes_png_with_notes(tmp_path: Path) -> None:
    x = [0, 1, 2, 3]
    path = plots.multi_panel(tmp_path / "f.png", [
        {"series": {"bptt": (x, [1.0, 0.5, 0.2, 0.1]), "tbptt": (x, [1.0, 0.5, 0.2, 0.1])},
         "logy": True, "title": "same"},
        {"series": {"rbp": (x, [1.0, 2.0, np.nan, 4.0])}, "logy": True},
    ])
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("values", [[], [np.nan, np.nan], [0.0, 0.0], [-1.0, 1.0]])
def test_style_axes_survives_degenerate_data(values: list[float]) -> None:
    fig, ax = plt.subplots()
    ax.plot(range(len(values)), values)
    plots.style_axes(ax, [values], logy=True, integer_x=True)
    assert ax.get_yscale() == "linear"
    fig.canvas.draw()
    plt.close(fig)


@pytest.mark.parametrize(("ys", "style"), [
    ([5e3, 1.0, 1e-3, 2e-5], "power"),        # Hopfield's forward trace: 10^4 .. 10^-5
    ([2e5, 30.0, 0.5], "power"),
    ([0.002, 0.05, 0.4, 80.0], "plain"),
])
def test_a_log_axis_keeps_one_tick_style(ys: list[float], style: str) -> None:
    fig, ax = plt.subplots()
    ax.plot(range(len(ys)), ys)
    plots.style_axes(ax, [ys], logy=True)
    labels = _labels(ax)
    powers = ["10^" in s for s in labels]
    assert labels and all(powers) if style == "power" else not any(powers), labels
    plt.close(fig)


def test_grid_columns_leave_the_fewest_empty_cells() -> None:
    assert [plots.grid_columns(n) for n in (1, 2, 4, 5, 6, 7, 8, 9)] == [1, 2, 4, 3, 3, 4, 4, 3]


def _capture(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list:
    figs: list = []

    def keep(fig, path):
        figs.append(fig)
        return Path(path)

    monkeypatch.setattr(module, name, keep)
    return figs


def test_multi_panel_puts_one_legend_in_a_spare_cell(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    figs = _capture(monkeypatch, plots, "save_figure")
    series = {"bptt": ([1, 2, 3], [3.0, 2.0, 1.0]), "rbp": ([1, 2, 3], [3.0, 2.5, 2.0])}
    plots.multi_panel(tmp_path / "f.png", [{"series": series}] * 5, ncols=None)
    (fig,) = figs
    axes = fig.axes
    assert len(axes) == 6 and sum(ax.axison for ax in axes) == 5  # 2 x 3, one spare
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    assert len(legends) == 1 and not axes[5].axison  # in the spare cell only
    assert [t.get_text() for t in legends[0].get_texts()] == ["bptt", "rbp"]
    colours = [h.get_color() for h in legends[0].legend_handles]
    assert colours == [plots.method_color("bptt"), plots.method_color("rbp")]
    plt.close(fig)


def _hyperopt_units() -> dict:
    rng = np.random.default_rng(0)
    units = {}
    for m in ("tbptt", "neumann"):
        units[f"T30_K10_{m}"] = {
            "train_steps": 30, "truncate": 10, "method": m, "meta_loss": [1.0, 0.9, 0.8],
            "inner_loss_last": [2.0, 1.5, 1.2, 1.0],
            "learning_rate": np.exp(rng.normal(size=(3, 8)) * 0.1).tolist(),
            "momentum": (0.5 + 0.1 * rng.random((3, 8))).tolist(),
            "trajectories": {"2": rng.normal(size=(12, 5)).tolist()}}
    return units


def test_hyperparameter_figure_has_y_labels_and_one_legend_for_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbp.apps.hyperopt import figures

    figs = _capture(monkeypatch, plots, "_save")
    figures.fig_hyper(_hyperopt_units(), tmp_path)
    (fig,) = figs
    assert [ax.get_ylabel() for ax in fig.axes] == ["learning rate", "momentum"] * 2
    assert all(ax.get_legend() is None for ax in fig.axes)  # not in one panel of four
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["W1", "b1", "W2", "b2", "W3", "b3",
                                                         "W4", "b4"]
    plt.close(fig)


def test_tsne_legend_markers_have_the_methods_colours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    from matplotlib.colors import to_hex

    from rbp.apps.hyperopt import figures

    figs = _capture(monkeypatch, plots, "_save")
    figures.fig4(_hyperopt_units(), tmp_path / "f.png", seed=0)
    (fig,) = figs
    legend = fig.axes[0].get_legend()
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        colour = plots.method_color(text.get_text())
        assert to_hex(handle.get_markerfacecolor()) == colour
        # the method's points are drawn in its colour (light to full), not a colour map
        (points,) = [c for c in fig.axes[0].collections
                     if to_hex(c.get_edgecolor()[0]) == colour]
        assert to_hex(points.get_facecolor()[-1]) == colour
    plt.close(fig)


def test_hyperopt_figures_redraw_from_results_without_running_tsne_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rbp.apps.hyperopt import figures
    from rbp.runner import read_json, write_json

    units = _hyperopt_units()
    coords = {"2": {m: np.random.default_rng(1).normal(size=(12, 2)).tolist()
                    for m in ("tbptt", "neumann")}}
    units["T30_K10_neumann"]["final_meta_loss"] = 0.8
    units["T30_K10_tbptt"]["final_meta_loss"] = 0.85
    write_json(tmp_path / "results.json", {
        "units": units, "config": {"seed": 0},
        "figures": {"fig4_tsne_coordinates": coords}})

    def no_tsne(*args: object) -> None:
        raise AssertionError("t-SNE ran again")

    monkeypatch.setattr(figures, "tsne_embed", no_tsne)
    figures.main([str(tmp_path)])
    for name in ("fig4_tsne.png", "fig5_meta_loss.png", "fig6_last_training_loss.png",
                 "hyperparams_T30_K10.png", "meta_loss.md", "meta_loss.table.json"):
        assert (tmp_path / name).stat().st_size > 100, name
    table = read_json(tmp_path / "meta_loss.table.json")
    assert table["columns"] == ["(T, K)", "meta steps", "tbptt", "neumann", "first meta step"]
    assert table["rows"] == [["(30, 10)", "3", "0.8500", "0.8000", "1.0000"]]
