"""Figure helpers (headless Agg backend) with one colour per method across all figures."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

__all__ = ["METHOD_COLORS", "image_grid", "line_plot", "method_colors", "multi_panel"]

DPI = 120
_TAB10 = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]

#: Fixed colour of each gradient method, identical in every figure.
METHOD_COLORS: dict[str, str] = {
    "bptt": _TAB10[0],
    "tbptt": _TAB10[1],
    "rbp": _TAB10[2],
    "cg": _TAB10[3],
    "neumann": _TAB10[4],
    "gmres": _TAB10[5],
}

Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def method_colors(names: Iterable[str]) -> dict[str, str]:
    """Colour for each name: the fixed method colour (case-insensitive), else the next
    tab10 colour not used by a fixed method, cycling, in order of first appearance."""
    spare = [c for c in _TAB10 if c not in METHOD_COLORS.values()]
    colors: dict[str, str] = {}
    n_other = 0
    for name in names:
        if name in colors:
            continue
        fixed = METHOD_COLORS.get(name.lower())
        if fixed is None:
            fixed = spare[n_other % len(spare)]
            n_other += 1
        colors[name] = fixed
    return colors


def _draw_lines(
    ax: Any, series: Series, colors: dict[str, str], xlabel: str, ylabel: str, title: str,
    logy: bool,
) -> None:
    for name, (xs, ys) in series.items():
        ax.plot(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), label=name,
                color=colors[name], linewidth=1.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def line_plot(
    path: Path, series: Series, xlabel: str = "", ylabel: str = "", title: str = "",
    logy: bool = False,
) -> Path:
    """One axes with a line per ``name -> (xs, ys)``; saved as PNG at ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_lines(ax, series, method_colors(series), xlabel, ylabel, title, logy)
    return _save(fig, path)


def multi_panel(path: Path, panels: Sequence[dict[str, Any]], ncols: int = 2) -> Path:
    """A grid of line plots; each panel dict has ``series`` and optionally ``xlabel``,
    ``ylabel``, ``title`` and ``logy``. Colours are shared across panels."""
    ncols = max(1, min(ncols, len(panels) or 1))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    colors = method_colors(name for p in panels for name in p["series"])
    flat = axes.ravel()
    for ax, panel in zip(flat, panels, strict=False):
        _draw_lines(ax, panel["series"], colors, panel.get("xlabel", ""),
                    panel.get("ylabel", ""), panel.get("title", ""), panel.get("logy", False))
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def image_grid(
    path: Path, rows: Sequence[tuple[str, Sequence[Any]]], title: str = "",
    vmin: float | None = None, vmax: float | None = None,
) -> Path:
    """Grayscale 2-D images, one labelled row per ``(label, images)`` entry, without ticks."""
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
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
