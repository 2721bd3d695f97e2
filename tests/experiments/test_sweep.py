"""Tests of ``rbp sweep``: grid expansion, local worker pool, failures, kill + resume, Ray."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rbp.runner import cli, read_json, unregister
from rbp.runner.sweep import (
    SweepSpec,
    aggregate,
    expand_grid,
    load_spec,
    parse_grid_option,
    plan_point,
    register_summary,
    resolve_point,
    run_sweep,
    runs_matching,
    summarize,
)

MODULE = "rbp_sweep_dummy_app"

# An experiment living outside rbp.apps, imported by each worker through --import. Hooks driven
# by environment variables: SWEEPDUMMY_KILL=<point dir name>:<step> SIGKILLs that run at that
# step (unless resuming); SWEEPDUMMY_BARRIER=<dir>:<n> makes each run wait until n runs have
# reached run(), which only a pool of >= n workers can satisfy.
APP_SOURCE = '''
import os, signal, time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rbp.runner import ConfigError, Experiment, register, rng_state, set_rng_state

HERE = Path(__file__).resolve().parent


@dataclass
class SweepDummyConfig:
    methods: list[str] = field(default_factory=lambda: ["rbp"])
    seed: int = 0
    steps: int = 8
    lr: float = 0.2
    checkpoint_every: int = 2

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")


def _barrier(ctx) -> None:
    spec = os.environ.get("SWEEPDUMMY_BARRIER")
    if not spec or ctx.resume:
        return
    folder, n = spec.rsplit(":", 1)
    Path(folder, ctx.out_dir.name).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < int(n):
        if time.monotonic() > deadline:
            raise RuntimeError("barrier timeout: the runs did not run concurrently")
        time.sleep(0.05)


def run(cfg, ctx):
    _barrier(ctx)
    kill = os.environ.get("SWEEPDUMMY_KILL", "")
    kill_name, _, kill_step = kill.partition(":")
    done = {}
    for method in cfg.methods:
        state = ctx.load(method)
        if state is not None and state.get("done"):
            done[method] = state["result"]
            continue
        w, step = torch.zeros((), dtype=torch.float64), 0
        if state is not None:
            w, step = state["w"], state["step"]
            set_rng_state(state["rng"])
        scale = 1.0 if method == "rbp" else 0.5
        while step < cfg.steps:
            if ctx.out_dir.name == kill_name and step == int(kill_step) and not ctx.resume:
                os.kill(os.getpid(), signal.SIGKILL)
            w = w - cfg.lr * scale * (w - 3.0) + 0.1 * torch.randn((), dtype=torch.float64)
            step += 1
            if ctx.should_checkpoint(step):
                ctx.save(method, {"w": w, "step": step, "rng": rng_state()})
        done[method] = {"w": float(w), "loss": float((w - 3.0) ** 2), "steps": step}
        ctx.save(method, {"done": True, "result": done[method]})
        ctx.write_results({"methods": done})
    (ctx.out_dir / "table.md").write_text("| method | w |\\n|---|---|\\n" + "".join(
        f"| {m} | {r['w']:.4f} |\\n" for m, r in done.items()))
    return {"methods": done, "n_methods": len(done)}


register(Experiment(
    name="sweepdummy", help="a scalar toy for sweep tests", config_cls=SweepDummyConfig,
    run=run, methods=("rbp", "cg", "neumann"), default_config=HERE / "sweepdummy.yaml",
))
'''


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("app")
    (folder / f"{MODULE}.py").write_text(APP_SOURCE)
    (folder / "sweepdummy.yaml").write_text("steps: 8\nquick:\n  steps: 4\n")
    return folder


@pytest.fixture(autouse=True)
def dummy_app(app_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(app_dir))
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(app_dir), old])))
    monkeypatch.delenv("SWEEPDUMMY_KILL", raising=False)
    monkeypatch.delenv("SWEEPDUMMY_BARRIER", raising=False)
    module = importlib.import_module(MODULE)
    yield module
    unregister("sweepdummy")
    sys.modules.pop(MODULE, None)


def _spec(out: Path, **kw) -> SweepSpec:
    kw.setdefault("grid", {"method": ["rbp", "cg"], "steps": [6, 0]})
    return SweepSpec(experiment="sweepdummy", out=out, imports=[MODULE], **kw)


# ---------------------------------------------------------------- the spec


def test_grid_expansion_and_flags(tmp_path: Path) -> None:
    spec = SweepSpec(
        experiment="x", out=tmp_path,
        grid={"method": ["rbp", ["cg", "neumann"]], "seed": [0, 1], "dataset": ["cora"]},
        fixed={"lr": 1e-3, "tags": [1, 2], "label": "a,b", "--data-dir": "/d", "--flag": True,
               "--off": False},
        quick=True,
    )
    points = expand_grid(spec)
    assert [p.name for p in points] == [
        "method-rbp__seed-0__dataset-cora", "method-rbp__seed-1__dataset-cora",
        "method-cg+neumann__seed-0__dataset-cora", "method-cg+neumann__seed-1__dataset-cora",
    ]
    # Everything is a key=value setting (method -> methods), in spec order: fixed, then grid.
    assert points[3].overrides == ["lr=0.001", "tags=[1, 2]", 'label="a,b"',
                                   "methods=cg,neumann", "seed=1", "dataset=cora"]
    flags = points[3].flags  # keys spelled as flags that are no setting stay flags
    assert flags[0] == "--quick" and "--flag" in flags and "--off" not in flags
    assert flags[flags.index("--data-dir") + 1] == "/d"
    argv = points[3].argv
    assert argv[argv.index("--data-dir") + 1] == "/d" and argv.count("--set") == 6
    # With the experiment's settings known, --data-dir is the setting data_dir.
    known = expand_grid(spec, settings={"data_dir", "lr"})[3]
    assert "data_dir=/d" in known.overrides and "--data-dir" not in known.flags
    assert parse_grid_option("seed=0,1,2") == ("seed", [0, 1, 2])
    assert parse_grid_option("lr=[0.1, 1e-2]") == ("lr", [0.1, "1e-2"])  # YAML 1.1 reads str
    assert parse_grid_option("method=bptt,rbp") == ("method", ["bptt", "rbp"])


def test_load_spec(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("experiment: citation\nout: o\ngrid:\n  seed: [0, 1]\n  dataset: cora\n"
                    "fixed:\n  epochs: 3\nworkers: 2\n")
    spec = load_spec(path)
    assert spec.grid == {"seed": [0, 1], "dataset": ["cora"]} and spec.fixed == {"epochs": 3}
    assert spec.workers == 2 and spec.out == Path("o") and len(expand_grid(spec)) == 2
    for text, match in [
        ("gird: {}", "unknown key"),
        ("grid: {seed: [0]}\nfixed: {seed: 1}", "both in the grid and fixed"),
        ("grid: {seed: [0, 1, 0], method: [rbp]}", "grid key 'seed' repeats the value"),
        ("points: [{seed: 0}, {seed: 0}]", "points repeat"),
    ]:
        path.write_text(f"experiment: citation\n{text}\n")
        with pytest.raises(ValueError, match=match):
            load_spec(path)
    path.write_text("experiment: citation\ngrid: {lr: [0.1, '0.1']}\n")  # alike, not equal
    assert [p.name for p in expand_grid(load_spec(path))] == ["lr-0.1", "lr-0.1__1"]


def test_packaged_sweep_specs_parse() -> None:
    folder = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
    specs = sorted(folder.glob("*.yaml"))
    assert specs, "no example sweep specs"
    for path in specs:
        spec = load_spec(path)
        assert expand_grid(spec), path


def test_dry_run_checks_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "sweepdummy", "--import", MODULE, "--grid", "steps=3,0", "--out",
            str(tmp_path / "s"), "--dry-run"]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "steps-3: run: rbp sweepdummy --set steps=3" in out
    assert "steps-0: invalid: rbp sweepdummy --set steps=0" in out
    assert "(steps-0): steps must be at least 1" in out
    assert not (tmp_path / "s").exists()



def test_a_flag_the_run_would_refuse_is_an_error_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt flag in a spec (passed to each run as it is) is caught by the dry run and
    by the sweep before any point starts, with the run's own suggestion."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"experiment: sweepdummy\nimports: [{MODULE}]\nout: {tmp_path / 's'}\n"
                    "fixed: {--no-progess: true}\ngrid: {seed: [0, 1]}\n")
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert ("error 1 (2 points, seed-0 ...): rbp sweepdummy does not take --no-progess; did "
            "you mean --no-progress?") in out
    assert cli.main(["sweep", str(spec), "--no-progress"]) == 1
    assert "does not take --no-progess" in capsys.readouterr().err
    assert not any((tmp_path / "s").glob("seed-*/results.json"))
    spec.write_text(spec.read_text().replace("--no-progess: true", "--reuse-from: null"))
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 0  # null: the flag is left out
    spec.write_text(spec.read_text().replace("--reuse-from: null", "--reuse-from: true"))
    assert cli.main(["sweep", str(spec), "--dry-run"]) == 2
    assert "argument --reuse-from: expected one argument" in capsys.readouterr().out


def test_an_unknown_experiment_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default sweep directory is runs/sweeps/<experiment>
    assert cli.main(["sweep", "nosuchexp", "--grid", "seed=1"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["sweep", "nosuchexp", "--grid", "seed=1", "--out", "a/b"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_dry_run_groups_identical_errors_and_prints_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sweep", "sweepdummy", "--import", MODULE, "--grid", "seed=0,1,2,3",
            "--grid", "steps=0,-1,5", "--out", str(tmp_path / "s"), "--dry-run"]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert out.count("steps must be at least 1, got 0") == 1
    assert out.count("steps must be at least 1, got -1") == 1
    assert "error 1 (4 points, seed-0__steps-0 ...): steps must be at least 1, got 0" in out
    assert out.count("[error 1]") == 4 and out.count("[error 2]") == 4
    assert out.strip().splitlines()[-1].startswith(
        "12 point(s): 4 run, 8 invalid; 8 with an error (2 distinct)")
    argv[argv.index("steps=0,-1,5")] = "steps=5"
    assert cli.main(argv) == 0
    assert "4 point(s): 4 run; no errors" in capsys.readouterr().out


def test_the_method_axis_restricts_every_model_of_a_point() -> None:
    settings = {"methods", "fp_methods", "injected_methods", "models", "seed"}
    spec = SweepSpec(experiment="x", grid={"method": ["rbp", "cg"], "seed": [0]})
    (rbp, cg) = expand_grid(spec, settings)
    assert rbp.overrides == ["methods=rbp", "seed=0", "fp_methods=rbp",
                             "injected_methods=rbp"]
    assert cg.overrides[-2:] == ["fp_methods=cg", "injected_methods=cg"]
    # a list the spec sets itself, or points that choose their models, are left as given
    spec.fixed = {"injected_methods": ["neumann"]}
    assert expand_grid(spec, settings)[0].overrides == [
        'injected_methods=["neumann"]', "methods=rbp", "seed=0", "fp_methods=rbp"]
    spec = SweepSpec(experiment="x", points=[{"method": "rbp", "models": ["paper"]}])
    assert expand_grid(spec, settings)[0].overrides == ["methods=rbp", 'models=["paper"]']


def test_dry_run_checks_each_points_data(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-data"
    argv = ["sweep", "citation", "--grid", "dataset=cora", "--set", f"data_dir={missing}",
            "--out", str(tmp_path / "s"), "--dry-run"]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "error 1 (dataset-cora): data:" in out and str(missing) in out
    assert not (tmp_path / "s").exists()


def test_summarize_over_seeds() -> None:
    group = {
        "dataset=cora,seed=0": {"values": {"dataset": "cora", "seed": 0},
                                "methods": {"rbp": {"acc": 0.5, "ok": True, "curve": [1]}}},
        "dataset=cora,seed=1": {"values": {"dataset": "cora", "seed": 1},
                                "methods": {"rbp": {"acc": 0.7}, "cg": {"acc": 0.1}}},
        "dataset=pubmed,seed=0": {"values": {"dataset": "pubmed", "seed": 0},
                                  "methods": {"rbp": {"acc": 0.9}}},
    }
    stats = summarize({"results": group}, over="seed")
    assert set(stats) == {"dataset=cora", "dataset=pubmed"}
    rbp = stats["dataset=cora"]["rbp"]["acc"]
    assert rbp["n"] == 2 and rbp["mean"] == pytest.approx(0.6)
    assert rbp["std"] == pytest.approx(0.1414213562)
    assert set(stats["dataset=cora"]["rbp"]) == {"acc"}  # bools and lists are not metrics
    assert stats["dataset=cora"]["cg"]["acc"] == {"mean": 0.1, "std": 0.0, "n": 1}


def test_settings_comparison_tolerates_only_settings_added_or_removed_as_no_ops() -> None:
    from rbp.runner.sweep.plan import changed_settings, setting_defaults

    @dataclass
    class Cfg:
        steps: int = 8
        tags: list[int] = field(default_factory=lambda: [1])
        new_knob: float = 0.5

    defaults = setting_defaults(Cfg)
    assert defaults == {"steps": 8, "tags": [1], "new_knob": 0.5}
    old = {"steps": 8, "tags": [1], "old_hook": None, "checkpoint_every": 2}
    same = {"steps": 8, "tags": [1], "new_knob": 0.5, "checkpoint_every": 5}
    assert changed_settings(old, same, defaults) == []  # added at default, removed when null
    assert changed_settings(old, {**same, "new_knob": 0.7}, defaults) == ["new_knob"]
    assert changed_settings(old, {**same, "steps": 9}, defaults) == ["steps"]
    assert changed_settings({**old, "old_hook": 3}, same, defaults) == ["old_hook"]
    assert changed_settings(old, same) == ["new_knob"]  # without defaults: strict


def test_a_point_whose_data_moved_is_resumed_not_a_conflict(tmp_path: Path) -> None:
    """Only data_dir differs (the sweep moved to a machine whose data lie elsewhere): the
    point resumes, and the run checks the data against its checkpoints; any other difference
    is still a conflict."""
    import json

    run = tmp_path / "point"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "a.pt").write_bytes(b"x")
    for status in ("finished", "interrupted"):
        (run / "results.json").write_text(json.dumps(
            {"experiment": "toy", "status": status, "config": {"lr": 0.1, "data_dir": "/a"}}))
        action, why = plan_point(run, {"lr": 0.1, "data_dir": "/b"})
        assert action == "resume" and "data_dir changed" in why
        action, why = plan_point(run, {"lr": 0.2, "data_dir": "/b"})
        assert action == "conflict" and "data_dir, lr" in why
    assert plan_point(run, {"lr": 0.1, "data_dir": "/a"})[0] == "resume"  # interrupted
    (run / "checkpoints" / "a.pt").unlink()  # nothing to check the data against: a conflict
    (run / "results.json").write_text(json.dumps(
        {"experiment": "toy", "status": "finished", "config": {"lr": 0.1, "data_dir": "/a"}}))
    action, why = plan_point(run, {"lr": 0.1, "data_dir": "/b"})
    assert action == "conflict" and "data_dir" in why


# ---------------------------------------------------------------- local backend


def test_local_sweep_failure_kill_resume_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # steps=6 points meet at a barrier (only possible with 2 workers); cg's is killed at step 3.
    monkeypatch.setenv("SWEEPDUMMY_BARRIER", f"{barrier}:2")
    monkeypatch.setenv("SWEEPDUMMY_KILL", "method-cg__steps-6:3")
    argv = ["sweep", "sweepdummy", "--import", MODULE, "--grid", "method=rbp,cg",
            "--grid", "steps=6,0", "--set", "lr=0.3", "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "--workers", "2"]) == 1
    doc = read_json(out / "sweep.json")
    by = {p["name"]: p for p in doc["points"]}
    assert set(by) == {"method-rbp__steps-6", "method-rbp__steps-0", "method-cg__steps-6",
                       "method-cg__steps-0"}
    assert by["method-rbp__steps-6"]["status"] == "finished"
    for bad in ("method-rbp__steps-0", "method-cg__steps-0"):
        assert by[bad]["status"] == "failed"
        assert "steps must be at least 1" in by[bad]["error"]
    killed = by["method-cg__steps-6"]
    assert killed["status"] == "killed" and "SIGKILL" in killed["error"]
    assert read_json(out / "method-cg__steps-6" / "results.json")["status"] == "running"
    assert doc["status"] == "incomplete" and doc["counts"]["failed"] == 2
    finished_mtime = (out / "method-rbp__steps-6" / "results.json").stat().st_mtime_ns

    # Re-run: the finished point is skipped, the killed one resumes from its checkpoint.
    monkeypatch.delenv("SWEEPDUMMY_BARRIER")
    monkeypatch.delenv("SWEEPDUMMY_KILL")
    assert cli.main([*argv, "--workers", "2"]) == 1
    doc = read_json(out / "sweep.json")
    by = {p["name"]: p for p in doc["points"]}
    assert by["method-rbp__steps-6"]["action"] == "skip"
    assert (out / "method-rbp__steps-6" / "results.json").stat().st_mtime_ns == finished_mtime
    assert by["method-cg__steps-6"]["action"] == "resume"
    assert by["method-cg__steps-6"]["status"] == "finished"
    resumed = read_json(out / "method-cg__steps-6" / "results.json")
    assert resumed["resumed"] is True and resumed["status"] == "finished"

    # The same points run on their own, in this process, give the same numbers.
    single = {}
    for method in ("rbp", "cg"):
        run_dir = tmp_path / f"single-{method}"
        assert cli.main(["sweepdummy", "--method", method, "--set", "lr=0.3", "--set",
                         "steps=6", "--out", str(run_dir), "--no-progress"]) == 0
        single.update(read_json(run_dir / "results.json")["methods"])
    assert resumed["methods"]["cg"] == single["cg"]

    agg = aggregate(out)
    assert agg["experiment"] == "sweepdummy" and agg["keys"] == ["steps"]
    assert sorted(agg["incomplete"]) == ["method-cg__steps-0", "method-rbp__steps-0"]
    assert list(agg["results"]) == ["steps=6"]
    group = agg["results"]["steps=6"]
    assert group["values"] == {"steps": 6} and group["methods"] == single
    assert runs_matching(agg, steps=6) == [group] and runs_matching(agg, steps=5) == []


def test_conflicting_finished_run_and_summary_hook(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = _spec(out, grid={"method": ["rbp", "cg"]}, fixed={"steps": 3}, workers=2)
    seen: list[dict] = []
    register_summary("sweepdummy", lambda agg, d: seen.append(agg))
    try:
        doc = run_sweep(spec, show_progress=False)
    finally:
        register_summary("sweepdummy", lambda agg, d: None)
    assert doc["status"] == "finished"
    assert seen and set(seen[0]["results"]["all"]["methods"]) == {"rbp", "cg"}
    # Same point names, other fixed settings: the finished runs are not silently reused.
    changed = _spec(out, grid={"method": ["rbp", "cg"]}, fixed={"steps": 4})
    exp = cli.experiments()["sweepdummy"]
    point = expand_grid(changed)[0]
    action, why = plan_point(out / point.name, resolve_point(exp, point), force=False)
    assert action == "conflict" and "steps" in why and "--force" in why
    same = resolve_point(exp, expand_grid(spec)[0])
    assert plan_point(out / point.name, same)[0] == "skip"
    assert plan_point(out / point.name, same, force=True)[0] == "run"
    action, why = plan_point(out / point.name, same, experiment="other")
    assert action == "conflict" and "'sweepdummy', not 'other'" in why
    # The same settings spelled another way (a flag-style key, a default given) still match.
    other = _spec(out, grid={"method": ["rbp", "cg"]}, fixed={"--steps": 3, "lr": 0.2})
    settings = {"steps", "lr", "seed", "methods"}
    assert plan_point(out / point.name,
                      resolve_point(exp, expand_grid(other, settings)[0]))[0] == "skip"
    # And the sweep records the conflict as a failed point without running it.
    doc = run_sweep(changed, show_progress=False)
    assert doc["status"] == "incomplete"
    assert {p["action"] for p in doc["points"]} == {"conflict"}
    assert all("--force" in p["error"] for p in doc["points"])


def test_a_damaged_point_is_reported_then_redone_with_force(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = _spec(out, grid={"seed": [0]}, fixed={"steps": 3})
    assert run_sweep(spec, show_progress=False)["status"] == "finished"
    (out / "seed-0" / "results.json").write_text('{"experiment": "sweepd')  # cut off
    doc = run_sweep(spec, show_progress=False)  # checkpoints there: resume, which refuses
    (point,) = doc["points"]
    assert point["action"] == "resume" and point["status"] == "failed"
    assert "results.json" in point["error"] and "--force" in point["error"]
    doc = run_sweep(spec, force=True, show_progress=False)
    assert doc["status"] == "finished"
    assert read_json(out / "seed-0" / "results.json")["status"] == "finished"


def test_a_point_with_an_unreadable_results_file_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = _spec(out, grid={"seed": [0]}, fixed={"steps": 3, "checkpoint_every": 0})
    assert run_sweep(spec, show_progress=False)["status"] == "finished"
    for f in (out / "seed-0" / "checkpoints").glob("*.pt"):
        f.unlink()  # a finished run whose checkpoints were cleaned up
    (out / "seed-0" / "results.json").write_text("\x00garbage")
    (point,) = run_sweep(spec, show_progress=False)["points"]
    assert point["action"] == "conflict" and "cannot be read" in point["error"]
    assert (out / "seed-0" / "results.json").read_text() == "\x00garbage"
    assert run_sweep(spec, force=True, show_progress=False)["status"] == "finished"


def test_starting_is_logged_when_a_point_starts(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec(tmp_path / "s", grid={"seed": [0, 1, 2]}, fixed={"steps": 2}, workers=1)
    with caplog.at_level("INFO", logger="rbp"):
        assert run_sweep(spec, show_progress=False)["status"] == "finished"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("seed-")]
    order = [(ln.split(":")[0], ln.split(": ")[1].split()[0]) for ln in lines]
    assert order == [("seed-0", "starting"), ("seed-0", "finished"), ("seed-1", "starting"),
                     ("seed-1", "finished"), ("seed-2", "starting"), ("seed-2", "finished")]


def test_one_sweep_per_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rbp.runner.lock import RunLock

    out = tmp_path / "s"
    out.mkdir()
    held = RunLock(out, ["rbp", "sweep", "other"])  # a sweep running there now
    try:
        argv = ["sweep", "sweepdummy", "--import", MODULE, "--grid", "seed=0", "--out",
                str(out), "--no-progress"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "rbp sweep: error: another run" in err and str(out) in err
        assert not (out / "sweep.json").exists() and not (out / "seed-0").exists()
    finally:
        held.release()


# ---------------------------------------------------------------- Ray backend


def test_ray_backend(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        doc = run_sweep(_spec(out, grid={"method": ["rbp", "cg"]}, fixed={"steps": 4},
                              backend="ray"), show_progress=False)
    finally:
        ray.shutdown()
    assert doc["status"] == "finished" and doc["backend"] == "ray"
    agg = aggregate(out)
    assert set(agg["results"]["all"]["methods"]) == {"rbp", "cg"}
    for p in doc["points"]:
        res = read_json(out / p["path"] / "results.json")
        assert res["status"] == "finished" and res["experiment"] == "sweepdummy"


def test_sigterm_stops_the_sweep_and_its_runs(tmp_path: Path) -> None:
    out, barrier = tmp_path / "s", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "SWEEPDUMMY_BARRIER": f"{barrier}:99"}  # the runs wait forever
    code = "import sys; from rbp.runner.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "sweep", "sweepdummy", "--import", MODULE, "--grid",
         "seed=0,1,2", "--workers", "2", "--out", str(out), "--no-progress"],
        env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    doc = read_json(out / "sweep.json")
    assert doc["status"] == "interrupted"
    assert [p["status"] for p in doc["points"]] == ["interrupted", "interrupted", "pending"]
    for name in ("seed-0", "seed-1"):
        assert read_json(out / name / "results.json")["status"] == "interrupted"


def test_sigterm_to_a_single_run_records_it_and_resume_continues(tmp_path: Path) -> None:
    out, barrier = tmp_path / "run", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "SWEEPDUMMY_BARRIER": f"{barrier}:2"}  # waits: nobody else comes
    code = (f"import sys, {MODULE}; from rbp.runner.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "sweepdummy", "--out", str(out),
                             "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(barrier.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err, err
    assert read_json(out / "results.json")["status"] == "interrupted"
    assert cli.main(["sweepdummy", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert read_json(out / "results.json")["status"] == "finished"


def test_command_names_are_reserved() -> None:
    from rbp.runner import Experiment, register

    for name in ("list", "sweep", "report"):
        with pytest.raises(ValueError, match="reserved"):
            register(Experiment(name=name, help="", config_cls=SweepSpec, run=lambda c, x: {}))


def test_spec_values_must_have_their_own_type(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    for text in ('quick: "no"', "quick: 0", 'fixed: {quick: "false"}',
                 "grid: {quick: [true, 'no']}", "quick: no\nquick: yes"):
        path.write_text(f"experiment: sweepdummy\nimports: [{MODULE}]\n{text}\n")
        with pytest.raises(ValueError, match="'quick:?' .*true or false|given twice"):
            load_spec(path)
        assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert "error:" in capsys.readouterr().err
    for text, match in (("workers: 2.7", "'workers:' .* a whole number, got 2.7"),
                        ("workers: true", "a whole number, got True"),
                        ("workers: '4'", "a whole number, got '4'"),
                        ("cpus_per_run: yes", "'cpus_per_run:' .* a number, got True"),
                        ("backend: 3", "'backend:' .* text, got 3")):
        path.write_text(f"experiment: sweepdummy\n{text}\n")
        with pytest.raises(ValueError, match=match):
            load_spec(path)
    path.write_text("experiment: 5\n")
    with pytest.raises(ValueError, match="'experiment:' .* text, got 5"):
        load_spec(path)
    path.write_text(f"experiment: sweepdummy\nimports: [{MODULE}]\nquick: no\n")  # YAML false
    assert load_spec(path).quick is False
    assert not (tmp_path / "o").exists()


def test_progress_line_counts_interrupted_points_apart_from_failed_ones() -> None:
    from rbp.runner.sweep.run import _progress_line

    records = [{"status": s, "action": "run"}
               for s in ("finished", "interrupted", "failed", "running", "pending")]
    line = _progress_line(records, [10.0], workers=2)
    assert line == ("1/5 done (0 skipped), 1 running, 1 failed, 1 interrupted, ETA 10s")
    assert "interrupted" not in _progress_line(records[:1], [], workers=1)


def test_stop_processes_waits_for_a_run_to_save_and_kills_one_that_does_not(
        caplog: pytest.LogCaptureFixture) -> None:
    """SIGINT first (a run that handles it ends by itself); one that ignores it is killed after
    the grace period, and a second interrupt while waiting kills at once."""
    from rbp.runner.sweep.launch import stop_processes

    code = ("import signal, sys, time; signal.signal(signal.SIGINT, {}); "
            "print('ready', flush=True); time.sleep(30)")
    polite = subprocess.Popen([sys.executable, "-c", code.format("lambda *a: sys.exit(7)")],
                              stdout=subprocess.PIPE)
    stubborn = subprocess.Popen([sys.executable, "-c", code.format("signal.SIG_IGN")],
                                stdout=subprocess.PIPE)
    for proc in (polite, stubborn):
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    start = time.monotonic()
    with caplog.at_level("INFO"):
        stop_processes([polite, stubborn], grace=1.0)
    assert polite.returncode == 7 and stubborn.returncode == -signal.SIGKILL
    assert 0.9 < time.monotonic() - start < 10
    assert "stopping 2 run(s): each saves the step under way" in caplog.text

    class Impatient:  # the user presses Ctrl-C again while the runs save
        def __init__(self) -> None:
            self.killed = False

        def poll(self) -> int | None:
            return -9 if self.killed else None

        def send_signal(self, sig: int) -> None:
            pass

        def wait(self, timeout: float | None = None) -> int:
            if not self.killed:
                raise KeyboardInterrupt
            return -9

        def kill(self) -> None:
            self.killed = True

    proc = Impatient()
    start = time.monotonic()
    stop_processes([proc], grace=60.0)  # type: ignore[list-item]
    assert proc.killed and time.monotonic() - start < 5
