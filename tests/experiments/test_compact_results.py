"""The committed results are compact (``tools/compact_results.py``) and the figure code reads
the compact form as it reads a run's own results."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compact_results.py"
FOLDERS = ["results/hopfield", "results/hyperopt", "results/table2", "results/citation"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compact_results", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hopfield_run(seed: int = 0, epochs: int = 7, n: int = 3, diverged: bool = False):
    rng = np.random.default_rng(seed)
    methods = {}
    for name in ("bptt", "rbp"):
        losses = (rng.random(epochs * n) + 0.1).tolist()
        methods[name] = {
            "train_loss": losses if not (diverged and name == "rbp") else losses[:-1],
            "val_loss": rng.random(epochs + 1).tolist(),
            "val_epochs": list(range(epochs + 1)),
            "forward_trace": rng.random((epochs + 1, 25)).tolist(),
            "retrieved": rng.random((10, 784)).round(4).tolist(),
            "diverged_at": epochs * n - 1 if diverged and name == "rbp" else None,
            "final_val_l1": 0.123456789,
        }
    return {"experiment": "hopfield", "steps_per_epoch": n, "truncate": 5, "methods": methods,
            "images": {"clean": rng.integers(0, 2, (10, 784)).tolist(),
                       "corrupted": rng.integers(0, 2, (10, 784)).tolist()}}


@pytest.mark.parametrize("diverged", [False, True])
def test_compact_hopfield_keeps_what_the_figures_draw(tool, tmp_path, diverged):
    from rbp.apps.hopfield import figures

    full = _hopfield_run(diverged=diverged)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**full, "status": "running"}))
    assert tool.compact_json(path) is None  # a run that may still write its results
    path.write_text(json.dumps({**full, "status": "finished"}))
    compact = json.loads(tool.compact_json(path))
    assert "compacted" in compact
    for name, res in full["methods"].items():
        small = compact["methods"][name]
        assert "train_loss" not in small and "retrieved" not in small
        xs, ys = figures.train_curve(res, full["steps_per_epoch"])
        xc, yc = figures.train_curve(small, full["steps_per_epoch"])
        assert xc == xs and np.allclose(yc, ys, rtol=1e-3)
        assert np.allclose(small["forward_trace"][-1], res["forward_trace"][-1], rtol=1e-3)
        digits = [figures._digit(r) for r in small["retrieved_binary"]]
        assert all(np.array_equal(d, (figures._digit(r) > 0.5).astype(float))
                   for d, r in zip(digits, res["retrieved"], strict=True))
        assert small["final_val_l1"] == res["final_val_l1"]  # scalars untouched
    assert all(np.array_equal(figures._digit(c), figures._digit(f)) for c, f in zip(
        compact["images"]["clean"], full["images"]["clean"], strict=True))
    paths = figures.make_figures(compact, tmp_path)
    assert {p.name for p in paths} == {"fig1_loss.png", "fig2_retrieval.png",
                                       "fig3_forward_trace.png"}
    # compacting again changes nothing
    path.write_text(json.dumps(compact))
    assert json.loads(tool.compact_json(path)) == compact


def test_compact_hyperopt_trajectories_round_trip(tool, tmp_path):
    from rbp.apps.hyperopt.figures import unpack_array

    traj = np.random.default_rng(1).normal(size=(30, 16))
    unit = {"method": "neumann", "trajectories": {"20": traj.tolist()},
            "meta_loss": [0.123456789] * 25, "final_meta_loss": 0.123456789}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"experiment": "hyperopt", "status": "finished",
                                "units": {"u": unit}}))
    small = json.loads(tool.compact_json(path))["units"]["u"]
    back = unpack_array(small["trajectories"]["20"])
    assert back.shape == traj.shape and np.allclose(back, traj, rtol=1e-3, atol=1e-4)
    assert np.array_equal(unpack_array(copy.deepcopy(traj.tolist())), traj)  # plain lists
    assert small["meta_loss"][0] == 0.1235 and small["final_meta_loss"] == 0.123456789


def test_committed_results_are_compact(tool):
    """Run ``python tools/compact_results.py results/hopfield results/hyperopt
    results/table2`` before committing new results."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: which results are committed is unknown")
    assert tool.main(["--check", "--tracked", *(str(ROOT / f) for f in FOLDERS)]) == 0


def test_committed_hopfield_results_draw_their_figures(tmp_path):
    from rbp.apps.hopfield.figures import make_figures

    runs = sorted((ROOT / "results" / "hopfield").rglob("results.json"))
    assert runs
    for i, path in enumerate(runs):
        out = tmp_path / str(i)
        out.mkdir()
        assert len(make_figures(json.loads(path.read_text()), out)) == 3


def test_committed_hyperopt_trajectories_unpack():
    from rbp.apps.hyperopt.figures import unpack_array

    data = json.loads((ROOT / "results" / "hyperopt" / "results.json").read_text())
    shapes = [unpack_array(t).shape for u in data["units"].values()
              for t in u.get("trajectories", {}).values()]
    assert shapes and all(len(s) == 2 and s[0] > 1 for s in shapes)


def test_committed_tables_use_the_sample_std():
    """One convention for every ``± std`` committed: the sample std (ddof 1)."""
    tables = sorted((ROOT / "results").rglob("*.md"))
    assert tables
    for path in tables:
        text = path.read_text()
        assert "population std" not in text, path
        if "± std" in text:
            assert "sample std" in text, f"{path} does not say which std it shows"


def test_compact_citation_rounds_curves_only(tool, tmp_path):
    curve = [0.123456789 + i for i in range(40)]
    run = {"experiment": "citation", "status": "merged", "datasets": {"cora": {"models": {
        "ppr": {"neumann": {"mean": 70.123456789, "std": 5.87654321, "n": 10,
                            "test_acc": [70.123456789] * 10,
                            "per_seed": [{"curves": {"train_loss": curve}}]}}}}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run))
    small = json.loads(tool.compact_json(path))
    entry = small["datasets"]["cora"]["models"]["ppr"]["neumann"]
    assert entry["mean"] == 70.123456789 and entry["test_acc"] == [70.123456789] * 10
    assert entry["per_seed"][0]["curves"]["train_loss"][0] == 0.1235
    assert small["compacted"]


@pytest.mark.parametrize(("name", "content", "why"), [
    ("results.json", b'{"experiment": "hopfield", "status": "finished", bad', "JSONDecodeError"),
    ("results.json", b"\xff", "UnicodeDecodeError"),
    ("results.json", b'{"experiment": "hopfield", "status": "finished"}', "KeyError"),
    ("fig.png", b"not a png", "UnidentifiedImageError"),
])
def test_a_damaged_file_is_one_line_and_nothing_is_written(tool, tmp_path, name, content, why):
    """A cut-off or foreign file ends the tool in one line naming it, before any other file
    is rewritten (it was a traceback from json, PIL or the compactor)."""
    good = tmp_path / "a" / "results.json"
    good.parent.mkdir()
    good.write_text(json.dumps(dict(_hopfield_run(), status="finished")))  # not compact yet
    before = good.read_bytes()
    bad = tmp_path / "b" / name
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(bad))} cannot be compacted \({why}"):
        tool.main([str(tmp_path)])
    assert good.read_bytes() == before


def test_tracked_outside_a_git_checkout_is_one_line(tool, tmp_path):
    with pytest.raises(SystemExit, match="is not in a git checkout .*leave out --tracked"):
        tool.main(["--check", "--tracked", str(tmp_path)])
