"""Smoke test of benchmarks/core_bench.py: its --quick mode, in process, on tiny sizes; and the
--device option of core_bench.py and forward_bench.py (an unavailable device: of every script
that imports core_bench)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "core_bench.py"
FORWARD = BENCH.with_name("forward_bench.py")
ROW_KEYS = {"problem", "dtype", "method", "family", "K", "T", "rel_err_W", "rel_err_x",
            "time_ms", "times_ms", "cpu_ms", "cpu_ratio_vs_hand", "saved_kib",
            "saved_total_kib", "bwd_saved_kib", "n_f", "n_vjp", "ratio_vs_hand", "note"}
OURS = ("rbp.bptt", "rbp.tbptt", "rbp.rbp", "rbp.cg", "rbp.neumann", "rbp.gmres", "hand.neumann")


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("core_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["core_bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    return _load_bench()


@pytest.fixture(scope="module")
def quick(bench: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("core_bench")
    try:
        bench.main(["--quick", "--problems", "rnn", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "bench.json").read_text())


def _rows(result: dict[str, Any], method: str) -> dict[int | None, dict[str, Any]]:
    return {r["K"]: r for r in result["rows"] if r["method"] == method}


def test_json_fields(quick: dict[str, Any]) -> None:
    assert {"settings", "versions", "machine", "problems", "rows", "skipped", "overhead",
            "wall_time_s", "command"} <= set(quick)
    assert quick["settings"]["quick"] is True
    assert quick["settings"]["threads"] == 1
    assert quick["settings"]["device"] == "cpu" and "gpu" not in quick["settings"]
    problem = quick["problems"]["rnn"]
    assert problem["exact_residual"] <= 1e-12
    assert 0 < problem["rho_J"] < 1
    for row in quick["rows"]:
        assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
        assert row["time_ms"] > 0 and len(row["times_ms"]) == 1
        assert math.isfinite(row["rel_err_W"]) and math.isfinite(row["rel_err_x"])
    assert set(quick["overhead"]) == {f"rnn/float64/K={k}" for k in quick["settings"]["K"]}
    paired = quick["overhead_paired"]
    assert {(o["problem"], o["K"]) for o in paired} == {
        (name, k) for name in ("rnn", "rnn-tiny") for k in quick["settings"]["K"]
    }
    for o in paired:
        assert o["pairs"] >= 1 and o["paired_ratio"] > 0 and o["paired_cpu_ratio"] > 0
        assert o["rbp_cpu_fwd_ms"] > 0 and o["hand_cpu_bwd_ms"] > 0


def test_rbp_gradients_are_accurate(quick: dict[str, Any]) -> None:
    steps = quick["settings"]["T"]
    k_small, k_large = quick["settings"]["K"]
    for method in OURS:
        assert _rows(quick, method), f"{method} missing"
    # BPTT through a settled forward is the implicit gradient up to the forward's residual.
    assert _rows(quick, "rbp.bptt")[None]["rel_err_W"] < 1e-3
    for method in ("rbp.tbptt", "rbp.rbp", "rbp.cg", "rbp.neumann", "rbp.gmres"):
        rows = _rows(quick, method)
        for err in ("rel_err_W", "rel_err_x"):
            assert rows[k_large][err] < 0.05, (method, rows[k_large])
            assert rows[k_large][err] < rows[k_small][err], method
    # Same maths, same numbers: rbp's Neumann is the hand-written loop; RBP from zeros is TBPTT.
    for k in (k_small, k_large):
        hand, ours = _rows(quick, "hand.neumann")[k], _rows(quick, "rbp.neumann")[k]
        assert ours["rel_err_W"] == pytest.approx(hand["rel_err_W"], rel=1e-9)
        assert ours["n_vjp"] == hand["n_vjp"] == k + 1
        tb, rb = _rows(quick, "rbp.tbptt")[k], _rows(quick, "rbp.rbp")[k]
        assert rb["rel_err_W"] == pytest.approx(tb["rel_err_W"], rel=1e-3)
    for method in OURS:
        for row in _rows(quick, method).values():
            assert row["n_f"] == steps
    # Memory: the implicit methods keep one step, BPTT all of them.
    bptt_saved = _rows(quick, "rbp.bptt")[None]["saved_kib"]
    for method in ("rbp.rbp", "rbp.neumann", "rbp.gmres", "rbp.cg"):
        assert _rows(quick, method)[k_large]["saved_kib"] < bptt_saved / 10


def test_torchdeq_rows(quick: dict[str, Any]) -> None:
    pytest.importorskip("torchdeq")
    for k in quick["settings"]["K"]:
        deq = _rows(quick, "torchdeq.fixed_point_iter")[k]
        # Its backward iterates z <- J^T z + g from zeros K times: rbp's "rbp" with zeros.
        assert deq["rel_err_W"] == pytest.approx(_rows(quick, "rbp.rbp")[k]["rel_err_W"],
                                                 rel=1e-3)
        assert deq["n_vjp"] == k
    for method in ("torchdeq.anderson", "torchdeq.broyden"):
        assert all(math.isfinite(r["rel_err_W"]) for r in _rows(quick, method).values())


def test_torchopt_rows(quick: dict[str, Any]) -> None:
    pytest.importorskip("torchopt")
    for k in quick["settings"]["K"]:
        ns = _rows(quick, "torchopt.ns")[k]
        assert ns["rel_err_W"] == pytest.approx(_rows(quick, "rbp.neumann")[k]["rel_err_W"],
                                                rel=1e-3)
        normal_cg = _rows(quick, "torchopt.normal_cg")[k]
        assert normal_cg["rel_err_W"] == pytest.approx(_rows(quick, "rbp.cg")[k]["rel_err_W"],
                                                       rel=1e-3)


def test_missing_peers_are_skipped_with_a_note(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "torchopt", None)
    threads = torch.get_num_threads()
    try:
        result = bench.run(quick=True, repeats=1, steps=30, ks=[3], problems=["rnn"],
                           counts=False, pairs=0)
    finally:
        torch.set_num_threads(threads)
    families = {r["family"] for r in result["rows"]}
    assert families == {"rbp", "baseline"}
    skipped = {s["method"]: s["reason"] for s in result["skipped"]}
    assert {m.name for m in bench.METHODS if m.requires} == set(skipped)
    assert all("not installed" in reason for reason in skipped.values())
    assert "skipped torchdeq.anderson" in bench.format_table(result)


def test_overhead_only_runs_the_small_problem_and_writes_json(bench: Any, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        bench.main(["--overhead-only", "--quick", "--pairs", "2", "--problems", "rnn", "gru",
                    "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "overhead.json").read_text())
    assert not (tmp_path / "bench.json").exists()
    plain, unchecked = result["overhead_target"]
    assert plain["problem"] == "rnn-128x16" and (plain["T"], plain["K"]) == (50, 20)
    assert plain["dtype"] == "float32" and plain["pairs"] == 2
    assert unchecked["rbp_kwargs"] == {"max_backward_error": "None"}
    for o in (plain, unchecked):
        assert o["paired_cpu_ratio"] > 0 and math.isfinite(o["paired_cpu_ratio"])
        assert o["hand_cpu_fwd_ms"] > 0 and o["rbp_cpu_bwd_ms"] > 0
    full = result["overhead_paired"]  # the named problems in both dtypes, at T = 100, K = 20
    assert [(o["problem"], o["dtype"]) for o in full] == [
        ("rnn", "float32"), ("rnn", "float64"), ("gru", "float32"), ("gru", "float64")]
    assert all((o["T"], o["K"], o["pairs"]) == (100, 20, 3) for o in full)
    assert all(o["paired_cpu_ratio"] > 0 for o in full)


# --------------------------------------------------------------------------- --device


@pytest.fixture(scope="module")
def forward(bench: Any) -> Any:
    """benchmarks/forward_bench.py, importing the core_bench module loaded above."""
    return _load_beside("forward_bench")


def _load_beside(name: str) -> Any:
    """benchmarks/<name>.py (after core_bench is loaded: the scripts import it)."""
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
    return module


def _tiny_core(bench: Any, out: Path, device: str) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--device", device, "--problems", "rnn", "--repeats", "1",
                    "--steps", "30", "--k", "3", "10", "--pairs", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "bench.json").read_text())


def _tiny_forward(forward: Any, monkeypatch: pytest.MonkeyPatch, out: Path,
                  device: str) -> dict[str, Any]:
    """forward_bench --quick on its first problem (the tanh RNN) only."""
    build = forward.problems
    monkeypatch.setattr(forward, "problems", lambda *a, **kw: build(*a, **kw)[:1])
    threads = torch.get_num_threads()
    try:
        forward.main(["--quick", "--device", device, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "bench.json").read_text())


def test_cast_moves_a_problem_with_fresh_leaves(bench: Any) -> None:
    p = bench.make_rnn(6, 3, 4, 0)
    assert p.on(torch.float64, torch.device("cpu")) is p  # the default path: no copy
    q = p.cast(torch.float32, "cpu")
    assert q.device == torch.device("cpu") and q.h0.dtype == q.target.dtype == torch.float32
    for a, b in zip(p.args, q.args, strict=True):
        assert b.is_leaf and b.requires_grad and b is not a and b.dtype == torch.float32
        assert torch.equal(b.detach(), a.detach().float())
    assert p.on(torch.float32, torch.device("cpu")) is not p


def test_core_bench_device_cpu_quick_records_the_device(
    bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _tiny_core(bench, tmp_path, "cpu")
    assert result["settings"]["device"] == "cpu" and "gpu" not in result["settings"]
    assert "--device cpu" in result["command"]
    assert capsys.readouterr().out.splitlines()[0] == "device: cpu, torch threads 1"
    for row in result["rows"]:  # on the CPU both clocks are recorded
        assert row["cpu_ms"] > 0 and math.isfinite(row["rel_err_W"])
    for o in result["overhead_paired"]:
        assert o["paired_cpu_ratio"] > 0 and o["extra_us_per_call"] is not None


def test_forward_bench_device_cpu_quick_records_the_device(
    forward: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = _tiny_forward(forward, monkeypatch, tmp_path, "cpu")
    assert result["settings"] == {"device": "cpu"}
    assert capsys.readouterr().out.splitlines()[0] == "device: cpu, torch threads 1"
    assert {r["problem"] for r in result["rows"]} == {"rnn"}
    assert all(r["time_ms"] > 0 for r in result["rows"])


def _unavailable_devices() -> list[str]:
    out = ["nosuch", "cuda:99"]
    if not torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        out.append("mps")
    return out


@pytest.mark.parametrize("device", _unavailable_devices())
@pytest.mark.parametrize("script", ["core_bench", "forward_bench", "shine_bench",
                                    "second_order_bench", "citation_gradients"])
def test_unavailable_device_exits_2_with_one_line(
    bench: Any, forward: Any, script: str, device: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = {"core_bench": bench, "forward_bench": forward}.get(script) or _load_beside(script)
    with pytest.raises(SystemExit) as exc:
        module.main(["--quick", "--device", device, "--out", str(tmp_path)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), lines
    assert f"'{device}'" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before any work


def test_off_the_cpu_only_wall_time_is_recorded_and_shown(
    bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's bookkeeping, exercised on the CPU: no process CPU time, wall-time tables."""
    monkeypatch.setattr(bench, "host_clock", lambda device: False)
    threads = torch.get_num_threads()
    try:
        result = bench.run(quick=True, repeats=1, steps=30, ks=[3], problems=["rnn"],
                           counts=False, pairs=1)
    finally:
        torch.set_num_threads(threads)
    for row in result["rows"]:
        assert row["time_ms"] > 0 and row["cpu_ms"] is None and row["cpu_ratio_vs_hand"] is None
    for o in result["overhead_paired"] + result["overhead_target"]:
        assert o["paired_ratio"] > 0 and o["rbp_fwd_ms"] > 0 and o["extra_us_per_call"]
        assert o["paired_cpu_ratio"] is None and o["extra_cpu_us_per_call"] is None
        assert o["rbp_cpu_fwd_ms"] is None and o["hand_cpu_total_ms"] is None
    result["settings"].update(device="cuda:0", gpu="Some GPU")
    table = bench.format_table(result)
    assert table.splitlines()[0] == ("device: cuda:0 (Some GPU), torch threads 1; wall time "
                                     "only (process CPU time misses GPU work)")
    assert "alternating calls (medians; wall ms)" in table and "paired wall ratio" in table
    assert "| rnn | float64 | rbp.neumann | 3 |" in table


