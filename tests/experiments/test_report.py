"""Tests of ``rbp report``: finding runs, Markdown tables, embedded figures, a real browser."""

from __future__ import annotations

import base64
import html.parser
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rbp.runner import cli, line_plot, write_json
from rbp.runner.report import find_runs, markdown_to_html, write_report

TABLE1 = """# Table 1

Test accuracy (%), mean ± std over **3** seeds.

| method | Cora | Pubmed |
|:---|---:|:---:|
| BPTT | 24.48 ± 6.6 | 47.05 ± 3.1 |
| Neumann-RBP | **46.63** ± 8.3 | 53.56 ± 5.3 |
| a \\| b | `x<y` | |
"""


def tiny_png(width: int, height: int) -> bytes:
    """An RGB PNG with a colour gradient (a minimal encoder: one IDAT, filter 0)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((255 * x // width, 255 * y // height, 128))
                           for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _results(experiment: str, status: str = "finished", **extra) -> dict:
    return {"experiment": experiment, "status": status, "wall_time_s": 12.5,
            "started_at": "2026-01-01T00:00:00+00:00", "quick": True,
            "command": ["rbp", experiment, "--quick"],
            "config": {"seed": 0, "note": "<script>alert(1)</script>", "methods": ["a", "b"]},
            "machine": {"python": "3.11", "torch": "2.13"}, **extra}


@pytest.fixture
def result_dirs(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    alpha = root / "alpha"
    write_json(alpha / "results.json", _results(
        "alpha", methods={"bptt": {"test_acc": 0.2448, "losses": [1.0, 0.5]},
                          "neumann": {"test_acc": 0.4663, "diverged": False}},
        baseline_acc=0.3996))
    (alpha / "table1.md").write_text(TABLE1)
    (alpha / "small.png").write_bytes(tiny_png(37, 23))
    (alpha / "checkpoints").mkdir()
    (alpha / "checkpoints" / "not_a_figure.png").write_bytes(tiny_png(5, 5))
    beta = root / "beta"
    write_json(beta / "results.json", _results("beta"))
    line_plot(beta / "figures" / "curve.png", {"rbp": ([0, 1, 2], [1.0, 0.3, 0.1])},
              "step", "loss", "a curve", logy=True)
    (beta / "table2.md").write_text("| truncation | 10 | 50 |\n|---|---|---|\n"
                                    "| run time | ×3.02 | ×2.87 |\n")
    write_json(root / "gamma" / "results.json", _results("gamma", status="running"))
    sweep = root / "sweep"
    write_json(sweep / "sweep.json", {
        "experiment": "alpha", "status": "incomplete", "grid": {"seed": [0, 1]},
        "points": [{"name": "seed-0", "values": {"seed": 0}, "status": "finished", "path": "seed-0",
                    "wall_time_s": 1.0, "action": "run", "error": None},
                   {"name": "seed-1", "values": {"seed": 1}, "status": "failed", "path": "seed-1",
                    "wall_time_s": 0.5, "action": "run", "error": "boom"},
                   {"name": "seed-2", "values": {"seed": 2}, "status": "finished", "path": "seed-2",
                    "wall_time_s": 1.0, "action": "run", "error": None}]})
    for seed, acc in ((0, 0.5), (2, 0.7)):
        write_json(sweep / f"seed-{seed}" / "results.json",
                   _results("alpha", methods={"neumann": {"test_acc": acc}}))
    return root


def test_markdown_tables() -> None:
    out = markdown_to_html(TABLE1)
    assert out.count("<table") == 1 and ">Table 1</h3>" in out
    assert '<th style="text-align: left;">method</th>' in out
    assert '<td style="text-align: right;">24.48 ± 6.6</td>' in out
    assert '<td style="text-align: center;">53.56 ± 5.3</td>' in out
    assert "<strong>46.63</strong>" in out and "<strong>3</strong>" in out
    assert '<td style="text-align: left;">a | b</td>' in out
    assert "<code>x&lt;y</code>" in out
    assert out.count("<tr>") == 4
    assert markdown_to_html("a | b\nno table here") == "<p>a | b\nno table here</p>"


def test_markdown_escapes_raw_html() -> None:
    """A table file from someone else's results folder cannot put markup into the page."""
    out = markdown_to_html('<script>alert(1)</script>\n\nok <b onclick="x">b</b>\n\n'
                           "```\n<i>code</i>\n```\n")
    assert "<script" not in out and "<b " not in out and "<i>" not in out
    assert "&lt;script&gt;" in out and "&lt;i&gt;code&lt;/i&gt;" in out


