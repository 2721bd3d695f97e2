"""Smoke test of benchmarks/shine_bench.py: its --quick mode, in process, on one tiny problem."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "shine_bench.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("shine_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shine_bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("shine_bench")
    _load().main(["--quick", "--problems", "rnn", "--k", "5", "20", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    return json.loads((out / "bench.json").read_text())


def test_rows_and_fields(quick: dict[str, Any]) -> None:
    assert {"settings", "versions", "problems", "rows", "skipped", "wall_time_s",
            "command"} <= set(quick)
    assert quick["settings"]["device"] == "cpu"
    rows = quick["rows"]
    methods = {r["method"] for r in rows}
    assert {"jfb", "shine", "shine+gmres", "shine-init+gmres", "gmres"} <= methods
    if importlib.util.find_spec("torchdeq") is not None:
        assert "torchdeq.broyden" in methods and not quick["skipped"]
    else:
        assert quick["skipped"]
    for r in rows:
        assert {"problem", "method", "mode", "K", "n_vjp", "rel_err_W", "rel_err_x", "est",
                "fwd_ms", "bwd_ms"} <= set(r)
        assert math.isfinite(r["rel_err_W"]) and r["fwd_ms"] > 0 and r["bwd_ms"] > 0


def test_numbers_are_sensible(quick: dict[str, Any]) -> None:
    rows = {(r["method"], r["mode"], r["K"]): r for r in quick["rows"]}
    # 20 GMRES iterations solve each 16-dimensional system of the tiny problem
    for method in ("shine+gmres", "gmres"):
        assert rows[(method, "per-sample", 20)]["rel_err_W"] <= 1e-6
    # the pure estimate spends one product for its residual (and one for the parameters)
    shine = rows[("shine", "per-sample", 0)]
    assert shine["n_vjp"] == 2 and shine["est"] > 0

