"""Shrink the committed results of ``rbp hopfield`` / ``hyperopt`` / ``citation`` runs and figures.

    python tools/compact_results.py results/hopfield results/hyperopt results/table2
    python tools/compact_results.py --check --tracked results/hopfield results/hyperopt \
        results/table2

Every clone carries every version of ``results/``, so what is committed keeps what the README,
the docs, the report and the figure code read, in a compact form:

- every ``results.json`` of a Hopfield or hyperopt run (found recursively) is written without
  indentation, and the numbers inside arrays of 20 or more values (curves, snapshots) keep 4
  significant digits; scalars (the tables' numbers) are left as they are;
- Hopfield: the per-step training loss becomes its per-epoch means, exactly the curve Fig. 1
  draws (``train_loss_by_epoch``); digits become strings of ``0``/``1``; the retrieved digits
  are stored binarised at 0.5, as Fig. 2 shows them (``retrieved_binary``); of the per-epoch
  forward traces, every tenth and the last are kept (Fig. 3 draws the last);
- hyperopt: the weight snapshots of Fig. 4 are stored as float16 in base64;
- citation: the rounding alone (the layout stays as the runner wrote it; per-seed accuracies
  and every summary number are scalars or short arrays, left as they are);
- every PNG is re-encoded with a 256-colour palette (the plots have far fewer colours).

Runs that are not finished (``status`` other than ``finished`` or ``merged``) are left alone:
``--resume`` and the runner still write their ``results.json``.

The figure code reads both forms (``rbp.apps.hopfield.figures``,
``rbp.apps.hyperopt.figures``); a compacted file carries the key ``compacted`` saying what
was done. ``--check`` changes nothing and exits 1 if a file is not compact yet.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

#: Significant digits kept in arrays.
DIGITS = 4
#: Arrays with at least this many numbers are rounded.
MIN_ARRAY = 20
#: Every ``TRACE_EVERY``-th forward trace is kept, and the last.
TRACE_EVERY = 10

NOTE = {
    "hopfield": ("arrays of >= 20 numbers rounded to 4 significant digits; train_loss -> "
                 "train_loss_by_epoch (per-epoch means, Fig. 1's curve); retrieved -> "
                 "retrieved_binary (> 0.5, Fig. 2's digits); digits as 0/1 strings; "
                 "forward_trace: every 10th and the last (epochs in forward_trace_epochs)"),
    "hyperopt": ("arrays of >= 20 numbers rounded to 4 significant digits; trajectories as "
                 "float16 base64 (Fig. 4's t-SNE input)"),
    "citation": "arrays of >= 20 numbers (the per-epoch curves) rounded to 4 significant digits",
}


def _leaves(value: Any) -> int:
    if isinstance(value, list):
        return sum(_leaves(v) for v in value)
    return 1 if isinstance(value, float | int) and not isinstance(value, bool) else 0


def _round(value: Any, digits: int = DIGITS) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def round_arrays(value: Any) -> Any:
    """``value`` with every float inside an array of >= ``MIN_ARRAY`` numbers rounded."""
    if isinstance(value, dict):
        return {k: round_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        if _leaves(value) >= MIN_ARRAY:
            return _round(value)
        return [round_arrays(v) for v in value]
    return value


def _bits(row: Any) -> Any:
    """A digit of 0/1 pixels as a string of ``0``/``1`` (anything else is left alone)."""
    if isinstance(row, list) and row and all(v in (0, 1) for v in row):
        return "".join("1" if v else "0" for v in row)
    return row


def compact_hopfield(data: dict[str, Any]) -> dict[str, Any]:
    from rbp.apps.hopfield.figures import train_curve

    n = int(data["steps_per_epoch"])
    for res in data.get("methods", {}).values():
        if "train_loss" in res:
            xs, ys = train_curve(res, n)
            res["train_loss_by_epoch"] = {"step": xs, "mean": ys}
            del res["train_loss"]
        if res.get("retrieved") is not None:
            res["retrieved_binary"] = [
                "".join("1" if v > 0.5 else "0" for v in row) for row in res["retrieved"]]
            del res["retrieved"]
        traces = res.get("forward_trace") or []
        if traces and "forward_trace_epochs" not in res:
            keep = sorted({*range(0, len(traces), TRACE_EVERY), len(traces) - 1})
            epochs = res.get("val_epochs") or list(range(len(traces)))
            res["forward_trace"] = [traces[i] for i in keep]
            res["forward_trace_epochs"] = [epochs[i] if i < len(epochs) else None for i in keep]
    images = data.get("images")
    if isinstance(images, dict):
        data["images"] = {k: [_bits(r) for r in rows] for k, rows in images.items()}
    return data


def _pack(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return value
    arr = np.asarray(value, dtype="<f2")
    return {"float16_base64": base64.b64encode(arr.tobytes()).decode("ascii"),
            "shape": list(arr.shape)}


def compact_hyperopt(data: dict[str, Any]) -> dict[str, Any]:
    for unit in data.get("units", {}).values():
        trajs = unit.get("trajectories")
        if isinstance(trajs, dict):
            unit["trajectories"] = {k: _pack(v) for k, v in trajs.items()}
    return data


COMPACT = {"hopfield": compact_hopfield, "hyperopt": compact_hyperopt,
           "citation": lambda data: data}  # citation: the rounding alone, same layout
#: Statuses of results that no run will write again: a finished run, a sweep's merged summary.
FINAL = ("finished", "merged")


def compact_json(path: Path) -> bytes | None:
    """The compact bytes of ``path``, or None when it is not a run this tool compacts."""
    text = path.read_text()
    data = json.loads(text)
    exp = data.get("experiment") if isinstance(data, dict) else None
    if exp not in COMPACT or data.get("status") not in FINAL:
        return None  # not a run of ours, or one that may still be running or resumed
    if "compacted" not in data:
        data = round_arrays(COMPACT[exp](data))
        data["compacted"] = NOTE[exp]
    return (json.dumps(data, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def compact_png(path: Path) -> bytes | None:
    """``path`` re-encoded with a palette of 256 colours, or None when it already has one."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            return None
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                         dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pal.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _tracked(folder: Path) -> list[Path]:
    """The files under ``folder`` that git tracks."""
    import subprocess

    done = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=folder, check=False,
                          capture_output=True)
    if done.returncode != 0:
        why = (done.stderr.decode(errors="replace").strip().splitlines() or ["git failed"])[-1]
        raise SystemExit(f"compact_results: {folder} is not in a git checkout ({why}); leave "
                         "out --tracked there")
    return sorted(folder / name for name in done.stdout.decode().split("\0") if name)


def compact_file(path: Path) -> bytes | None:
    """The compact bytes of ``path`` (a ``results.json`` or a PNG), or None when it is not one
    this tool compacts or is compact already; a file that cannot be read as what its name says
    ends the tool in one line naming it, before anything is written."""
    try:
        if path.name == "results.json":
            return compact_json(path)
        return compact_png(path) if path.suffix == ".png" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"compact_results: {path} cannot be compacted ({type(exc).__name__}: "
                         f"{exc}); restore it (git checkout) or move it out of the folder, "
                         "then run again (nothing was written)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a file is not compact yet")
    parser.add_argument("--tracked", action="store_true",
                        help="only the files git tracks (the committed results)")
    args = parser.parse_args(argv)
    todo = []
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
        paths = _tracked(folder) if args.tracked else sorted(folder.rglob("*"))
        for path in paths:
            new = compact_file(path)
            if new is not None and new != path.read_bytes():
                todo.append((path, new))
    for path, new in todo:
        before = path.stat().st_size
        if args.check:
            print(f"not compact: {path} ({before} bytes)")
        else:
            path.write_bytes(new)
            print(f"{path}: {before} -> {len(new)} bytes")
    return 1 if args.check and todo else 0


if __name__ == "__main__":
    sys.exit(main())
