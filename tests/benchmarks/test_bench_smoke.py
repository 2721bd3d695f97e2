"""Smoke test of benchmarks/core_bench.py: its --quick mode, in process, on tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "core_bench.py"
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
        bench.main(["--overhead-only", "--pairs", "2", "--out", str(tmp_path)])
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