def test_cuda_timers_synchronize_the_device(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", calls.append)
    bench.synchronize(torch.device("cpu"))
    assert calls == []
    bench.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_mps_refuses_float64_before_any_work(bench: Any) -> None:
    with pytest.raises(ValueError, match="has no float64"):
        bench.check_dtypes(torch.device("mps"), ["float64"])
    bench.check_dtypes(torch.device("mps"), ["float32"])
    bench.check_dtypes(torch.device("cpu"), ["float64", "float32"])


@pytest.mark.parametrize("script", [BENCH, FORWARD])
def test_unavailable_device_on_the_command_line(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(script), "--device", "nosuch", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"{script.stem}: error: unknown device 'nosuch' "
                                   "(valid: auto, cpu, cuda, cuda:N, mps)"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_runs_on_the_gpu(
    bench: Any, forward: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gpu = bench.run(quick=True, repeats=1, steps=30, ks=[3, 10], problems=["rnn"], pairs=1,
                    device="cuda")
    cpu = bench.run(quick=True, repeats=1, steps=30, ks=[3, 10], problems=["rnn"], pairs=1)
    settings = gpu["settings"]
    assert settings["device"] == "cuda:0"
    assert settings["gpu"] == torch.cuda.get_device_name(0)
    assert set(settings["allow_tf32"]) == {"matmul", "cudnn"}
    assert "device: cuda:0 (" in bench.format_table(gpu)
    # The same float64 maths on either device: where a method made the same number of
    # products (all but those stopping on a tolerance, which may stop one step apart), the
    # errors agree closely.
    fixed = {"rbp.bptt", "rbp.tbptt", "rbp.rbp", "rbp.neumann", "hand.neumann"}
    for g, c in zip(gpu["rows"], cpu["rows"], strict=True):
        assert (g["method"], g["K"], g["n_f"]) == (c["method"], c["K"], c["n_f"])
        assert g["n_vjp"] == c["n_vjp"] or g["method"] not in fixed, g
        if g["n_vjp"] == c["n_vjp"]:
            assert g["rel_err_W"] == pytest.approx(c["rel_err_W"], rel=1e-6, abs=1e-12), g
            assert g["rel_err_x"] == pytest.approx(c["rel_err_x"], rel=1e-6, abs=1e-12), g
        assert g["time_ms"] > 0 and g["cpu_ms"] is None and g["cpu_ratio_vs_hand"] is None
    for o in gpu["overhead_paired"] + gpu["overhead_target"]:
        assert o["paired_ratio"] > 0 and o["rbp_fwd_ms"] > 0
        assert o["paired_cpu_ratio"] is None and o["rbp_cpu_fwd_ms"] is None
    # forward_bench: every problem's state and inputs on the GPU, the device in the JSON.
    for dtype in (torch.float32, torch.float64):
        for p in forward.problems(dtype, True, torch.device("cuda")):
            assert p.h0.is_cuda and all(x.is_cuda for x in p.inputs), p.name
            assert p.closed()(p.h0).is_cuda
    result = _tiny_forward(forward, monkeypatch, tmp_path, "cuda")
    assert result["settings"]["device"] == "cuda:0" and result["settings"]["gpu"]
    assert capsys.readouterr().out.splitlines()[0].startswith("device: cuda:0 (")
    assert all(r["time_ms"] > 0 for r in result["rows"])


@pytest.mark.parametrize("argv", [["--problems", "lstm"], ["--dtypes", "float16"],
                                  ["--overhead-only", "--problems", "lstm"]])
def test_an_unknown_problem_or_dtype_is_one_line_before_any_work(bench: Any, argv: list[str],
                                                                  tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--quick", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_citation_gradients_on_cora(tmp_path: Path) -> None:
    """The paper model at initialisation on Cora: BPTT's gradient is orders of magnitude
    larger than Neumann-RBP's, whose float32 gradient is closer to float64's than BPTT's; JSON
    written. (The forward does not settle and amplifies round-off, so the float32 errors
    depend on the CPU's kernels: Neumann 1.1e-3 to 1.4e-2 and BPTT 2.5e-2 to 6.4e-2 on two
    machines; the ordering held on both.)"""
    module = _load_beside("citation_gradients")
    threads = torch.get_num_threads()
    try:
        assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in json.loads((tmp_path / "gradients.json").read_text())["rows"]}
    assert rows.keys() == {"bptt", "neumann"}
    assert rows["bptt"]["grad_norm"] > 100 * rows["neumann"]["grad_norm"]
    assert rows["neumann"]["float32_error"] < min(5e-2, rows["bptt"]["float32_error"])
    assert rows["bptt"]["forward_change"] == rows["neumann"]["forward_change"] > 1e-3


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("core_bench", ["--threads", "0"], "--threads: 0 must be at least 1"),
    ("core_bench", ["--repeats", "0"], "--repeats: 0 must be at least 1"),
    ("core_bench", ["--steps", "-4"], "--steps: -4 must be at least 1"),
    ("core_bench", ["--k", "0"], "--k: 0 must be at least 1"),
    ("core_bench", ["--pairs", "-3"], "--pairs: -3 must be at least 0"),
    ("core_bench", ["--k", "200"], "--k 200 is larger than T = 80"),
    ("core_bench", ["--steps", "4"], "the default K 25 is larger than T = 4"),
    ("core_bench", ["--overhead-only", "--k", "5"], "--k does not apply with --overhead-only"),
    ("core_bench", ["--overhead-only", "--pairs", "0"], "--pairs 0 with --overhead-only"),
    ("core_bench", ["--k", "5", "5"], "--k names 5 more than once"),
    ("shine_bench", ["--problems", "gru", "gru"], "--problems names gru more than once"),
    ("forward_bench", ["--repeats", "0"], "--repeats: 0 must be at least 1"),
    ("second_order_bench", ["--repeats", "0"], "--repeats: 0 must be at least 1"),
    ("second_order_bench", ["--ref-steps", "0"], "--ref-steps: 0 must be at least 1"),
    ("shine_bench", ["--tol", "nan"], "--tol: nan must be a positive finite number"),
    ("shine_bench", ["--tol", "-1"], "--tol: -1 must be a positive finite number"),
    ("shine_bench", ["--threads", "x"], "--threads: 'x' is not an integer"),
    ("citation_gradients", ["--seed", str(2**64)], "--seed: 18446744073709551616 must be "
                                                    "between 0 and 4294967295"),
])
def test_a_bad_option_is_a_usage_error_before_any_work(
    bench: Any, script: str, argv: list[str], message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A count of 0, a negative size, a NaN tolerance, a K past T or an option the mode ignores:
    exit 2 with one line naming it, nothing written (not a silent default, not a traceback
    from inside the run)."""
    module = bench if script == "core_bench" else _load_beside(script)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            module.main(["--quick", *argv, "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["core_bench", "forward_bench", "shine_bench",
                                    "second_order_bench", "citation_gradients"])
def test_out_that_is_a_file_is_one_line_before_any_work(
    bench: Any, script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    module = bench if script == "core_bench" else _load_beside(script)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--quick", "--out", str(afile)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{script}: error: --out {afile} is a file, not a folder; pass a folder that can be "
        "written"]
    assert afile.read_text() == "keep"


def test_forward_bench_quick_honours_an_explicit_repeats(
    forward: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """``--quick --repeats 3`` times 3 solves per setting (it silently timed 1)."""
    seen: list[int] = []

    class Stop(Exception):
        pass

    def bench(p: Any, tol: float, names: list[str], repeats: int) -> list[dict[str, Any]]:
        seen.append(repeats)
        raise Stop

    monkeypatch.setattr(forward, "bench", bench)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            forward.main(["--quick", "--repeats", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert seen == [3]
