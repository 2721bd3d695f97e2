"""Tests of the shared experiment runner with a tiny dummy experiment."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rbp.runner import (
    ConfigError,
    Experiment,
    RunContext,
    RunExistsError,
    cli,
    image_grid,
    line_plot,
    load_checkpoint,
    load_config,
    method_colors,
    multi_panel,
    prepare_run_dir,
    progress,
    read_json,
    register,
    registry,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    unregister,
    write_json,
)

DEFAULT_YAML = """\
steps: 20
lr: 0.1
quick:
  steps: 6
"""


@dataclass
class DummyConfig:
    methods: list[str] = field(default_factory=lambda: ["rbp", "cg"])
    seed: int = 0
    steps: int = 10
    lr: float = 0.2
    target: float = 3.0
    noise: float = 0.05
    checkpoint_every: int = 5
    interrupt_after: int | None = None
    tags: list[int] = field(default_factory=list)
    label: str | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")


def dummy_run(cfg: DummyConfig, ctx: RunContext) -> dict[str, Any]:
    """'Train' a noisy scalar per method, checkpointing and resuming like a real app."""
    done: dict[str, Any] = {}
    for method in cfg.methods:
        state = ctx.load(method)
        if state is not None and state.get("done"):
            done[method] = state["result"]
            continue
        w, step, losses = torch.zeros(()), 0, []
        if state is not None:
            w, step, losses = state["w"], state["step"], state["losses"]
            set_rng_state(state["rng"])
        with progress(cfg.steps, desc=method, enabled=ctx.progress, initial=step) as bar:
            while step < cfg.steps:
                w = w - cfg.lr * 2 * (w - cfg.target) + cfg.noise * torch.randn(())
                step += 1
                losses.append(float((w - cfg.target) ** 2))
                bar.update()
                bar.set_postfix(loss=losses[-1])
                if ctx.should_checkpoint(step):
                    ctx.save(method, {"w": w, "step": step, "losses": losses,
                                      "rng": rng_state()})
                ctx.tick()
        result = {"w": float(w), "losses": losses, "undefined": float("nan")}
        ctx.save(method, {"done": True, "result": result})
        done[method] = result
        ctx.write_results({"methods": done, "steps": cfg.steps})
    return {"methods": done, "steps": cfg.steps}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps")


@pytest.fixture(scope="module")
def default_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "dummy.yaml"
    path.write_text(DEFAULT_YAML)
    return path


@pytest.fixture(scope="module", autouse=True)
def dummy_experiment(default_yaml: Path):
    exp = register(Experiment(
        name="dummy", help="a scalar toy", config_cls=DummyConfig, run=dummy_run,
        add_arguments=_add_arguments, flag_to_key={"steps": "steps"},
        methods=("rbp", "cg", "neumann"), default_config=default_yaml,
    ))
    yield exp
    unregister("dummy")


def _run(out: Path, *extra: str) -> int:
    return cli.main(["dummy", "--out", str(out), "--no-progress", *extra])


# ---------------------------------------------------------------- settings


def _load(default_yaml: Path, overrides=(), quick=False, config_file=None, values=None):
    return load_config(DummyConfig, default_yaml, config_file, list(overrides), quick, values)


def test_defaults_and_quick(default_yaml: Path) -> None:
    assert _load(default_yaml).steps == 20
    assert _load(default_yaml, quick=True).steps == 6
    assert _load(None).steps == 10  # dataclass defaults only


def test_unknown_key_suggests_close_match(default_yaml: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(default_yaml, ["stepz=3"])
    msg = str(err.value)
    assert "unknown setting 'stepz'" in msg and "did you mean 'steps'" in msg
    assert "valid settings:" in msg and "checkpoint_every" in msg


def test_wrong_types(default_yaml: Path) -> None:
    with pytest.raises(ConfigError, match=r"'steps'.*expects int.*'ten'"):
        _load(default_yaml, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"expects int, got True \(bool\)"):
        _load(default_yaml, ["steps=true"])
    with pytest.raises(ConfigError, match=r"list\[int\]"):
        _load(default_yaml, ["tags=[1, x]"])
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        _load(default_yaml, ["steps=0"])


def test_set_parsing(default_yaml: Path) -> None:
    cfg = _load(default_yaml, ["lr=1", "target=1e-3", "tags=[1, 2]", "label=null",
                               "methods=rbp,cg", "interrupt_after=4"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.target == 1e-3
    assert cfg.tags == [1, 2] and cfg.label is None and cfg.interrupt_after == 4
    assert cfg.methods == ["rbp", "cg"]
    assert _load(default_yaml, ["tags=7", "label=x=y"]).tags == [7]
    assert _load(default_yaml, ["label=x=y"]).label == "x=y"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _load(default_yaml, ["steps"])


def test_config_file_precedence(default_yaml: Path, tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("steps: 11\nlr: 0.5\nquick:\n  lr: 0.25\n")
    cfg = _load(default_yaml, ["steps=12"], config_file=user)
    assert (cfg.steps, cfg.lr) == (12, 0.5)
    cfg = _load(default_yaml, ["steps=12"], quick=True, config_file=user, values={"steps": 13})
    assert (cfg.steps, cfg.lr) == (13, 0.25)
    with pytest.raises(FileNotFoundError):
        _load(default_yaml, config_file=tmp_path / "missing.yaml")


# ---------------------------------------------------------------- files


def test_json_is_strict(tmp_path: Path) -> None:
    obj = {"nan": float("nan"), "inf": -math.inf, "f32": np.float32(1.5), "i64": np.int64(3),
           "arr": np.array([1.0, np.nan]), "t": torch.tensor([2.0, math.inf]), "p": tmp_path}
    path = tmp_path / "r.json"
    write_json(path, obj)

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["nan"] is None and data["inf"] is None and data["f32"] == 1.5
    assert data["arr"] == [1.0, None] and data["t"] == [2.0, None] and data["i64"] == 3
    assert read_json(path) == data
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left


def test_checkpoint_and_rng_roundtrip(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none.pt") is None
    seed_everything(1)
    state = rng_state()
    first = (torch.rand(3), np.random.rand(), __import__("random").random())
    save_checkpoint(tmp_path / "c.pt", {"rng": state, "x": torch.ones(2)})
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_prepare_run_dir(tmp_path: Path) -> None:
    out = prepare_run_dir(tmp_path / "run", resume=False, force=False)
    write_json(out / "results.json", {"status": "finished"})
    with pytest.raises(RunExistsError, match="--force"):
        prepare_run_dir(out, resume=False, force=False)
    prepare_run_dir(out, resume=False, force=True)
    assert not (out / "results.json").exists()
    save_checkpoint(out / "checkpoints" / "a.pt", {})
    with pytest.raises(RunExistsError, match="--resume"):
        prepare_run_dir(out, resume=False, force=False)
    prepare_run_dir(out, resume=True, force=False)
    prepare_run_dir(out, resume=False, force=True)
    assert not (out / "checkpoints").exists()


def test_plots_write_png(tmp_path: Path) -> None:
    series = {"rbp": ([0, 1, 2], [1.0, 0.1, 0.01]), "mine": ([0, 1, 2], [1.0, 0.5, float("nan")])}
    paths = [
        line_plot(tmp_path / "a.png", series, "step", "loss", "toy", logy=True),
        multi_panel(tmp_path / "b.png", [{"series": series, "title": "p1", "logy": True},
                                         {"series": {"cg": ([0, 1], [2, 3])}}], ncols=2),
        image_grid(tmp_path / "c.png", [("clean", [np.eye(4), np.ones((4, 4))]),
                                        ("noisy", [torch.rand(4, 4)])], title="grid"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    colors = method_colors(["other", "RBP", "cg"])
    assert colors["RBP"] == method_colors(["rbp"])["rbp"] != colors["cg"]
    assert colors["other"] not in (colors["RBP"], colors["cg"])


# ---------------------------------------------------------------- command line


def test_list_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    assert "dummy" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("rbp ")


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path / "r", "--set", "stepz=3") == 2
    err = capsys.readouterr().err
    assert "rbp dummy: error: unknown setting 'stepz'" in err and "Traceback" not in err
    assert _run(tmp_path / "r", "--method", "rbp,neuman") == 2
    assert "did you mean 'neumann'" in capsys.readouterr().err
    assert _run(tmp_path / "r", "--config", str(tmp_path / "nope.yaml")) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing created before the settings are valid


def test_flags_and_methods(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert _run(out, "--quick", "--method", "all", "--seed", "3", "--set", "steps=9",
                "--steps", "4") == 0
    res = read_json(out / "results.json")
    assert res["status"] == "finished" and res["quick"] is True
    assert res["config"]["seed"] == 3 and res["steps"] == 4
    assert list(res["methods"]) == ["rbp", "cg", "neumann"]
    assert res["methods"]["rbp"]["undefined"] is None
    assert "torch" in res["machine"] and res["wall_time_s"] >= 0


def test_run_dir_protection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert _run(out, "--quick") == 0
    assert _run(out, "--quick") == 2
    assert "finished run" in capsys.readouterr().err
    assert _run(out, "--quick", "--force") == 0


def test_resume_matches_uninterrupted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(full) == 0
    # Interrupt in the second method at its step 7 (last checkpoint at step 5).
    assert _run(cut, "--set", "interrupt_after=27") == 130
    assert "--resume" in capsys.readouterr().err
    partial = read_json(cut / "results.json")
    assert partial["status"] == "interrupted" and list(partial["methods"]) == ["rbp"]
    assert _run(cut) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _run(cut, "--resume") == 0
    a, b = read_json(full / "results.json"), read_json(cut / "results.json")
    assert b["status"] == "finished" and b["resumed"] is True
    assert a["methods"] == b["methods"]
    assert len(b["methods"]["cg"]["losses"]) == 20


def test_app_import_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "APP_MODULES", ("rbp.apps.no_such_app",))
    assert "dummy" in cli.experiments()
    pkg = tmp_path / "broken_app_xyz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "APP_MODULES", ("broken_app_xyz",))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.experiments()
