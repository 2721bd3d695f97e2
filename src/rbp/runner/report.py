"""``rbp report``: one self-contained HTML page of the finished runs under some directories.

Every directory holding a ``results.json`` is a run; its ``experiment`` key says which. For each
run the page shows its status, wall time and command, a table of the per-method metrics found
in ``results["methods"]`` (the scalar entries), the other scalar results, every table stored as
data (``*.table.json``, :mod:`rbp.runner.tables`), every other Markdown file of the run
directory, every figure (PNG, JPEG, SVG, GIF embedded as base64 ``data:`` URIs), its settings
and the machine it ran on. A sweep directory (``sweep.json``) gets a table of its points and
each method's metrics as mean ± std over seeds (:mod:`rbp.runner.stats`). The page is rendered
by the Jinja2 template ``templates/report.html.j2`` from plain data; nothing is fetched from
elsewhere, so it can be mailed or archived as one file. A results file that cannot be read is
named on stderr and in the page, never skipped silently.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from rbp.data.atomic import atomic_write
from rbp.runner.aggregate import SWEEP_FILE, aggregate, summarize
from rbp.runner.results import CHECKPOINT_DIR, RESULTS_FILE, read_json
from rbp.runner.stats import MeanStd
from rbp.runner.tables import TABLE_SUFFIX, Table, read_table

__all__ = ["UNFINISHED_STATUS", "Report", "Run", "add_arguments", "build_report", "find_runs",
           "label", "markdown_to_html", "run_command", "write_report"]

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".svg": "image/svg+xml"}
_META_KEYS = ("experiment", "status", "error", "wall_time_s", "started_at", "resumed", "quick",
              "command", "rbp_version", "config", "machine")
_KNOWN_STATUS = ("finished", "merged", "failed", "killed", "incomplete", "running",
                 "interrupted", "pending")
#: Statuses of runs that have not (or not yet) produced their results: left out of the page
#: unless ``--include-unfinished``. Every other status is shown: ``finished``, ``merged``
#: (combined from finished runs) and a results file without a status (a benchmark's).
UNFINISHED_STATUS = ("running", "interrupted", "failed", "killed", "pending", "incomplete")
#: Readable column names of keys the applications use; other keys: underscores -> spaces.
_LABELS = {
    "final_train_l1_epoch": "train L1 (last epoch)", "final_val_l1": "val L1 raw",
    "final_val_l1_binary": "val L1 binarised", "untrained_val_l1": "untrained val L1",
    "untrained_val_l1_binary": "untrained val L1 binarised",
    "backward_status": "backward statuses", "first_bad_backward": "first bad backward",
    "wall_time_s": "wall time (s)", "median_meta_step_s": "median meta step (s)",
    "train_steps": "T (inner steps)", "truncate": "K (truncation)",
}
#: A per-method table with more columns than this is shown transposed (metrics as rows).
_MAX_COLUMNS = 7
_MAX_FIGURE_BYTES = 20_000_000


@dataclass
class Run:
    """One directory found by :func:`find_runs`: a run (``results.json``) or a sweep."""

    path: Path
    kind: str  # "run" or "sweep"
    data: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)  # Markdown files
    data_tables: list[Path] = field(default_factory=list)  # *.table.json

    @property
    def experiment(self) -> str:
        """The ``experiment`` key (the directory's name when missing)."""
        return str(self.data.get("experiment") or self.path.name or "?")

    @property
    def status(self) -> str:
        """The run's ``status`` (``"—"`` when missing: not written by a run's lifecycle)."""
        return str(self.data.get("status") or "—")

    @property
    def unfinished(self) -> bool:
        """True for a run that has not produced its results (see :data:`UNFINISHED_STATUS`)."""
        return self.kind == "run" and self.status in UNFINISHED_STATUS


def _own_files(run_dir: Path) -> Iterable[Path]:
    """Files of ``run_dir`` and its sub-directories, leaving out checkpoints and nested runs."""
    stack = [run_dir]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir():
                nested = (entry / RESULTS_FILE).is_file() or (entry / SWEEP_FILE).is_file()
                if entry.name != CHECKPOINT_DIR and not entry.name.startswith(".") and not nested:
                    stack.append(entry)
            elif entry.is_file() and not entry.name.startswith("."):
                yield entry


def _started_at(data: Mapping[str, Any]) -> float | None:
    """The POSIX time at which the run (its last session) started, if recorded."""
    try:
        return datetime.fromisoformat(str(data["started_at"])).timestamp()
    except (KeyError, ValueError, TypeError):
        return None


def find_runs(roots: Sequence[Path],
              unreadable: list[tuple[Path, str]] | None = None) -> list[Run]:
    """Every run and sweep directory at or below ``roots``, in path order.

    A ``results.json`` or ``sweep.json`` that is not a readable JSON mapping is left out and
    appended to ``unreadable`` as ``(path, reason)``.
    """
    seen: set[Path] = set()
    runs: list[Run] = []
    candidates: list[tuple[Path, str]] = []
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name in (RESULTS_FILE, SWEEP_FILE):
            root = root.parent
        for name, kind in ((RESULTS_FILE, "run"), (SWEEP_FILE, "sweep")):
            if (root / name).is_file():
                candidates.append((root / name, kind))
            candidates += [(p, kind) for p in sorted(root.rglob(name))
                           if CHECKPOINT_DIR not in p.relative_to(root).parts]
    for path, kind in candidates:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            if unreadable is not None:
                unreadable.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        if not isinstance(data, dict):
            if unreadable is not None:
                unreadable.append((path, f"holds a JSON {type(data).__name__}, not a mapping"))
            continue
        run = Run(path=path.parent, kind=kind, data=data)
        if kind == "sweep" and (path.parent / RESULTS_FILE).is_file():
            continue  # a run directory that also holds a sweep file: shown as a run
        files = list(_own_files(path.parent))
        stems = {f.name[: -len(TABLE_SUFFIX)] for f in files if f.name.endswith(TABLE_SUFFIX)}
        started = _started_at(data)
        for f in files:
            if f.name.endswith(TABLE_SUFFIX):
                run.data_tables.append(f)
            elif f.suffix.lower() in _IMAGE_TYPES:
                stat = f.stat()
                # a figure older than the run is another run's (left by --force): not this one's
                fresh = started is None or stat.st_mtime >= started - 2.0
                if stat.st_size <= _MAX_FIGURE_BYTES and fresh:
                    run.figures.append(f)
            elif f.suffix.lower() == ".md" and f.stem not in stems:  # no data twin
                run.tables.append(f)
        runs.append(run)
    runs.sort(key=lambda r: (r.kind != "sweep", r.experiment, str(r.path)))
    return runs


# ---------------------------------------------------------------- Markdown


def markdown_to_html(text: str) -> str:
    """Markdown (pipe tables with ``:--:`` alignment, fenced code, lists, emphasis) as HTML by
    Python-Markdown, with raw HTML in ``text`` escaped, not passed through (a results folder
    may come from anyone) and headings shifted below the page's own (``#`` is ``<h3>``)."""
    import markdown  # the experiments extra; loaded when a page is written
    from markdown.extensions.toc import TocExtension

    md = markdown.Markdown(extensions=["tables", "fenced_code",
                                       TocExtension(baselevel=3, anchorlink=False)])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md.convert(text)


# ---------------------------------------------------------------- page data


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def label(key: str) -> str:
    """A readable column name for a results key (``final_val_l1`` -> ``val L1 raw``,
    ``grad_norm`` -> ``grad norm``, ``time_s`` -> ``time (s)``)."""
    if key in _LABELS:
        return _LABELS[key]
    words = [w for w in str(key).split("_") if w]
    unit = " (s)" if len(words) > 1 and words[-1] == "s" else ""
    words = words[:-1] if unit else words
    words = [w.upper() if re.fullmatch(r"l\d|[a-z]\d+", w) else w for w in words]
    return " ".join(words) + unit if words else str(key)


def _counts(value: Any) -> str | None:
    """A small mapping of counts (``{"max_iter": 10000}``) as ``max_iter × 10000``; an empty
    one as ``—``; None for anything else."""
    if not isinstance(value, Mapping) or len(value) > 6:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return None
    return ", ".join(f"{k} × {v}" for k, v in value.items()) or "—"


def _cell_value(value: Any) -> Any:
    counts = _counts(value)
    return counts if counts is not None else value


def _cell(value: Any) -> dict[str, Any]:
    return {"text": _fmt(value),
            "num": isinstance(value, (int, float)) and not isinstance(value, bool)}


def _data_table(columns: list[str], rows: list[list[Any]], title: str = "",
                cls: str = "metrics", align: Sequence[str] = (), notes: str = "") -> dict[str, Any]:
    """A table for the template: cells as ``{"text", "num"}``, ``align`` per column."""
    return {"title": title, "cls": cls, "columns": columns, "notes": notes,
            "align": [*align, *[""] * (len(columns) - len(align))],
            "rows": [[_cell(v) for v in row] for row in rows]}


def _metrics(methods: Mapping[str, Any], title: str, what: str = "method"
             ) -> dict[str, Any] | None:
    """Rows: methods (``what``); columns: the scalar entries of their result dicts (and small
    mappings of counts), with readable names. A table wider than :data:`_MAX_COLUMNS` with
    fewer rows than columns is transposed (metrics as rows) so that it fits the page."""
    columns: list[str] = []
    for result in methods.values():
        if isinstance(result, Mapping):
            columns += [k for k, v in result.items()
                        if (_is_scalar(v) or _counts(v) not in (None, "—"))
                        and k not in columns]
    entries = [r if isinstance(r, Mapping) else {} for r in methods.values()]
    columns = [c for c in columns if any(r.get(c) is not None for r in entries)]  # not all —
    if not columns:
        return None
    rows = [[m, *(_cell_value(r.get(c)) for c in columns)] for m, r in zip(methods, entries,
                                                                         strict=True)]
    if len(columns) + 1 > _MAX_COLUMNS and len(rows) < len(columns):
        names = [str(m) for m in methods]
        return _data_table(["", *names],
                           [[label(c), *(row[i + 1] for row in rows)]
                            for i, c in enumerate(columns)], title)
    return _data_table([what, *(label(c) for c in columns)], rows, title)


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _common(run: Run, i: int) -> dict[str, Any]:
    """What every section has: heading data, data tables, Markdown files and figures."""
    tables = []
    for path in run.data_tables:
        try:
            t: Table = read_table(path)
        except ValueError as exc:
            tables.append(_data_table(["problem"], [[str(exc)]], _rel(path, run.path)))
            continue
        tables.append(_data_table(t.columns, t.rows, t.title or _rel(path, run.path), "md",
                             t.align, t.notes))
    return {
        "anchor": f"run-{i}-" + re.sub(r"[^A-Za-z0-9_-]", "-", run.experiment),
        "kind": run.kind, "experiment": run.experiment, "path": _shown(run.path),
        "status": run.status, "tables": tables, "points": None, "extra": [], "details": [],
        "markdown": [(_rel(md, run.path), markdown_to_html(md.read_text(errors="replace")))
                     for md in run.tables],
        "figures": [{"name": _rel(f, run.path), "mime": _IMAGE_TYPES[f.suffix.lower()],
                     "data": base64.b64encode(f.read_bytes()).decode("ascii")}
                    for f in run.figures],
    }


def _run_section(run: Run, i: int) -> dict[str, Any]:
    d, s = run.data, _common(run, i)
    meta = [(k, _fmt(d[k])) for k in ("wall_time_s", "started_at", "quick", "resumed",
                                      "rbp_version") if k in d]
    if isinstance(d.get("command"), list):
        meta.append(("command", " ".join(str(c) for c in d["command"])))
    if d.get("error"):
        meta.append(("error", _fmt(d["error"])))
    s["meta"] = meta
    per = [_metrics(d[key], f"Results per {what}", what)
           for key, what in (("methods", "method"), ("units", "unit"))
           if isinstance(d.get(key), Mapping)]
    s["tables"] = [*(t for t in per if t), *s["tables"]]
    s["extra"] = [(label(k), _fmt(v)) for k, v in d.items()
                  if k not in _META_KEYS and k not in ("methods", "units") and _is_scalar(v)]
    s["details"] = [(name, [(k, _fmt(v)) for k, v in d[key].items()])
                    for name, key in (("Settings", "config"), ("Machine", "machine"))
                    if isinstance(d.get(key), Mapping)]
    return s


def _sweep_section(run: Run, i: int) -> dict[str, Any]:
    d, s = run.data, _common(run, i)
    s["meta"] = [(k, _fmt(d.get(k))) for k in ("wall_time_s", "backend", "grid", "fixed",
                                               "counts")]
    s["points"] = _data_table(["point", "status", "wall time (s)", "action", "error"],
                         [[p.get("name"), str(p.get("status")), p.get("wall_time_s"),
                           p.get("action", ""), p.get("error") or ""]
                          for p in d.get("points", [])], cls="points")
    try:
        stats = summarize(aggregate(run.path), over="seed")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"could not aggregate the points: {exc}"
        s["tables"].insert(0, _data_table(["problem"], [[problem]]))
        return s
    for label, methods in reversed(stats.items()):
        table = {m: {k: MeanStd(**v).format() for k, v in metrics.items()}
                 for m, metrics in methods.items()}
        s["tables"].insert(0, _metrics(table, f"{label}: mean ± std over seeds"))
    return s


def _template() -> Any:
    try:
        import jinja2
    except ModuleNotFoundError as exc:  # jinja2 comes with torch; the extra names it too
        raise ModuleNotFoundError("rbp report needs jinja2: pip install 'torch-rbp[experiments]'"
                                  ) from exc
    env = jinja2.Environment(loader=jinja2.PackageLoader("rbp.runner", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")


def build_report(runs: Sequence[Run], title: str = "rbp report", skipped: Sequence[Run] = (),
                 unreadable: Sequence[tuple[Path, str]] = ()) -> str:
    """The HTML page (a string) for ``runs``; ``skipped`` (unfinished runs) and
    ``unreadable`` results files are listed at the end."""
    return _template().render(
        title=title, generated=datetime.now(UTC).isoformat(timespec="seconds"),
        known_status=_KNOWN_STATUS,
        sections=[_sweep_section(r, i) if r.kind == "sweep" else _run_section(r, i)
                  for i, r in enumerate(runs)],
        unfinished=[{"experiment": r.experiment, "path": _shown(r.path), "status": r.status}
                    for r in skipped],
        corrupt=[(_shown(p), why) for p, why in unreadable],
    )


class Report(NamedTuple):
    """What :func:`write_report` wrote: the page, the entries shown, the unfinished runs left
    out and the unreadable results files skipped."""

    out: Path
    shown: list[Run]
    left: list[Run]
    unreadable: list[tuple[Path, str]]


def write_report(roots: Sequence[Path], out: Path, title: str = "rbp report",
                 include_unfinished: bool = False) -> Report:
    """Find the runs under ``roots`` and write the page to ``out``.

    Finished runs (and all sweeps) are shown; the others only when ``include_unfinished``,
    else listed at the end, as are results files that cannot be read.
    """
    unreadable: list[tuple[Path, str]] = []
    found = find_runs(roots, unreadable)
    shown = [r for r in found if not r.unfinished or include_unfinished]
    left = [r for r in found if r not in shown]
    out = Path(out)
    if shown:  # no page of nothing: the caller says there is nothing to show
        page = build_report(shown, title, left, unreadable).encode("utf-8")
        with atomic_write(out) as f:  # an interrupted write leaves the previous page
            f.write(page)
    return Report(out, shown, left, unreadable)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``rbp report``."""
    p.add_argument("dirs", nargs="+", type=Path, metavar="RESULTS_DIR",
                   help="directories searched (recursively) for results.json and sweep.json")
    p.add_argument("--out", type=Path, default=Path("report.html"), metavar="FILE",
                   help="the HTML file to write (default: %(default)s)")
    p.add_argument("--title", default="rbp report", help="the page title")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also show runs that are not finished")


def run_command(args: argparse.Namespace) -> int:
    """``rbp report``: 0 when at least one entry was written, 1 when none was found."""
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        print(f"rbp report: error: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if Path(args.out).is_dir():
        print(f"rbp report: error: --out {args.out} is a directory; give the page's file name, "
              f"e.g. --out {Path(args.out) / 'report.html'}", file=sys.stderr)
        return 2
    try:
        out, shown, left, unreadable = write_report(args.dirs, args.out, args.title,
                                                    args.include_unfinished)
    except OSError as exc:
        print(f"rbp report: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    for path, why in unreadable:
        print(f"rbp report: skipped {_shown(path)}: cannot read it ({why})", file=sys.stderr)
    for run in left:
        print(f"rbp report: left out {_shown(run.path)}: {run.experiment} run, status "
              f"{run.status} (--include-unfinished shows it)", file=sys.stderr)
    if not shown:
        where = ", ".join(map(str, args.dirs))
        why = (f"only {len(left)} unfinished run(s) (pass --include-unfinished to show them)"
               if left else "no results.json or sweep.json")
        print(f"rbp report: nothing to report: {why} under {where}; {out} not written",
              file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(shown)} entr{'y' if len(shown) == 1 else 'ies'}"
          + (f", {len(left)} unfinished left out (named above)" if left else "")
          + (f", {len(unreadable)} unreadable skipped" if unreadable else ""))
    return 0
