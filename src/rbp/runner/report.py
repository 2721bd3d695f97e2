"""``rbp report``: one self-contained HTML page of the finished runs under some directories.

Every directory holding a ``results.json`` is a run; its ``experiment`` key says which. For each
run the page shows its status, wall time and command, a table of the per-method metrics found
in ``results["methods"]`` (the scalar entries), the other scalar results, every Markdown file of
the run directory (pipe tables become HTML tables), every figure (PNG, JPEG, SVG, GIF embedded
as base64 ``data:`` URIs), its settings and the machine it ran on. A sweep directory
(``sweep.json``) gets a table of its points. Nothing is fetched from elsewhere: the page can be
mailed or archived as one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rbp.runner.results import CHECKPOINT_DIR, RESULTS_FILE, read_json

__all__ = ["Run", "add_arguments", "build_report", "find_runs", "markdown_to_html",
           "run_command", "write_report"]

SWEEP_FILE = "sweep.json"  # kept equal to rbp.runner.sweep.SWEEP_FILE (no torch import here)
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".gif": "image/gif", ".svg": "image/svg+xml"}
_META_KEYS = ("experiment", "status", "error", "wall_time_s", "started_at", "resumed", "quick",
              "command", "rbp_version", "config", "machine")
_MAX_FIGURE_BYTES = 20_000_000


@dataclass
class Run:
    """One directory found by :func:`find_runs`: a run (``results.json``) or a sweep."""

    path: Path
    kind: str  # "run" or "sweep"
    data: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)

    @property
    def experiment(self) -> str:
        """The ``experiment`` key (``"?"`` when missing)."""
        return str(self.data.get("experiment", "?"))

    @property
    def status(self) -> str:
        """The run's ``status`` (``"?"`` when missing)."""
        return str(self.data.get("status", "?"))


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


def find_runs(roots: Sequence[Path]) -> list[Run]:
    """Every run and sweep directory at or below ``roots``, in path order."""
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
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        run = Run(path=path.parent, kind=kind, data=data)
        if kind == "sweep" and (path.parent / RESULTS_FILE).is_file():
            continue  # a run directory that also holds a sweep file: shown as a run
        for f in _own_files(path.parent):
            if f.suffix.lower() in _IMAGE_TYPES and f.stat().st_size <= _MAX_FIGURE_BYTES:
                run.figures.append(f)
            elif f.suffix.lower() == ".md":
                run.tables.append(f)
        runs.append(run)
    runs.sort(key=lambda r: (r.kind != "sweep", r.experiment, str(r.path)))
    return runs


# ---------------------------------------------------------------- Markdown


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*([^*]+)\*(?![\w*])"), r"<em>\1</em>"),
]
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    parts = re.split(r"(?<!\\)\|", line)
    return [p.strip().replace("\\|", "|") for p in parts]


def _table(header: str, sep: str, body: list[str]) -> str:
    aligns = []
    for cell in _cells(sep):
        left, right = cell.startswith(":"), cell.endswith(":")
        aligns.append("center" if left and right else "right" if right else
                      "left" if left else "")
    heads = _cells(header)

    def row(cells: list[str], tag: str) -> str:
        cells = (cells + [""] * len(heads))[: len(heads)]
        parts = []
        for i, c in enumerate(cells):
            style = f' style="text-align:{aligns[i]}"' if i < len(aligns) and aligns[i] else ""
            parts.append(f"<{tag}{style}>{_inline(c)}</{tag}>")
        return "<tr>" + "".join(parts) + "</tr>"

    rows = "\n".join(row(_cells(b), "td") for b in body)
    return (f'<table class="md">\n<thead>{row(heads, "th")}</thead>\n'
            f"<tbody>\n{rows}\n</tbody>\n</table>")


