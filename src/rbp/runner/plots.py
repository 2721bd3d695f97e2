"""Figure helpers (headless Agg backend) shared by every figure of the project.

One colour per method everywhere (:data:`METHOD_COLORS`, :func:`method_color`); axes tidied by
:func:`style_axes` (a log axis only where the data span a decade or more, plain tick labels,
integer ticks for step counts); :func:`note_coinciding` says on the figure which curves lie on
top of one another, and draws the hidden ones dashed so they stay visible.
"""

from __future__ import annotations

import math
import re
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    ScalarFormatter,
)

__all__ = [
    "METHOD_COLORS",
    "coinciding",
    "grid_columns",
    "image_grid",
    "line_plot",
    "log_tick_formatter",
    "method_color",
    "method_colors",
    "multi_panel",
    "note_coinciding",
    "save_figure",
    "style_axes",
]

DPI = 120
_TAB10 = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
_TAB20 = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]

#: Fixed colour of each gradient method and baseline, identical in every figure.
METHOD_COLORS: dict[str, str] = {
    "bptt": _TAB10[0],      # blue
    "tbptt": _TAB10[1],     # orange
    "rbp": _TAB10[2],       # green
    "cg": _TAB10[3],        # red
    "neumann": _TAB10[4],   # purple
    "gmres": _TAB10[5],     # brown
    "jfb": _TAB10[6],       # pink
    "phantom": _TAB10[8],   # olive
    "logreg": _TAB10[7],    # grey
    "gcn": _TAB10[9],       # cyan
    "initial": "#000000",
}

# Display names and long forms that mean one of the keys above.
_ALIASES: dict[str, str] = {
    "cg-rbp": "cg", "neumann-rbp": "neumann", "gmres-rbp": "gmres", "original rbp": "rbp",
    "truncated bptt": "tbptt", "logistic regression": "logreg", "baseline": "logreg",
}
_SPARE = [c for c in _TAB20 if c not in METHOD_COLORS.values()]

Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def _method_key(name: str) -> str:
    """``"Neumann-RBP (blew up @ 12)"`` -> ``"neumann"``: lower case, without a trailing
    parenthesis or ``", ..."`` part, aliases resolved; else the last ``_``/space-separated
    word that names a method (``"T30_K10_rbp"`` -> ``"rbp"``)."""
    key = name.strip().lower().split(" (", 1)[0].split(",", 1)[0].strip()
    key = _ALIASES.get(key, key)
    if key in METHOD_COLORS:
        return key
    words = [_ALIASES.get(w, w) for w in re.split(r"[\s_/:=]+", key)]
    known = [w for w in words if w in METHOD_COLORS]
    return known[-1] if known else key


def method_color(name: str) -> str:
    """The colour of ``name`` in every figure: the fixed colour of its method (matched as
    :func:`_method_key` says), else a spare colour chosen by a stable hash of the name, so
    one name never changes colour between figures or runs."""
    key = _method_key(name)
    fixed = METHOD_COLORS.get(key)
    if fixed is not None:
        return fixed
    return _SPARE[zlib.crc32(key.encode()) % len(_SPARE)]


def method_colors(names: Iterable[str]) -> dict[str, str]:
    """``{name: method_color(name)}`` for each name."""
    return {name: method_color(name) for name in names}


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    return arr[np.isfinite(arr)]


def _power(value: float, _pos: int | None = None) -> str:
    """Tick label as a power of ten (``10^{-4}``, ``2\\times10^{3}``)."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"${mantissa}\\times10^{{{int(exponent)}}}$" if mantissa != "1" else \
        f"$10^{{{int(exponent)}}}$"


def _plain(value: float, _pos: int | None = None) -> str:
    """Tick label without scientific notation for 1e-3 <= |v| < 1e5 (``0.02``, ``1500``),
    a power of ten beyond."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.6g}"
    return _power(value)


