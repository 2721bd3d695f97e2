"""Table 1's paper-model cells come from the full-protocol runs (``tools/table1_full.py``):
the committed README agrees with the committed runs, and the tool merges workers, writes the
cells and the ordering sentence, and flags a stale page."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "table1_full.py"

PAGE = """# Table 1

ordering of two methods differs from the paper's, `table1.md` gives the per-seed paired
differences and whether their 95 % interval excludes 0: on Cora none, so far.

| method | cora (paper) | cora (ours) | pubmed (paper) | pubmed (ours) |
|---|---|---|---|---|
| BPTT | 24.48 ± 6.6 | 1.00 ± 0.00 (n=1) | 47.05 ± 3.1 | 40.42 ± 1.51 (n=2, 120 ep) |
| TBPTT | 46.55 ± 6.4 | 1.00 ± 0.00 (n=1) | 53.41 ± 6.7 | 51.64 ± 13.66 (n=2, 120 ep) |
| RBP | 29.25 ± 3.3 | 1.00 ± 0.00 (n=1) | 48.55 ± 3.4 | 45.51 ± 1.69 (n=2, 120 ep) |
"""


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("table1_full", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, accs: dict[str, dict[int, float]], dataset: str = "cora") -> None:
    """A citation results.json with paper-model units (test accuracy per method and seed)."""
    models = {m: {"per_seed": [{"seed": s, "test_acc": a, "settings": {"epochs": 2000}}
                               for s, a in per.items()]} for m, per in accs.items()}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"datasets": {dataset: {"stats": {}, "baselines": {}, "models": {"paper": models}}}}))


def test_the_committed_readme_agrees_with_the_committed_full_runs(tool):
    from rbp.runner.lock import lock_holder

    running = [d.name for d in (ROOT / "results" / "citation" / "full").glob("*")
               if d.is_dir() and lock_holder(d) is not None]
    if running:  # a live run rewrites its results.json as its seeds finish
        pytest.skip(f"full-protocol runs are writing {running} now; the pages are refreshed "
                    "(python tools/table1_full.py) when they stop")
    assert tool.main(["--check"]) == 0, "run python tools/table1_full.py"


def test_workers_are_merged_into_the_cells_and_the_ordering_sentence(tool, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE.split("\n\n", 2)[2])
    full = tmp_path / "results" / "citation" / "full"
    # seeds 0-1 in the main run, seed 9 in a worker; BPTT above RBP on every seed (the
    # paper has it below)
    _run(full / "cora", {"bptt": {0: 0.30, 1: 0.34}, "tbptt": {0: 0.44, 1: 0.40},
                         "rbp": {0: 0.27, 1: 0.30}})
    _run(full / "cora-b", {"bptt": {9: 0.32}, "rbp": {9: 0.28}})
    assert tool.main(["--check", "--root", str(tmp_path)]) == 1
    assert tool.main(["--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| BPTT | 24.48 ± 6.6 | 32.00 ± 2.00 (n=3, 2000 ep) | 47.05 ± 3.1 |" in readme
    assert "| TBPTT | 46.55 ± 6.4 | 42.00 ± 2.83 (n=2, 2000 ep) |" in readme
    assert "| RBP | 29.25 ± 3.3 | 28.33 ± 1.53 (n=3, 2000 ep) |" in readme
    assert "40.42 ± 1.51 (n=2, 120 ep) |" in readme  # no Pubmed run: its cells stay
    # paired differences 3, 4, 4: mean 3.67, sd 0.58, t(0.975, 2) 4.30: [2.2, 5.1] excludes 0
    assert ("excludes 0: on Cora only BPTT against RBP (+3.7 ± 0.6 points, n = 3, 95 % interval "
            "[+2.2, +5.1]: a real difference), so far.") in readme
    docs = (tmp_path / "docs" / "reproducing.md").read_text()
    assert "| BPTT | 24.48 ± 6.6 | 32.00 ± 2.00 (n=3, 2000 ep) |" in docs
    assert (full / "cora" / "table1.md").read_text().count("2000 ep") == 3
    assert tool.main(["--check", "--root", str(tmp_path)]) == 0
    # Pubmed's full run finishes its first seed of BPTT: that cell only, and a clause of its own
    _run(full / "pubmed", {"bptt": {0: 0.45}}, "pubmed")
    assert tool.main(["--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| 47.05 ± 3.1 | 45.00 (n=1, 2000 ep) |" in readme  # one seed: no spread
    assert "| 53.41 ± 6.7 | 51.64 ± 13.66 (n=2, 120 ep) |" in readme
    assert "a real difference); on Pubmed none, so far." in readme
    assert tool.main(["--check", "--root", str(tmp_path)]) == 0


def test_the_sentence_drops_so_far_once_every_cell_has_ten_seeds(tool, tmp_path):
    """Nine seeds of one method keep ", so far"; the tenth makes the sentence final, and a
    rerun over the final sentence finds it (and changes nothing)."""
    extra = "".join(f"| {name} | 1 | 1 | 1 | 1 |\n" for name in ("CG-RBP", "Neumann-RBP",
                                                                 "GMRES-RBP"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE + extra)
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE + extra)
    full = tmp_path / "results" / "citation" / "full"
    offset = {"bptt": 0.02, "tbptt": 0.1, "rbp": 0.0, "cg": 0.05, "neumann": 0.12, "gmres": 0.11}
    for ds in ("cora", "pubmed"):
        _run(full / ds, {m: {s: 0.3 + o + 0.01 * (s % 3) for s in range(10 if m != "gmres"
                                                                          or ds == "cora" else 9)}
                         for m, o in offset.items()}, ds)
    assert tool.main(["--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "(n=9, 2000 ep)" in readme and readme.count(", so far.") == 1
    _run(full / "pubmed-b", {"gmres": {9: 0.45}}, "pubmed")
    assert tool.main(["--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "so far" not in readme and "excludes 0: on Cora " in readme
    sentence = readme.split("excludes 0: ")[1].split("\n\n")[0]
    assert sentence.endswith("a real difference).") and "BPTT against RBP" in sentence, sentence
    assert tool.main(["--check", "--root", str(tmp_path)]) == 0
    assert tool.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == readme


def test_a_readme_without_the_row_or_the_sentence_is_a_clear_error(tool, tmp_path):
    results = {"datasets": {"cora": {"models": {"paper": {"cg": {
        "n": 2, "mean": 40.0, "std": 1.0, "per_seed": []}}}}}}
    with pytest.raises(ValueError, match="no Table 1 row 'CG-RBP'"):
        tool.update_cells(PAGE, "cora", results)
    results["datasets"]["cora"]["models"]["paper"] = {"bptt": results["datasets"]["cora"][
        "models"]["paper"]["cg"]}
    with pytest.raises(ValueError, match="no 'excludes 0: on <dataset>"):
        tool.update_sentence(PAGE.replace("on Cora none, so far.", ""), {"cora": results})


def test_a_page_without_its_table_is_one_line_and_exit_2(tool, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# no table here\n")
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE)
    _run(tmp_path / "results" / "citation" / "full" / "cora", {"bptt": {0: 0.3, 1: 0.32}})
    assert tool.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "README.md: the README has no Table 1 row 'BPTT'" in err[0]
    assert (tmp_path / "README.md").read_text() == "# no table here\n"


def test_a_damaged_results_file_is_one_clear_message(tool, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE)
    folder = tmp_path / "results" / "citation" / "full" / "cora"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text('{"datasets": {"cora": ')  # cut off mid-write
    with pytest.raises(SystemExit, match=r"cora/results.json is not valid JSON"):
        tool.main(["--root", str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == PAGE


def test_a_root_without_the_pages_is_a_usage_error(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--check", "--root", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--root {tmp_path} has no README.md" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "is not a citation run's results"),
    ('{"datasets": 5}', "is not a citation run's results"),
    ('{"datasets": {"cora": {"models": {"paper": 3}}}}', "do not have a citation run's layout"),
])
def test_a_results_file_of_another_shape_is_one_clear_message(tool, tmp_path, text, message):
    """Valid JSON that is not a citation run's results ends in one line, not an
    AttributeError from inside the merge; nothing is written."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE)
    folder = tmp_path / "results" / "citation" / "full" / "cora"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(text)
    with pytest.raises(SystemExit, match=message):
        tool.main(["--root", str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == PAGE


def test_the_merged_table1_run_takes_the_full_runs_paper_entries(tool, tmp_path, monkeypatch):
    """results/citation (our models and baselines, which the README's Table 1 and Fig. 3 point
    to) gets the full runs' paper-model entries: its own other models stay, its table1.md is
    rewritten, Fig. 3 redrawn, the runs named in merged_from; --check flags it until then."""
    import rbp.apps.citation.figures as figures

    drawn = []
    monkeypatch.setattr(figures, "write_figures", lambda out, res: drawn.append(res))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    (tmp_path / "docs" / "reproducing.md").write_text(PAGE.split("\n\n", 2)[2])
    top = tmp_path / "results" / "citation"
    _run(top / "full" / "cora", {"bptt": {0: 0.30, 1: 0.34}})
    old_paper = {"bptt": {"n": 2, "mean": 28.0, "std": 1.8, "per_seed": []}}
    ppr = {"neumann": {"n": 10, "mean": 70.0, "std": 6.0, "per_seed": []}}
    (top / "results.json").write_text(json.dumps({"status": "merged", "merged_from": ["a"],
        "datasets": {"cora": {"stats": {}, "baselines": {},
                              "models": {"ppr": ppr, "paper": old_paper}}}}))
    assert tool.main(["--root", str(tmp_path)]) == 0
    merged = json.loads((top / "results.json").read_text())
    models = merged["datasets"]["cora"]["models"]
    assert models["ppr"] == ppr and models["paper"]["bptt"]["n"] == 2
    assert models["paper"]["bptt"]["mean"] == pytest.approx(32.0)
    assert merged["merged_from"] == ["a", "results/citation/full/cora/results.json"]
    assert merged["earlier_paper_runs"] == {"cora": old_paper}  # nothing computed is lost
    table = (top / "table1.md").read_text()
    assert "32.00 ± 2.83 (n=2, 2000 ep)" in table and "28.00" not in table
    assert len(drawn) == 1 and drawn[0] == merged
    assert tool.main(["--check", "--root", str(tmp_path)]) == 0
    _run(top / "full" / "cora-b", {"bptt": {9: 0.38}})  # a worker finishes a seed
    assert tool.main(["--check", "--root", str(tmp_path)]) == 1
    assert tool.main(["--root", str(tmp_path)]) == 0
    merged = json.loads((top / "results.json").read_text())
    assert merged["datasets"]["cora"]["models"]["paper"]["bptt"]["n"] == 3
    assert merged["earlier_paper_runs"] == {"cora": old_paper}  # the first ones, kept