def markdown_to_html(text: str) -> str:
    """A small Markdown subset as HTML: pipe tables (with ``:--:`` alignment), ``#`` headings,
    ``-``/``*`` lists, fenced code blocks and paragraphs, with inline code, bold and italics.
    All text is HTML-escaped."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1: j])) + "</pre>")
            i = j + 1
            continue
        if "|" in stripped and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]) and \
                "|" in lines[i + 1]:
            flush()
            j = i + 2
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                j += 1
            out.append(_table(line, lines[i + 1], lines[i + 2: j]))
            i = j
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            flush()
            level = min(len(heading.group(1)) + 2, 6)  # below the page's own headings
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"^[-*]\s+", stripped):
            if para:
                flush()
            items.append(re.sub(r"^[-*]\s+", "", stripped))
        elif not stripped:
            flush()
        else:
            if items:
                flush()
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


# ---------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{display:inline-block;padding:.1em .5em;border-radius:.3em;color:#fff;font-size:.85em}
.finished{background:#2a7d2a}.failed,.killed,.incomplete{background:#b22}
.running,.interrupted,.pending,.other{background:#b80}
figure{display:inline-block;margin:.5em;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
code,pre{background:#f6f6f6;font-size:.9em}pre{padding:.5em;overflow-x:auto}
.meta td:first-child{font-weight:600}.wide{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


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


def _status(status: str) -> str:
    known = {"finished", "failed", "killed", "incomplete", "running", "interrupted", "pending"}
    cls = status if status in known else "other"
    return f'<span class="status {cls}">{_e(status)}</span>'


def _kv_table(mapping: Mapping[str, Any], cls: str = "meta") -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>"
                   for k, v in mapping.items())
    return f'<table class="{cls}"><tbody>{rows}</tbody></table>'


def _metrics_table(methods: Mapping[str, Any]) -> str:
    """Rows: methods; columns: the scalar entries of their result dicts."""
    columns: list[str] = []
    for result in methods.values():
        if isinstance(result, Mapping):
            for key, value in result.items():
                if _is_scalar(value) and key not in columns:
                    columns.append(key)
    if not columns:
        return ""
    head = "".join(f"<th>{_e(c)}</th>" for c in ["method", *columns])
    body = []
    for method, result in methods.items():
        result = result if isinstance(result, Mapping) else {}
        cells = []
        for c in columns:
            v = result.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="{"num" if num else ""}">{_e(_fmt(v))}</td>')
        body.append(f"<tr><td>{_e(method)}</td>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table class="metrics"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _figure(path: Path, base: Path) -> str:
    mime = _IMAGE_TYPES[path.suffix.lower()]
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    rel = _rel(path, base)
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_e(rel)}">'
            f"<figcaption>{_e(rel)}</figcaption></figure>")


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _anchor(run: Run, i: int) -> str:
    return f"run-{i}-" + re.sub(r"[^A-Za-z0-9_-]", "-", run.experiment)


def _run_section(run: Run, i: int) -> str:
    d = run.data
    parts = [f'<section id="{_anchor(run, i)}">',
             f"<h2>{_e(run.experiment)} <small>{_e(_shown(run.path))}</small> "
             f"{_status(run.status)}</h2>"]
    meta = {k: d[k] for k in ("wall_time_s", "started_at", "quick", "resumed", "rbp_version")
            if k in d}
    if isinstance(d.get("command"), list):
        meta["command"] = " ".join(str(c) for c in d["command"])
    if d.get("error"):
        meta["error"] = d["error"]
    parts.append(_kv_table(meta))
    methods = d.get("methods")
    if isinstance(methods, Mapping) and methods:
        table = _metrics_table(methods)
        if table:
            parts += ["<h3>Results per method</h3>", table]
    extra = {k: v for k, v in d.items() if k not in _META_KEYS and k != "methods"
             and _is_scalar(v)}
    if extra:
        parts += ["<h3>Other results</h3>", _kv_table(extra, "results")]
    for md in run.tables:
        parts += [f"<h3>{_e(_rel(md, run.path))}</h3>",
                  f'<div class="markdown">{markdown_to_html(md.read_text(errors="replace"))}</div>']
    if run.figures:
        parts.append("<h3>Figures</h3>")
        parts += [_figure(f, run.path) for f in run.figures]
    if isinstance(d.get("config"), Mapping):
        parts.append(f"<details><summary>Settings</summary>{_kv_table(d['config'])}</details>")
    if isinstance(d.get("machine"), Mapping):
        parts.append(f"<details><summary>Machine</summary>{_kv_table(d['machine'])}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def _sweep_section(run: Run, i: int) -> str:
    d = run.data
    parts = [f'<section id="{_anchor(run, i)}">',
             f"<h2>sweep of {_e(run.experiment)} <small>{_e(_shown(run.path))}</small> "
             f"{_status(run.status)}</h2>",
             _kv_table({"wall_time_s": d.get("wall_time_s"), "backend": d.get("backend"),
                        "grid": d.get("grid"), "fixed": d.get("fixed"),
                        "counts": d.get("counts")})]
    rows = []
    for p in d.get("points", []):
        rows.append(f"<tr><td>{_e(p.get('name'))}</td><td>{_status(str(p.get('status')))}</td>"
                    f'<td class="num">{_e(_fmt(p.get("wall_time_s")))}</td>'
                    f"<td>{_e(p.get('action', ''))}</td><td>{_e(p.get('error') or '')}</td></tr>")
    parts.append('<table class="points"><thead><tr><th>point</th><th>status</th>'
                 "<th>wall time (s)</th><th>action</th><th>error</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")
    parts.append(_sweep_metrics(run.path))
    for md in run.tables:
        parts += [f"<h3>{_e(_rel(md, run.path))}</h3>",
                  f'<div class="markdown">{markdown_to_html(md.read_text(errors="replace"))}</div>']
    parts += [_figure(f, run.path) for f in run.figures]
    parts.append("</section>")
    return "\n".join(parts)


def _sweep_metrics(sweep_dir: Path) -> str:
    """Per group of grid values: each method's numeric metrics as mean ± std over seeds."""
    from rbp.runner.sweep import aggregate, summarize

    try:
        stats = summarize(aggregate(sweep_dir), over="seed")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"<p>Could not aggregate the points: {_e(exc)}</p>"
    parts = []
    for label, methods in stats.items():
        table = {m: {k: (f"{v['mean']:.4g} ± {v['std']:.2g} (n={v['n']})" if v["n"] > 1
                         else f"{v['mean']:.6g}") for k, v in metrics.items()}
                 for m, metrics in methods.items()}
        parts += [f"<h3>{_e(label)}: mean ± std over seeds</h3>", _metrics_table(table)]
    return "\n".join(parts)