def log_tick_formatter(lo: float, hi: float) -> Any:
    """One tick style for a whole log axis over ``lo .. hi`` (positive): plain numbers when
    every decade tick in the range lies in ``1e-3 .. 1e4`` (``0.01``, ``1000``), else powers
    of ten for every tick, never a mix of both on one axis."""
    first = 10.0 ** math.floor(math.log10(lo))
    last = 10.0 ** math.ceil(math.log10(hi))
    return FuncFormatter(_plain if first >= 1e-3 and last <= 1e4 else _power)


def style_axes(ax: Any, ys: Iterable[Sequence[float]] = (), logy: bool = False,
               integer_x: bool = False) -> None:
    """Tidy one axes after its lines are drawn.

    ``logy``: a log y axis only when the positive data ``ys`` span at least one decade
    (``max/min >= 10``); otherwise linear, since a log axis over a narrow range has no
    decade ticks and labels like ``1.925x10^0``. Log ticks at 1, 2, 5 x 10^k (1 x 10^k
    beyond four decades) with plain labels; linear ticks without offset or exponent.
    ``integer_x``: ticks at integers only (epochs, steps).
    """
    positive = np.concatenate([_finite(y) for y in ys] or [np.array([])])
    positive = positive[positive > 0]
    span = positive.max() / positive.min() if positive.size else 1.0
    if logy and span >= 10:
        ax.set_yscale("log")
        subs = (1.0,) if span > 1e4 else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(log_tick_formatter(positive.min(), positive.max()))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        ax.yaxis.set_major_formatter(formatter)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def coinciding(series: Series, rel_tol: float = 5e-3, log: bool = False) -> list[list[str]]:
    """Groups (two or more names) of curves that would hide each other: same x values and
    ``max |y_a - y_b| <= rel_tol * (y range of all curves)`` (NaNs must match too), with
    ``y`` replaced by ``log10 y`` for a log axis (``log``)."""
    names = [n for n, (xs, ys) in series.items() if len(xs)]
    arrays = {}
    for n in names:
        y = np.asarray(series[n][1], float)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        arrays[n] = (np.asarray(series[n][0], float), y)
    every = np.concatenate([_finite(y) for _, y in arrays.values()] or [np.array([])])
    scale = float(every.max() - every.min()) if every.size else 0.0
    tol = rel_tol * scale if scale > 0 else 1e-12
    groups: list[list[str]] = []
    placed: set[str] = set()
    for i, a in enumerate(names):
        if a in placed:
            continue
        group = [a]
        xa, ya = arrays[a]
        for b in names[i + 1:]:
            xb, yb = arrays[b]
            if b in placed or xa.shape != xb.shape or not np.array_equal(xa, xb):
                continue
            nan_a, nan_b = np.isnan(ya), np.isnan(yb)
            if np.array_equal(nan_a, nan_b) and (
                    nan_a.all() or np.max(np.abs(ya[~nan_a] - yb[~nan_b])) <= tol):
                group.append(b)
        if len(group) > 1:
            placed.update(group)
            groups.append(group)
    return groups


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def note_coinciding(ax: Any, series: Series, lines: dict[str, Any] | None = None,
                    below: bool = False) -> list[str]:
    """Write ``"X and Y coincide"`` in the axes (``below``: under them, where it covers no
    curve) for each group of :func:`coinciding` curves (compared as drawn: in log space on a
    log axis) and draw all but the first of a group dashed (``lines``: name -> Line2D). Call
    after :func:`style_axes`. Returns the notes."""
    groups = coinciding(series, log=ax.get_yscale() == "log")
    notes = [f"{_join(group)} coincide" for group in groups]
    for group in groups:
        for k, name in enumerate(group[1:], start=1):
            if lines and name in lines:
                lines[name].set_linestyle((0, (4, 2 + 2 * k)))
    if notes:
        # wrapped so a long note stays inside its own axes
        text = "\n".join(textwrap.fill(note, width=40 if not below else 70) for note in notes)
        if below:
            ax.annotate(text, (0.0, 0.0), xytext=(0, -34), xycoords="axes fraction",
                        textcoords="offset points", fontsize="small", va="top", ha="left",
                        style="italic")
            return notes
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize="small",
                va="bottom", ha="left", style="italic",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8,
                      "edgecolor": "0.8"})
    return notes


