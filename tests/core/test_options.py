"""One place refuses options: an option that does not apply is refused, never ignored, and
rbp.FixedPoint refuses at construction whatever rbp.fixed_point refuses at call."""

from __future__ import annotations

import inspect

import pytest
import torch
from dynamics import DT, tanh_rnn

import rbp

REFUSED = [
    # (positional method/truncate and options, error type, text the message must hold)
    ({"method": "bptt", "solver": "anderson"}, ValueError, "solver='iterate'"),
    ({"method": "tbptt", "truncate": 5, "solver": rbp.Broyden()}, ValueError, "'broyden'"),
    ({"method": "bptt", "batch_dim": 0}, ValueError, "batch_dim=0 is not supported"),
    ({"method": "tbptt", "truncate": 5, "solver": rbp.Iterate(best_iterate=True)}, ValueError,
     "best_iterate"),
    ({"method": "bptt", "checks": rbp.Checks(fallback="gmres")}, ValueError,
     "Checks(fallback='gmres') would be ignored"),
    ({"method": "tbptt", "truncate": 5, "checks": rbp.Checks(estimate_error=True)}, ValueError,
     "Checks(estimate_error=True) would be ignored"),
    ({"method": rbp.JFB(), "checks": rbp.Checks(fallback="gmres")}, ValueError,
     "Checks(fallback='gmres') would be ignored: fallback re-solves a failed backward solve; "
     "JFB() is inexact"),
    ({"method": rbp.Phantom(3), "checks": rbp.Checks(fallback="gmres")}, ValueError,
     "Phantom(k=3, damping=0.5) is inexact"),
    ({"method": rbp.BPTT(), "truncate": 7}, ValueError, "truncate applies to the string"),
    ({"method": rbp.linear.GMRES(max_iter=10), "truncate": 7}, ValueError,
     "truncate applies to the string"),
    ({"method": rbp.TBPTT(11)}, ValueError, "truncate <= steps"),
    ({"time_varying": True, "solver": "anderson", "tol": 1e-6}, ValueError, "time_varying=True"),
    ({"solver": rbp.Anderson(tol=1e-3), "tol": 1e-6}, ValueError, "has its own tol=0.001"),
    ({"method": rbp.linear.CGNormal(jvp="func"),
      "checks": rbp.Checks(fallback=rbp.linear.CGNormal())}, ValueError,
     "obtain J v differently"),
    ({"steps": 2.0}, TypeError, "steps must be an integer >= 1, got 2.0"),
    ({"truncate": "5"}, TypeError, "truncate must be an integer"),
    ({"method": None}, TypeError, "bptt, tbptt, rbp, cg, neumann, gmres"),
    ({"solver": 3}, TypeError, "unknown solver 3"),
    ({"checks": "raise"}, TypeError, "checks must be an rbp.Checks("),
]

# An option that does not apply cannot even be written down: the values that do not use it
# have no such field (the string shortcuts take none), and the ones that would ignore it
# refuse it when built.
REFUSED_VALUES = [
    (lambda: rbp.linear.Neumann(restart=10), TypeError, "restart"),
    (lambda: rbp.linear.CGNormal(restart=10), TypeError, "restart"),
    (lambda: rbp.linear.Neumann(jvp="func"), TypeError, "jvp"),
    (lambda: rbp.linear.GMRES(jvp="func"), TypeError, "jvp"),
    (lambda: rbp.linear.GMRES(init="uniform"), TypeError, "init"),
    (lambda: rbp.Iterate(tol_mode="absolute"), ValueError,
     "Iterate(tol_mode='absolute') would be ignored"),
    (lambda: rbp.Anderson(check_every=5), ValueError, "Anderson(check_every=5) would be ignored"),
    (lambda: rbp.methods.from_name("bptt", 5, tol=1e-6), ValueError, "tol would be ignored"),
    (lambda: rbp.methods.from_name("neumann", 5, init="uniform"), TypeError, "init"),
    (lambda: rbp.Checks(fallback=rbp.JFB()), ValueError, "fallback must be"),
]


@pytest.mark.parametrize(("make", "error", "match"), REFUSED_VALUES,
                         ids=[m for _, _, m in REFUSED_VALUES])
def test_values_refuse_what_they_would_ignore_when_built(make, error, match):
    with pytest.raises(error) as caught:
        make()
    assert match in str(caught.value)


def test_old_keyword_options_are_gone():
    # the options now live on the values: passing one to fixed_point names it as unknown
    p = tanh_rnn()
    for name, value in (("backward_tol", 1e-6), ("rbp_init", "uniform"), ("restart", 10),
                        ("jvp", "func"), ("tol_mode", "absolute"), ("check_every", 2),
                        ("best_iterate", True), ("settle_tol", None), ("on_failure", "raise"),
                        ("fallback", "gmres"), ("estimate_error", True), ("trace", True),
                        ("max_backward_error", None)):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            rbp.fixed_point(p.f, p.h0, 10, **{name: value})
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            rbp.FixedPoint(_Cell(), 10, **{name: value})


def _args(options):
    o = {"steps": 10, "method": "neumann", "truncate": 20 if "method" in options else 5,
         **options}
    return o.pop("steps"), o.pop("method"), o.pop("truncate"), o


