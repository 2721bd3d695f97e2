"""The ``rbp`` command line: lazy start-up, first line, KEY=VALUE settings, data location,
``--dry-run`` and concise log lines."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbp.runner import cli, read_json, register, unregister
from rbp.runner.config import DATA_DIR_ENV
from rbp.runner.registry import Experiment


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _rbp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rbp.runner.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


HEAVY = ("rbp.apps", "rbp.runner.lifecycle", "rbp.runner.lock", "rbp.runner.resume",
         "rbp.runner.checkpoint", "rbp.runner.results", "rbp.runner.sweep", "rbp.runner.report",
         "matplotlib", "scipy", "sklearn")


@pytest.mark.parametrize("argv", [["--help"], ["list"], []])
def test_help_and_list_import_no_application(argv: list[str]) -> None:
    code = f"""
import sys
import rbp
core = 'torch' in sys.modules
before = set(sys.modules)
from rbp.runner import cli
try:
    code = cli.main({argv!r})
except SystemExit as exc:
    code = exc.code
new = sorted(set(sys.modules) - before)
heavy = [m for m in new if m.startswith({HEAVY!r}) or (not core and m == 'torch')]
print('CODE', code, 'TORCH_AFTER_IMPORT_RBP', core, 'HEAVY', heavy)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("HEAVY []"), last
    assert "TORCH_AFTER_IMPORT_RBP False" in last, "import rbp must not import torch (lazy names)"
    text = proc.stdout + proc.stderr
    names = ("hopfield", "citation", "hyperopt") + (("sweep", "report") if argv != ["list"]
                                                    else ())
    for name in names:
        assert name in text


def test_first_line_comes_before_loading_and_dry_run_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    proc = _rbp("hopfield", "--dry-run", "--out", str(out), env={DATA_DIR_ENV: ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == "rbp hopfield: loading torch and the experiment ..."
    assert "settings are valid" in proc.stdout and "data: " in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("how", ["flag", "env", "set"])
def test_dry_run_checks_the_data_location(tmp_path: Path, how: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["hopfield", "--dry-run", "--out", str(tmp_path / "o")]
    env = {DATA_DIR_ENV: ""}
    if how == "flag":
        args += ["--data-dir", str(empty)]
    elif how == "env":
        env = {DATA_DIR_ENV: str(empty)}
    else:
        args += [f"data_dir={empty}"]
    proc = _rbp(*args, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(empty) in proc.stderr and "(missing)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_of_citation_flags_data_that_needs_a_download(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _rbp("citation", "--dry-run", "--dataset", "pubmed", "--data-dir", str(empty),
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "pubmed: not found" in proc.stderr, proc.stderr


@dataclass
class KvConfig:
    seed: int = 0
    steps: int = 3
    lr: float = 0.5
    label: str = "x"


def _kv_run(cfg: KvConfig, ctx: Any) -> dict[str, Any]:
    return {"steps": cfg.steps, "lr": cfg.lr}


@pytest.fixture
def kv_experiment():
    register(Experiment(name="kvtoy", help="x", config_cls=KvConfig, run=_kv_run))
    yield
    unregister("kvtoy")


def test_key_value_settings_everywhere(tmp_path: Path, kv_experiment: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert cli.main(["kvtoy", "--out", str(out), "steps=7", "--set", "lr=0.25",
                     "label=a=b", "--no-progress"]) == 0
    res = read_json(out / "results.json")
    assert (res["steps"], res["lr"], res["config"]["label"]) == (7, 0.25, "a=b")
    assert cli.main(["kvtoy", "--out", str(tmp_path / "s"), "stepz=7"]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert cli.main(["kvtoy", "--out", str(tmp_path / "t"), "--data-dir", "x"]) == 2
    assert "has no setting 'data_dir'" in capsys.readouterr().err


def test_unknown_command_lists_the_experiments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hopfeld"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "hopfield" in err


def test_log_lines_are_formatted() -> None:
    from rbp.apps.hopfield.experiment import _summary_line

    base = {"final_val_l1": 0.5134511590003967, "final_val_l1_binary": 0.0774,
            "untrained_val_l1": 0.2177, "untrained_val_l1_binary": 0.1946, "steps_done": 40,
            "diverged_at": None, "divergence": None, "wall_time_s": 12.3456}
    line = _summary_line("rbp", base)
    assert line == ("rbp: validation L1 0.2177 untrained -> 0.5135, retrieval error "
                    "(binarised) 0.1946 untrained -> 0.0774 after 40 steps (12.3 s)")
    blown = _summary_line("rbp", {**base, "final_val_l1": None, "final_val_l1_binary": None,
                                  "diverged_at": 7, "divergence": "non-finite gradient"})
    assert "None" not in blown and "blew up at step 7 (non-finite gradient)" in blown
    assert "0.2177 untrained -> no finite value" in blown


def test_dry_run_checks_each_datasets_own_data_dir(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    nope = tmp_path / "nope"
    base = ["citation", "--dry-run", "--dataset", "cora", "--out", str(tmp_path / "o")]
    assert cli.main(base) == 0, capsys.readouterr().err  # the shipped Cora
    capsys.readouterr()
    assert cli.main([*base, "--set", f"overrides={{cora: {{data_dir: {nope}}}}}"]) == 2
    err = capsys.readouterr().err
    assert f"{nope} does not exist" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_data_problem_shared_by_the_datasets_is_said_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    argv = ["citation", "--dry-run", "--dataset", "cora", "pubmed", "--data-dir", "",
            "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2   # --dataset takes one name: the second reads as a setting
    err = capsys.readouterr().err
    assert "got 'pubmed'; a list is one value, as in dataset=[cora,pubmed]" in err, err
    argv[2:5] = ["dataset=[cora,pubmed]"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("data directory is an empty string") == 1, err
    assert not (tmp_path / "o").exists()


def test_dry_run_into_a_locked_folder_is_not_ready(tmp_path: Path, kv_experiment: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from rbp.runner.lock import RunLock

    out = tmp_path / "r"
    out.mkdir()
    lock = RunLock(out, ["rbp", "kvtoy"])
    try:
        assert cli.main(["kvtoy", "--dry-run", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert "another run (pid" in captured.err and "ready" not in captured.out
    finally:
        lock.release()
    assert cli.main(["kvtoy", "--dry-run", "--out", str(out)]) == 0
    assert "ready to run" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "hint"), [
    (["kvtoy", "--quik"], "did you mean --quick?"),
    (["kvtoy", "--methods", "rbp"], "did you mean --method?"),
    (["kvtoy", "--dry_run"], "did you mean --dry-run?"),
    (["report", ".", "--otu", "x.html"], "did you mean --out?"),
    (["sweep", "kvtoy", "--workrs", "2"], "did you mean --workers?"),
])
def test_an_unknown_option_gets_the_closest_one(argv: list[str], hint: str, kv_experiment: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and hint in err, err
    assert f"rbp {argv[0]}: error:" in err  # the command's own usage and name


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "rbp.runner", "sweep", "hopfield", "--grid",
                             "seed=" + ",".join(map(str, range(40))), "--dry-run", "--out",
                             str(tmp_path / "s")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141