def test_find_runs_and_page(result_dirs: Path, tmp_path: Path) -> None:
    runs = {(r.kind, r.path.name): r for r in find_runs([result_dirs])}
    assert set(runs) == {("run", "alpha"), ("run", "beta"), ("run", "gamma"),
                         ("sweep", "sweep"), ("run", "seed-0"), ("run", "seed-2")}
    alpha = runs[("run", "alpha")]
    assert [f.name for f in alpha.figures] == ["small.png"]  # checkpoints left out
    assert [f.name for f in alpha.tables] == ["table1.md"]
    assert [f.name for f in runs[("run", "beta")].figures] == ["curve.png"]
    assert runs[("sweep", "sweep")].figures == []  # its points' files belong to the points

    out, shown, left, unreadable = write_report([result_dirs], tmp_path / "r.html")
    assert unreadable == []
    assert [r.experiment for r in left] == ["gamma"]
    page = out.read_text()
    png = base64.b64encode((result_dirs / "alpha" / "small.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{png}"' in page
    assert page.count("<img ") == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "0.4663" in page and "baseline acc" in page and "12.5" in page
    assert "Not included (unfinished)" in page and "boom" in page
    assert "0.6 ± 0.14 (n=2)" in page  # the sweep's seeds aggregated
    assert "http://" not in page and "https://" not in page  # self-contained


def test_a_figure_older_than_its_run_is_left_out(result_dirs: Path) -> None:
    """``--force`` starts a run over in a folder whose old figures stay: a figure written
    before the run (its last session) started is another run's, not shown under this one."""
    import os

    alpha = result_dirs / "alpha"
    stale = alpha / "fig3_citeseer.png"
    stale.write_bytes(tiny_png(4, 4))
    old = datetime(2025, 12, 31, tzinfo=UTC).timestamp()  # the run started 2026-01-01
    os.utime(stale, (old, old))
    runs = {(r.kind, r.path.name): r for r in find_runs([result_dirs])}
    assert [f.name for f in runs[("run", "alpha")].figures] == ["small.png"]


def test_report_command(result_dirs: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "report.html"
    assert cli.main(["report", str(result_dirs / "alpha"), str(result_dirs / "beta"),
                     "--out", str(out), "--title", "My runs"]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert "<title>My runs</title>" in out.read_text()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--out", str(tmp_path / "e.html")]) == 1
    capsys.readouterr()
    assert cli.main(["report", str(result_dirs / "alpha"), "--out", str(empty)]) == 2
    assert "is a directory; give the page's file name" in capsys.readouterr().err


def test_corrupt_results_file_is_named_not_skipped_silently(
    result_dirs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = result_dirs / "delta" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"experiment": "delta", "status": "fini')  # cut off mid-write
    (result_dirs / "eps").mkdir()
    (result_dirs / "eps" / "results.json").write_text("[1, 2]")
    out = tmp_path / "r.html"
    assert cli.main(["report", str(result_dirs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 unreadable skipped" in captured.out
    err = [ln for ln in captured.err.splitlines() if ln.startswith("rbp report: skipped")]
    assert len(err) == 2 and any("delta" in ln and "JSONDecodeError" in ln for ln in err)
    assert any("eps" in ln and "not a mapping" in ln for ln in err)
    page = out.read_text()
    assert "Skipped (unreadable)" in page and "delta" in page and "JSONDecodeError" in page


def test_tables_passed_as_data(tmp_path: Path) -> None:
    from rbp.runner.tables import Table, read_table, write_table

    run = tmp_path / "run"
    write_json(run / "results.json", _results("alpha"))
    table = Table(columns=["method", "Cora"], rows=[["<b>BPTT</b>", "24.48 ± 6.6"],
                                                   ["a | b", 0.5]],
                  title="Table 1", align=["left", "right"], notes="mean ± std over 10 seeds")
    md, data = write_table(run / "table1", table)
    assert md.name == "table1.md" and data.name == "table1.table.json"
    assert read_table(data) == Table(**{**table.to_dict()})
    assert "| a \\| b | 0.5 |" in md.read_text() and "|:---|---:|" in md.read_text()
    page = write_report([run], tmp_path / "r.html").out.read_text()
    # Rendered from the data (escaped), and the Markdown twin is not shown a second time.
    assert "&lt;b&gt;BPTT&lt;/b&gt;" in page and "<b>BPTT" not in page
    assert '<td style="text-align:right">24.48 ± 6.6</td>' in page
    assert page.count("24.48 ± 6.6") == 1 and "mean ± std over 10 seeds" in page
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table(columns=["a", "b"], rows=[["x"]])
    with pytest.raises(ValueError, match="align"):
        Table(columns=["a"], rows=[], align=["middle"])
    (run / "broken.table.json").write_text("{}")
    page = write_report([run], tmp_path / "r2.html").out.read_text()
    assert "is not a table file" in page  # shown as a problem, the rest of the page intact
    assert "24.48 ± 6.6" in page


class _DomSummary(html.parser.HTMLParser):
    """Tables (as lists of cell texts) and the image-check text of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self.check = ""
        self._cell: list[str] | None = None
        self._in_check = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre" and ("id", "img-check") in attrs:
            self._in_check = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self._in_check = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_check:
            self.check += data


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = Array.from(document.images).map(
    (im) => `${im.complete}:${im.naturalWidth}x${im.naturalHeight}:${im.src.slice(0, 14)}`
  ).join(";");
  document.body.appendChild(pre);
});
</script>
"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_in_headless_chromium(result_dirs: Path, tmp_path: Path) -> None:
    out = write_report([result_dirs], tmp_path / "report.html").out
    # The page itself has no script; a copy gets one that records how each image decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _DomSummary()
    dom.feed(proc.stdout)
    cells = [c for t in dom.tables for c in t]
    for text in ("Neumann-RBP", "46.63 ± 8.3", "a | b", "x<y", "×3.02", "0.4663", "boom",
                 "0.6 ± 0.14 (n=2)"):
        assert text in cells, text
    assert "<script>alert" not in proc.stdout  # settings text stayed text
    images = dom.check.split(";")
    assert len(images) == 2, dom.check
    assert all(i.startswith("true:") and i.endswith(":data:image/png") for i in images)
    sizes = {i.split(":")[1] for i in images}
    assert "37x23" in sizes  # the hand-made PNG decoded at its true size
    other = (sizes - {"37x23"}).pop()
    width, height = map(int, other.split("x"))
    assert width > 100 and height > 100  # matplotlib's figure decoded too


def test_every_kind_of_committed_result_is_shown(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    # a merged table (status "merged"), a benchmark's results without lifecycle keys,
    # a run with many metrics per method, a run with per-unit results, two unfinished runs
    write_json(root / "citation" / "results.json",
               {"experiment": "citation", "status": "merged", "seeds": [0, 1]})
    (root / "citation" / "table1.md").write_text(TABLE1)
    write_json(root / "table2" / "results.json", {"steps": 1000, "torch_threads": 1})
    (root / "table2" / "table2.md").write_text("| variant | K = 10 |\n|---|---|\n"
                                               "| ours | ×1.99 |\n")
    metrics = {"final_train_l1_epoch": 0.19, "final_val_l1": 0.23, "final_val_l1_binary": 0.07,
               "steps_done": 10, "wall_time_s": 3.5, "diverged_at": None,
               "backward_status": {"max_iter": 10}, "grad_norm_last": 1.5, "l1_s": 2.0}
    write_json(root / "hop" / "results.json", _results(
        "hopfield", methods={m: dict(metrics) for m in ("bptt", "rbp", "cg")}))
    write_json(root / "hyp" / "results.json", _results(
        "hyperopt", units={"T100_K50_bptt": {"train_steps": 100, "truncate": 50,
                                             "method": "bptt", "final_meta_loss": 0.2454,
                                             "meta_loss": [0.5, 0.2454],
                                             "trajectories": {}}}))
    write_json(root / "a" / "results.json", _results("citation", status="running"))
    write_json(root / "b" / "results.json", _results("hopfield", status="interrupted"))
    out = tmp_path / "r.html"
    assert cli.main(["report", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "4 entries, 2 unfinished left out" in captured.out
    for name, status in (("a", "running"), ("b", "interrupted")):
        assert f"left out {root / name}: " in captured.err and f"status {status}" in captured.err
    page = out.read_text()
    assert "merged" in page and "Neumann-RBP" in page  # Table 1
    assert "table2" in page and "×1.99" in page  # Table 2
    # the wide per-method table is transposed, with readable headers
    assert "<th>bptt</th><th>rbp</th><th>cg</th>" in page.replace("\n", "")
    for header in ("train L1 (last epoch)", "val L1 raw", "val L1 binarised",
                   "wall time (s)", "grad norm last", "L1 (s)", "backward statuses"):
        assert f">{header}<" in page, header
    assert "max_iter × 10" in page
    assert "final_val_l1" not in page and "diverged at" not in page  # all-empty column dropped
    # the per-unit results are a numeric table
    assert ">final meta loss<" in page and ">0.2454<" in page and ">K (truncation)<" in page
    assert ">trajectories<" not in page


def test_nothing_to_report_writes_no_page(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    empty, out = tmp_path / "empty", tmp_path / "r.html"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing to report: no results.json or sweep.json under" in err and not out.exists()
    write_json(empty / "x" / "results.json", _results("alpha", status="failed"))
    assert cli.main(["report", str(empty), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "only 1 unfinished run(s) (pass --include-unfinished" in err and not out.exists()
    assert cli.main(["report", str(empty), "--out", str(out), "--include-unfinished"]) == 0
    assert out.exists()
