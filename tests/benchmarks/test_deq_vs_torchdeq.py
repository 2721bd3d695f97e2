"""benchmarks/deq_vs_torchdeq.py: its options' errors (no TorchDEQ needed), the line count of the
user code, and a --quick smoke run (skipped without TorchDEQ, the ``peers`` extra)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "deq_vs_torchdeq.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("deq_vs_torchdeq", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deq_vs_torchdeq"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    return _load()


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--epochs", "two"], ["--epochs", "1.5"], ["--threads", "0"],
    ["--threads", "-1"], ["--seed", "-1"], ["--seed", "x"], ["--no-such-option"],
    ["--probe", "jax"], ["--quick", "yes"], ["--seed", str(2**64)],
])
def test_bad_options_are_argparse_errors(bench: Any, argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults(bench: Any) -> None:
    args = bench.parse_args([])
    assert (args.epochs, args.quick, args.threads, args.device, args.seed) == (3, False, 1,
                                                                             "cpu", 0)
    assert args.probe is None


def test_quick_takes_one_epoch_unless_epochs_is_given(bench: Any) -> None:
    """``--quick --epochs 2`` trains 2 epochs (it silently trained 1)."""
    assert bench.parse_args(["--quick"]).epochs == 1
    assert bench.parse_args(["--quick", "--epochs", "2"]).epochs == 2


def test_out_that_is_a_file_exits_2_before_any_work(
    bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torchdeq" else find_spec(name, *a))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--out", str(afile)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deq_vs_torchdeq: error: --out {afile} is a file, not a folder; pass a "
                   "folder that can be written"]
    assert afile.read_text() == "keep"


def test_unknown_device_is_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cuad", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuad" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_device_exits_2(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0]


def test_missing_torchdeq_exits_2(bench: Any, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchdeq" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchdeq is not installed" in err[0] and "peers" in err[0]
    assert not (tmp_path / "bench.json").exists()


def test_user_code_lines(bench: Any) -> None:
    lines = bench.user_code_lines()
    assert set(lines) == {"rbp", "torchdeq"}
    assert all(10 < n < 80 for n in lines.values())


def test_quick_smoke(bench: Any, tmp_path: Path) -> None:
    pytest.importorskip("torchdeq", reason="TorchDEQ (the peers extra) is not installed")
    threads = torch.get_num_threads()
    bench.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    result = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "table.md").read_text()
    assert result["settings"]["quick"] is True and result["settings"]["epochs"] == 1
    assert result["settings"]["train_digits"] == 400 and result["settings"]["test_digits"] == 100
    for lib in ("rbp", "torchdeq"):
        s = result["libraries"][lib]
        assert len(s["epochs"]) == 1 and 0.0 <= s["final_test_accuracy"] <= 1.0
        assert s["wall_s_per_epoch"] > 0 and s["cpu_s_per_epoch"] > 0
        assert 2 <= s["f_calls_per_batch"] <= 61
        assert s["vjps_per_batch"] >= 2  # a backward iteration and the parameters' product
        assert s["saved_forward_mib"] > 0
        assert s["peak_rss_mib"] > 0, s["rss_probe"]
        assert s["user_lines"] > 0
    assert "| final test accuracy |" in table and "rbp / TorchDEQ" in table
    assert set(result["ratios_rbp_over_torchdeq"]) >= {"wall_s_per_epoch", "user_lines"}