@pytest.mark.parametrize(("options", "error", "match"), REFUSED, ids=lambda v: repr(v)[:50])
def test_fixed_point_refuses(options, error, match):
    p = tanh_rnn()
    steps, method, truncate, rest = _args(options)
    with pytest.raises(error) as caught:
        rbp.fixed_point(p.f, p.h0, steps, method, truncate, **rest)
    assert match in str(caught.value)


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(4, 4).double()

    def forward(self, x, h):
        return torch.tanh(0.5 * self.w(h) + x)


@pytest.mark.parametrize(("options", "error", "match"), REFUSED, ids=lambda v: repr(v)[:50])
def test_fixed_point_module_refuses_the_same_at_construction(options, error, match):
    steps, method, truncate, rest = _args(options)
    with pytest.raises(error) as caught:
        rbp.FixedPoint(_Cell(), steps, method, truncate, **rest)
    assert match in str(caught.value)


def test_a_last_step_that_cannot_take_the_inputs_is_refused_before_the_forward():
    """last_step is called as last_step(h, *inputs): one taking h alone is one clear line
    (it was a TypeError from inside the forward, after all the steps)."""
    p = tanh_rnn()
    with pytest.raises(TypeError, match=r"last_step is called as last_step\(h, \*inputs\), "
                       r"with 2 argument\(s\) here, but its signature is \(h\)"):
        rbp.fixed_point(lambda h, x: p.f(h) + 0 * x, p.h0, 10, "gmres", 5,
                        inputs=(torch.ones(1, dtype=DT),), last_step=lambda h: p.f(h))
    h = rbp.fixed_point(lambda h, x: p.f(h) + 0 * x, p.h0, 10, "gmres", 5, checks=rbp.Checks(
        settle_tol=None), inputs=(torch.ones(1, dtype=DT),), last_step=lambda h, x: p.f(h))
    assert h.shape == p.h0.shape


def test_the_issue_example_fails_at_construction_not_at_the_first_call():
    with pytest.raises(ValueError, match="solver='iterate'"):
        rbp.FixedPoint(_Cell(), 10, "bptt", solver="anderson")


@pytest.mark.parametrize(
    "options",
    [
        {"method": rbp.linear.GMRES(max_iter=20, restart=10)},
        {"method": "neumann", "checks": rbp.Checks(fallback=rbp.linear.GMRES(restart=10))},
        {"method": rbp.linear.CGNormal(jvp="func")},
        {"method": "neumann",
         "checks": rbp.Checks(fallback=rbp.linear.CGNormal(jvp="func"))},
        {"method": rbp.Implicit(rbp.linear.CGNormal(max_iter=5, jvp="func")), "truncate": 5},
        {"method": rbp.methods.from_name("rbp", 5, init="uniform"), "truncate": 5},
        {"solver": rbp.Iterate(tol=1e-8, tol_mode="absolute", check_every=3)},
        {"solver": "anderson", "tol": 1e-8},
        {"solver": rbp.Broyden(best_iterate=True), "tol": 1e-8},
        {"method": "bptt", "checks": rbp.Checks(fallback=None, settle_tol=None)},
        {"method": "tbptt", "truncate": 5, "solver": rbp.Iterate(damping=0.3)},
    ],
    ids=repr,
)
def test_options_that_apply_are_accepted(options):
    p = tanh_rnn()
    steps, method, truncate, rest = _args({"steps": 50, **options})
    rest.setdefault("checks", rbp.Checks(on_failure="ignore"))
    h = rbp.fixed_point(p.f, p.h0, steps, method, truncate, **rest)
    h.sum().backward()
    rbp.FixedPoint(_Cell(), steps, method, truncate, **rest)


def test_bptt_refusals_hold_without_grad_too():
    # refused whatever the grad mode, so a model refused in training is refused in eval
    p = tanh_rnn()
    with torch.no_grad(), pytest.raises(ValueError, match="solver='iterate'"):
        rbp.fixed_point(p.f, p.h0, 10, "bptt", solver="anderson", tol=1e-6)


@pytest.mark.parametrize(
    "name",
    [p.name for p in inspect.signature(rbp.fixed_point).parameters.values()
     if p.kind is inspect.Parameter.KEYWORD_ONLY],
)
def test_every_keyword_option_is_checked_and_named(name):
    # a value of a type no option takes is refused with a message naming the option
    p = tanh_rnn()
    weird = object()
    with pytest.raises((TypeError, ValueError)) as caught:
        rbp.fixed_point(p.f, torch.zeros(8, dtype=DT), 10, **{name: weird})
    text = str(caught.value)
    assert name in text or (name == "solver" and "unknown solver" in text), text


@pytest.mark.parametrize(
    "make",
    [
        lambda v: rbp.fixed_point(lambda h: 0.5 * h, torch.ones(2, dtype=DT), v),
        lambda v: rbp.FixedPoint(_Cell(), 10, method=rbp.linear.GMRES(restart=v)),
        lambda v: rbp.linear.GMRES(restart=v),
        lambda v: rbp.linear.Neumann(max_iter=v),
        lambda v: rbp.TBPTT(v),
        lambda v: rbp.Anderson(m=v),
        lambda v: rbp.Broyden(memory=v),
    ],
    ids=["steps", "module-restart", "GMRES", "Neumann", "TBPTT", "Anderson", "Broyden"],
)
def test_one_integer_check_everywhere(make):
    # a float is a wrong type (TypeError), zero a wrong value (ValueError), with one message
    with pytest.raises(TypeError, match=r"must be an integer >= 1, got 2.5 \(float\)"):
        make(2.5)
    with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
        make(0)
