"""FixedPointInfo: built in one place from the forward's typed record, on every forward path."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from dynamics import DT, tanh_rnn

import rbp
from rbp import forward

PATHS = {
    # the forward paths of fixed_point: the paper's unroll (tensor fast path, general path),
    # a solve (whole state, per sample), bptt/tbptt to a tolerance
    "unroll-tensor": {},
    "unroll-trace": {"checks": rbp.Checks(trace=True)},
    "solve": {"tol": 1e-10, "solver": "anderson"},
    "solve-best": {"solver": rbp.Iterate(tol=1e-10, best_iterate=True)},
    "bptt-tol": {"method": "bptt", "tol": 1e-10},
    "tbptt-damped": {"method": "tbptt", "truncate": 5, "solver": rbp.Iterate(damping=0.2)},
}


def test_the_record_is_field_for_field_the_forward_part_of_the_info():
    record = {f.name for f in dataclasses.fields(forward.Measured)}
    info = {f.name for f in dataclasses.fields(rbp.FixedPointInfo)}
    assert record <= info
    assert info - record == {"method", "steps", "truncate", "worst_relative_difference",
                             "backward"}


@pytest.mark.parametrize("options", PATHS.values(), ids=PATHS.keys())
def test_every_path_fills_the_forward_fields(options):
    p = tanh_rnn()
    options = {"method": "neumann", **options}
    h, info = rbp.fixed_point(p.f, p.h0, 200, return_info=True, **options)
    assert info.method == getattr(options["method"], "name", options["method"])
    assert isinstance(info.forward_steps, int) and 1 <= info.forward_steps <= 200
    assert math.isfinite(info.final_difference) and info.final_difference >= 0
    scale = float(torch.linalg.vector_norm(h.detach()))
    assert info.relative_final_difference == pytest.approx(info.final_difference / scale)
    assert info.row_updates == info.forward_steps  # one row, every step
    assert info.solver == rbp.forward.as_solver(options.get("solver", "iterate")).name
    tol = options.get("tol", getattr(options.get("solver"), "tol", None))
    assert (info.tol_reached is None) == (tol is None)
    if tol is not None:
        assert info.tol_reached is True and info.forward_residual <= 1e-10 * scale * 1.01
    trace = options.get("checks", rbp.Checks()).trace
    assert (len(info.forward_trace) == 200) == trace
    if options["method"] == "neumann":
        assert info.worst_relative_difference >= info.relative_final_difference
        h.sum().backward()
        assert len(info.backward) == 1
    else:
        assert math.isnan(info.worst_relative_difference) and info.backward == []


def test_per_sample_fields_are_lists():
    w = 0.5 * torch.eye(3, dtype=DT)
    rate = torch.tensor([0.1, 0.5, 0.9], dtype=DT)
    h, info = rbp.fixed_point(
        lambda h, a: a[:, None] * torch.tanh(h @ w) + 1, torch.zeros(3, 3, dtype=DT), 400,
        batch_dim=0, inputs=(rate,), return_info=True,
        solver=rbp.Iterate(tol=1e-10, best_iterate=True),
    )
    for name in ("forward_steps", "forward_residual", "tol_reached", "best_iterate"):
        assert isinstance(getattr(info, name), list) and len(getattr(info, name)) == 3, name
    assert info.forward_steps == sorted(info.forward_steps)
    assert info.row_updates == sum(info.forward_steps)  # a row leaves when it stops
    assert all(info.tol_reached) and info.solver_fallbacks == 0


def test_an_unreached_tolerance_is_reported_from_the_info():
    p = tanh_rnn()
    with pytest.warns(rbp.ConvergenceWarning, match="did not reach tol=1e-14"):
        _, info = rbp.fixed_point(
            p.f, p.h0, 3, tol=1e-14, checks=rbp.Checks(settle_tol=None), return_info=True,
        )
    assert info.tol_reached is False and info.forward_steps == 3


def test_no_grad_gives_the_same_forward_record():
    p = tanh_rnn()
    _, with_grad = rbp.fixed_point(p.f, p.h0, 50, "neumann", tol=1e-9, return_info=True)
    with torch.no_grad():
        _, without = rbp.fixed_point(p.f, p.h0, 50, "neumann", tol=1e-9, return_info=True)
    for name in ("forward_steps", "forward_residual", "tol_reached", "row_updates", "solver"):
        assert getattr(with_grad, name) == getattr(without, name), name
