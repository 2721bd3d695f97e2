"""Smoke test of benchmarks/second_order_bench.py: its --quick mode, in process (seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "second_order_bench.py"
SECOND_ORDER = ("gmres", "neumann", "cg")


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("second_order_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["second_order_bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("second_order_bench")
    _load().main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    return json.loads((out / "bench.json").read_text())


def _rows(quick: dict[str, Any]) -> dict[tuple[str, int, str, int | None], dict[str, Any]]:
    return {(r["problem"], r["T"], r["method"], r["K"]): r for r in quick["rows"]}


def test_fields(quick: dict[str, Any]) -> None:
    assert {"settings", "versions", "machine", "notes", "problems", "rows", "wall_time_s",
            "command"} <= set(quick)
    assert quick["settings"]["steps"] == [10, 40] and quick["settings"]["dtype"] == "float64"
    assert quick["settings"]["device"] == "cpu"
    assert set(quick["problems"]) == {"rnn", "gru"}
    for problem in quick["problems"].values():
        assert problem["ref_check"] < 1e-10  # the BPTT reference is converged
    rows = _rows(quick)
    assert len(rows) == 2 * 2 * (1 + 3 * 3)
    for r in quick["rows"]:
        assert {"problem", "T", "method", "K", "rel_err", "rel_err_grad", "time_ms", "times_ms",
                "fwd_kib", "bwd1_kib", "bwd2_kib", "held_kib", "hooks_in_node"} <= set(r)
        assert math.isfinite(r["rel_err"]) and r["time_ms"] > 0 and r["fwd_kib"] > 0


def test_memory_is_flat_in_t_for_second_order_and_grows_for_bptt(quick: dict[str, Any]) -> None:
    rows = _rows(quick)
    for problem in ("rnn", "gru"):
        for method in ("gmres", "neumann"):
            for k in (10, 30, 100):
                short, long = rows[(problem, 10, method, k)], rows[(problem, 40, method, k)]
                for key in ("fwd_kib", "bwd1_kib", "held_kib", "bwd2_kib"):
                    assert short[key] == long[key], (problem, method, k, key)
        short, long = rows[(problem, 10, "bptt", None)], rows[(problem, 40, "bptt", None)]
        assert long["fwd_kib"] > 3.5 * short["fwd_kib"]  # one step's graph per step
        assert long["held_kib"] > 3.5 * short["held_kib"]
        assert long["held_kib"] > 5 * rows[(problem, 40, "gmres", 100)]["held_kib"]


def test_hooks_see_the_graphs_built_in_the_second_order_backward(quick: dict[str, Any]) -> None:
    for r in quick["rows"]:
        if r["method"] in SECOND_ORDER:
            # the node's create_graph backward builds graphs of one step inside the engine
            assert r["hooks_in_node"] > 0 and r["bwd1_kib"] > r["fwd_kib"] / 2
            assert r["bwd2_kib"] > 0  # the inner first-order backward's step graph
        else:
            assert r["hooks_in_node"] == 0 and r["bwd2_kib"] == 0


def test_errors(quick: dict[str, Any]) -> None:
    rows = _rows(quick)
    for problem in ("rnn", "gru"):
        # converged Krylov solves (K = 100 > the 64 / 48 unknowns of the tiny whole-batch
        # systems) give the same implicit HVP at h_T; Neumann(100) is close behind
        at = [rows[(problem, 40, m, 100)]["rel_err"] for m in SECOND_ORDER]
        assert abs(at[0] - at[2]) < 1e-8 * at[0] and abs(at[0] - at[1]) < 1e-4 * at[0]
        # at T = 40 the forward is nearly converged: the HVP is within 1e-3 of the reference,
        # and it improves on T = 10 (the error there is the unconverged forward's)
        assert max(at) < 1e-3
        assert max(at) < 0.1 * rows[(problem, 10, "gmres", 100)]["rel_err"]
        assert rows[(problem, 40, "bptt", None)]["rel_err"] < 1e-2
        # a solve of too few iterations is visibly off
        assert rows[(problem, 40, "cg", 10)]["rel_err"] > 10 * max(at)

