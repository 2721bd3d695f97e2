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