def build_report(runs: Sequence[Run], title: str = "rbp report",
                 skipped: Sequence[Run] = ()) -> str:
    """The HTML page (a string) for ``runs``; ``skipped`` are listed at the end."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    toc = "".join(f'<li><a href="#{_anchor(r, i)}">{_e(r.experiment)}'
                  f"{' sweep' if r.kind == 'sweep' else ''}</a> — {_e(_shown(r.path))} "
                  f"{_status(r.status)}</li>" for i, r in enumerate(runs))
    body = [_sweep_section(r, i) if r.kind == "sweep" else _run_section(r, i)
            for i, r in enumerate(runs)]
    tail = ""
    if skipped:
        rows = "".join(f"<tr><td>{_e(r.experiment)}</td><td>{_e(_shown(r.path))}</td>"
                       f"<td>{_status(r.status)}</td></tr>" for r in skipped)
        tail = ("<h2>Not included (unfinished)</h2><table><thead><tr><th>experiment</th>"
                f"<th>path</th><th>status</th></tr></thead><tbody>{rows}</tbody></table>")
    empty = "" if runs else "<p>No finished runs were found.</p>"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_e(title)}</h1>\n<p>Generated {now}; {len(runs)} entr"
            f"{'y' if len(runs) == 1 else 'ies'}.</p>\n<ul class=\"toc\">{toc}</ul>\n{empty}"
            + "\n".join(body) + f"\n{tail}\n</body>\n</html>\n")


def write_report(roots: Sequence[Path], out: Path, title: str = "rbp report",
                 include_unfinished: bool = False) -> tuple[Path, list[Run], list[Run]]:
    """Find the runs under ``roots`` and write the page to ``out``.

    Finished runs (and all sweeps) are shown; the others only when ``include_unfinished``,
    else listed at the end. Returns ``(out, shown, left_out)``.
    """
    found = find_runs(roots)
    shown = [r for r in found if r.kind == "sweep" or r.status == "finished"
             or include_unfinished]
    left = [r for r in found if r not in shown]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(shown, title, left), encoding="utf-8")
    return out, shown, left


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
    out, shown, left = write_report(args.dirs, args.out, args.title, args.include_unfinished)
    print(f"wrote {out}: {len(shown)} entr{'y' if len(shown) == 1 else 'ies'}"
          + (f", {len(left)} unfinished left out" if left else ""))
    return 0 if shown else 1