def _integer_valued(series: Series) -> bool:
    xs = [_finite(x) for x, _ in series.values()]
    return bool(xs) and all(np.array_equal(x, np.round(x)) for x in xs)


def _draw_lines(
    ax: Any, series: Series, xlabel: str, ylabel: str, title: str, logy: bool,
    legend: bool = True,
) -> None:
    lines = {}
    for name, (xs, ys) in series.items():
        (lines[name],) = ax.plot(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float),
                                 label=name, color=method_color(name), linewidth=1.5)
    style_axes(ax, [ys for _, ys in series.values()], logy=logy,
               integer_x=_integer_valued(series))
    note_coinciding(ax, series, lines)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series and legend:
        ax.legend(fontsize="small")


def grid_columns(n: int, max_cols: int = 4) -> int:
    """Columns for ``n`` panels: the fewest empty cells, then the fewest rows (5 panels: 3
    columns, one cell spare; 8: 4 columns)."""
    if n <= max_cols:
        return max(1, n)
    return min(range(2, max_cols + 1), key=lambda c: (-n % c, math.ceil(n / c)))


def save_figure(fig: Any, path: Path) -> Path:
    """Save as PNG with everything inside the image (``bbox_inches="tight"``) and close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


_save = save_figure  # the name the application figures used before


def line_plot(
    path: Path, series: Series, xlabel: str = "", ylabel: str = "", title: str = "",
    logy: bool = False,
) -> Path:
    """One axes with a line per ``name -> (xs, ys)``; saved as PNG at ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_lines(ax, series, xlabel, ylabel, title, logy)
    return save_figure(fig, path)


def multi_panel(path: Path, panels: Sequence[dict[str, Any]], ncols: int | None = 2) -> Path:
    """A grid of line plots; each panel dict has ``series`` and optionally ``xlabel``,
    ``ylabel``, ``title`` and ``logy``. ``ncols=None``: :func:`grid_columns`. When the grid
    has spare cells and every panel shows the same names, one legend fills the first spare
    cell instead of a legend in every panel."""
    ncols = grid_columns(len(panels)) if ncols is None else ncols
    ncols = max(1, min(ncols, len(panels) or 1))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()
    names = [list(panel["series"]) for panel in panels]
    shared = len(flat) > len(panels) and bool(names) and bool(names[0]) and \
        all(n == names[0] for n in names)
    for ax, panel in zip(flat, panels, strict=False):
        _draw_lines(ax, panel["series"], panel.get("xlabel", ""), panel.get("ylabel", ""),
                    panel.get("title", ""), panel.get("logy", False), legend=not shared)
    for ax in flat[len(panels):]:
        ax.axis("off")
    if shared:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=method_color(n), linewidth=2) for n in names[0]]
        flat[len(panels)].legend(handles, names[0], loc="center", title="method",
                                 frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(
    path: Path, rows: Sequence[tuple[str, Sequence[Any]]], title: str = "",
    vmin: float | None = None, vmax: float | None = None,
) -> Path:
    """Grayscale 2-D images, one labelled row per ``(label, images)`` entry, without ticks;
    a label naming a method is written in that method's colour."""
    nrows = max(1, len(rows))
    ncols = max([1, *(len(images) for _, images in rows)])
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols + 1, 1.3 * nrows + 0.4),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            img = images[c]
            if hasattr(img, "detach"):
                img = img.detach().cpu().numpy()
            ax.imshow(np.asarray(img, dtype=float), cmap="gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
        known = _method_key(label) in METHOD_COLORS
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center",
                              color=method_color(label) if known else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
