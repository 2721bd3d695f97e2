"""Figures of the associative-memory run, drawn from its results dict (``results.json``).

fig1_loss.png: L1 vs training step (mean over each epoch's images) and vs epoch for the
validation (log axes where the losses span a decade); fig2_retrieval.png: clean, corrupted
and each method's retrieved digits (binarised at 0.5); fig3_forward_trace.png:
``||h_t - h_{t-1}||`` of the last validation pass.

The figures read a run's results as written, or in the compact form of committed results
(``tools/compact_results.py``): per-epoch training means (``train_loss_by_epoch``) instead
of per-step losses, digits as strings of ``0``/``1``, retrieved digits already binarised
(``retrieved_binary``). Both give the same figures.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["epoch_means", "main", "make_figures", "sweep_summary", "train_curve"]


def epoch_means(losses: Sequence[float | None], n: int) -> tuple[list[int], list[float]]:
    """Mean of each complete block of ``n`` per-step losses, at the block's last step."""
    xs, ys = [], []
    for end in range(n, len(losses) + 1, n):
        block = [v for v in losses[end - n:end] if v is not None and math.isfinite(v)]
        if len(block) == n:
            xs.append(end)
            ys.append(float(np.mean(block)))
    return xs, ys


def train_curve(res: dict[str, Any], n: int) -> tuple[list[int], list[float]]:
    """Fig. 1's training curve of one method: the mean of each epoch's ``n`` per-step losses
    at the epoch's last step, plus the partial epoch up to a blow-up; read from the compact
    ``train_loss_by_epoch`` when the per-step ``train_loss`` is not there."""
    if "train_loss" not in res and "train_loss_by_epoch" in res:
        curve = res["train_loss_by_epoch"]
        return [int(x) for x in curve["step"]], [float(y) for y in curve["mean"]]
    xs, ys = epoch_means(res["train_loss"], n)
    if res.get("diverged_at") is not None:  # show the partial epoch up to the blow-up
        tail = [v for v in res["train_loss"][len(xs) * n:] if v is not None]
        if tail:
            xs, ys = [*xs, len(res["train_loss"])], [*ys, float(np.mean(tail))]
    return xs, ys


def _digit(row: Sequence[float] | str) -> np.ndarray:
    """A 28 x 28 digit from a list of pixel values or a compact string of ``0``/``1``."""
    if isinstance(row, str):
        return np.frombuffer(row.encode("ascii"), dtype=np.uint8).astype(float).reshape(
            28, 28) - ord("0")
    return np.asarray(row, float).reshape(28, 28)


def _label(name: str, res: dict[str, Any]) -> str:
    return name if res.get("diverged_at") is None else f"{name} (blew up @ {res['diverged_at']})"


def make_figures(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNGs for ``results`` (the dict ``run`` returns) into ``out_dir``."""
    from rbp.runner.plots import image_grid, multi_panel

    methods: dict[str, Any] = results["methods"]
    n = int(results["steps_per_epoch"])
    k = results.get("truncate")
    train = {}
    val = {}
    trace = {}
    for name, res in methods.items():
        label = _label(name, res)
        train[label] = train_curve(res, n)
        vals = [v if v is not None else math.nan for v in res["val_loss"]]
        val[label] = (list(res["val_epochs"]), vals)
        if res["forward_trace"]:
            last = res["forward_trace"][-1]
            trace[label] = (list(range(1, len(last) + 1)), last)
    suffix = f" (K = {k})" if k is not None else ""
    paths = [
        multi_panel(out_dir / "fig1_loss.png", [
            {"series": train, "xlabel": f"training step (mean over each epoch of {n})",
             "ylabel": "L1 loss", "title": f"training{suffix}", "logy": True},
            {"series": val, "xlabel": "epoch (0 = before training)",
             "ylabel": "L1 loss (corrupted input)", "title": f"validation{suffix}",
             "logy": True},
        ], ncols=2),
        multi_panel(out_dir / "fig3_forward_trace.png", [
            {"series": trace, "xlabel": "update $t$", "ylabel": r"$\|h_t - h_{t-1}\|$",
             "title": "forward trace, last validation", "logy": True},
        ], ncols=1),
    ]
    images = results["images"]
    rows = [("clean", [_digit(r) for r in images["clean"]]),
            ("corrupted", [_digit(r) for r in images["corrupted"]])]
    for name, res in methods.items():
        if res.get("retrieved") is not None:
            digits = [(_digit(r) > 0.5).astype(float) for r in res["retrieved"]]
        elif res.get("retrieved_binary") is not None:
            digits = [_digit(r) for r in res["retrieved_binary"]]
        else:
            continue
        rows.append((_label(name, res), digits))
    paths.append(image_grid(out_dir / "fig2_retrieval.png", rows,
                            title=f"retrieval from 50%-corrupted digits{suffix}", vmin=0.0,
                            vmax=1.0))
    return paths


def sweep_summary(agg: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """After ``rbp sweep``: merge the methods of each truncation into ``summary/truncate-K/``
    (``results.json`` plus the figures), as if one ``rbp hopfield`` run had trained them all."""
    from rbp.runner.sweep import point_name, write_merged_run

    dirs = []
    for group in agg["results"].values():
        first = agg["points"][group["points"][0]]["results"]
        merged = {k: v for k, v in first.items() if k not in ("methods", "status", "error")}
        merged["methods"] = group["methods"]
        out = write_merged_run(Path(sweep_dir) / "summary" / point_name(group["values"]),
                               agg["experiment"], merged, group["points"])
        make_figures(merged, out)
        dirs.append(out)
    return dirs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rbp.apps.hopfield.figures RUN_DIR``: redraw the figures of a run."""
    from rbp.runner import read_json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    for path in make_figures(read_json(args.run_dir / "results.json"), args.run_dir):
        print(path)


if __name__ == "__main__":
    main()
