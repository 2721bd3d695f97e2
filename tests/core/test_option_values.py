"""Options on the values they configure (issue 23): the shortcuts and the values they stand for
give the same numbers bit for bit, and the values refuse what they would ignore when built."""

from __future__ import annotations

import pytest
import torch
from dynamics import exact_gradients, max_rel_error, method_gradients, tanh_rnn

import rbp


def _grads(p, method, truncate=20, **options):
    for q in p.params:
        q.grad = None
    h, info = rbp.fixed_point(p.f, p.h0.clone(), 200, method, truncate, return_info=True,
                              **options)
    p.loss(h).backward()
    return [q.grad.clone() for q in p.params], h.detach(), info


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("neumann", rbp.linear.Neumann(max_iter=12)),
        ("rbp", rbp.linear.RBP(max_iter=12, init="zeros")),
        ("cg", rbp.linear.CGNormal(max_iter=12, jvp="double_vjp")),
        ("gmres", rbp.linear.GMRES(max_iter=12, restart=12)),
        ("gmres", rbp.methods.from_name("gmres", 12)),
        ("tbptt", rbp.TBPTT(12)),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_a_name_and_its_value_give_the_same_numbers(name, value):
    p = tanh_rnn()
    by_name, h_name, info_name = _grads(p, name, 12)
    by_value, h_value, info_value = _grads(p, value)
    assert torch.equal(h_name, h_value)
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_value, strict=True))
    assert info_value.method == info_name.method and info_value.truncate == 12


def test_the_tol_shortcut_is_the_solvers_own_tol():
    p = tanh_rnn()
    for name, cls in (("iterate", rbp.Iterate), ("anderson", rbp.Anderson),
                      ("broyden", rbp.Broyden)):
        a, ha, ia = _grads(p, "gmres", 30, solver=name, tol=1e-9)
        b, hb, ib = _grads(p, "gmres", 30, solver=cls(tol=1e-9))
        c, hc, ic = _grads(p, "gmres", 30, solver=cls(), tol=1e-9)  # a value without its own
        assert torch.equal(ha, hb) and torch.equal(ha, hc), name
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
        assert ia.forward_steps == ib.forward_steps == ic.forward_steps < 200
        assert ia.tol_reached is ib.tol_reached is True


def test_default_checks_are_no_checks_argument():
    p = tanh_rnn()
    a, ha, _ = _grads(p, "neumann", 20)
    b, hb, _ = _grads(p, "neumann", 20, checks=rbp.Checks())
    assert torch.equal(ha, hb) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_moved_options_still_reach_the_exact_gradient():
    # the exact-gradient checks of the moved options: backward tol, RBP's start, CG's J v
    # by forward mode, GMRES's restart, and a fallback through rbp.Checks
    p = tanh_rnn()
    want = exact_gradients(p)
    for method in (rbp.linear.Neumann(max_iter=400, tol=1e-13),
                   rbp.linear.RBP(max_iter=400, tol=1e-13, init="uniform"),
                   rbp.linear.CGNormal(max_iter=60, jvp="func"),
                   rbp.linear.GMRES(max_iter=60, restart=5)):
        got = method_gradients(p, method, steps=200)
        assert max_rel_error(got, want) <= 1e-8, method
    with pytest.warns(rbp.ConvergenceWarning, match="fell back to gmres"):
        got = method_gradients(p, "neumann", steps=200, truncate=2,
                               checks=rbp.Checks(fallback=rbp.linear.GMRES(max_iter=60)))
    assert max_rel_error(got, want) <= 1e-8


def test_checks_reach_the_call():
    p = tanh_rnn()
    _, _, info = _grads(p, "neumann", 20, checks=rbp.Checks(trace=True, estimate_error=True))
    assert len(info.forward_trace) == 200 and info.backward[0].error_bound is not None
    with pytest.raises(rbp.DivergenceError, match="max_backward_error"):
        _grads(p, "neumann", 1, checks=rbp.Checks(on_failure="raise"))
    _grads(p, "neumann", 1, checks=rbp.Checks(max_backward_error=None, on_failure="raise"))


def test_a_module_takes_the_values_and_refuses_at_construction():
    cell = torch.nn.Linear(4, 4).double()
    layer = rbp.FixedPoint(lambda x, h: torch.tanh(0.5 * cell(h) + x), 100,
                           rbp.linear.GMRES(max_iter=30, tol=1e-10), solver=rbp.Anderson(),
                           tol=1e-10, checks=rbp.Checks(on_failure="raise", trace=True))
    h = layer(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))
    h.sum().backward()
    assert layer.last_info.tol_reached is True and layer.last_info.forward_trace
    with pytest.raises(ValueError, match="has its own tol"):
        rbp.FixedPoint(cell, 100, solver=rbp.Anderson(tol=1e-6), tol=1e-8)
    with pytest.raises(ValueError, match=r"Checks\(estimate_error=True\) would be ignored"):
        rbp.FixedPoint(cell, 100, "bptt", checks=rbp.Checks(estimate_error=True))
