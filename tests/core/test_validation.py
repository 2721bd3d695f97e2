"""Every option of rbp.fixed_point is type- and range-checked with a message naming it."""

from __future__ import annotations

import math

import pytest
import torch
from dynamics import DT, tanh_rnn

import rbp

BAD_OPTIONS = [
    # (options, error type, message that must appear)
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"steps": 2.0}, TypeError, "steps must be an integer >= 1, got 2.0"),
    ({"steps": True}, TypeError, "steps must be an integer >= 1, got True"),
    ({"steps": "10"}, TypeError, "steps must be an integer >= 1, got '10'"),
    ({"truncate": 0}, ValueError, "truncate must be an integer >= 1"),
    ({"truncate": 1.5}, TypeError, "truncate must be an integer >= 1"),
    ({"method": "adjoint"}, ValueError, "unknown method 'adjoint'"),
    ({"method": torch.zeros(2)}, TypeError, "method must be a name"),
    ({"method": None}, TypeError, "method must be a name"),
    ({"method": "tbptt", "truncate": 11}, ValueError, "truncate <= steps"),
    ({"tol": True}, TypeError, "tol must be positive (a number) or None, got True"),
    ({"tol": "1e-6"}, TypeError, "tol must be positive"),
    ({"tol": -1.0}, ValueError, "tol must be positive and finite"),
    ({"tol": 0.0}, ValueError, "tol must be positive and finite"),
    ({"tol": math.inf}, ValueError, "tol must be positive and finite, or None (no test), got inf"),
    ({"tol": math.nan}, ValueError, "tol must be positive and finite"),
    ({"checks": {"on_failure": "raise"}}, TypeError, "checks must be an rbp.Checks("),
    ({"checks": rbp.Checks}, TypeError, "checks must be an rbp.Checks("),
    ({"time_varying": 1}, TypeError, "time_varying must be True or False, got 1"),
    ({"return_info": "no"}, TypeError, "return_info must be True or False"),
    ({"last_step": 3}, TypeError, "last_step must be callable or None"),
    ({"batch_dim": 0.0}, TypeError, "batch_dim must be an integer dim or None"),
    ({"batch_dim": True}, TypeError, "batch_dim must be an integer dim or None"),
    ({"batch_dim": 1}, ValueError, "batch_dim=1 is out of range for state leaf 0 of shape (8,)"),
    ({"inputs": torch.zeros(3)}, TypeError, "inputs must be a tuple or list"),
    ({"solver": "newton"}, ValueError, "unknown solver 'newton'"),
    ({"solver": rbp.Anderson}, TypeError, "unknown solver"),
    ({"solver": 3}, TypeError, "unknown solver 3"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS, ids=lambda v: repr(v)[:40])
def test_bad_option_gives_a_clear_message(options, error, match):
    p = tanh_rnn()
    args = {"steps": 10, **options}
    with pytest.raises(error) as caught:
        rbp.fixed_point(p.f, p.h0, **args)
    assert match in str(caught.value)


# The options that moved onto values are checked when the value is built: the same type /
# value split and a message naming the option (what fixed_point checked for them before).
BAD_VALUES = [
    (lambda: rbp.linear.GMRES(restart=2.5), TypeError, "restart must be an integer >= 1, got 2.5"),
    (lambda: rbp.linear.GMRES(restart=0), ValueError, "restart must be an integer >= 1"),
    (lambda: rbp.Iterate(tol=1e-6, check_every=0), ValueError,
     "Iterate(check_every=...) must be an integer >= 1"),
    (lambda: rbp.Anderson(tol=1e-6, check_every=None), TypeError,
     "Anderson(check_every=...) must be an integer >= 1"),
    (lambda: rbp.Broyden(tol=math.nan), ValueError, "Broyden(tol=...) must be finite"),
    (lambda: rbp.Iterate(tol=-1.0), ValueError, "Iterate(tol=...) must be positive"),
    (lambda: rbp.Iterate(tol="1e-6"), TypeError, "Iterate(tol=...) must be a real number"),
    (lambda: rbp.linear.Neumann(tol=math.nan), ValueError, "tol must be a finite number > 0"),
    (lambda: rbp.linear.Neumann(tol="1e-6"), TypeError, "tol must be a finite number > 0"),
    (lambda: rbp.Checks(settle_tol=math.nan), ValueError, "settle_tol must be positive and finite"),
    (lambda: rbp.Checks(settle_tol=-1e-3), ValueError, "settle_tol must be positive"),
    (lambda: rbp.Checks(settle_tol=False), TypeError,
     "settle_tol must be positive (a number) or None"),
    (lambda: rbp.Checks(max_backward_error="big"), TypeError, "max_backward_error must be"),
    (lambda: rbp.Iterate(tol=1e-6, tol_mode="rel"), ValueError,
     "tol_mode=...) must be one of 'relative', 'absolute'"),
    (lambda: rbp.Iterate(tol=1e-6, tol_mode=None), TypeError, "tol_mode=...) must be one of"),
    (lambda: rbp.Checks(on_failure="explode"), ValueError,
     "on_failure must be one of 'raise', 'warn'"),
    (lambda: rbp.Checks(on_failure=None), TypeError, "on_failure must be one of"),
    (lambda: rbp.linear.RBP(init="random"), ValueError, "init must be 'zeros' or 'uniform'"),
    (lambda: rbp.linear.RBP(init=0), TypeError, "init must be 'zeros' or 'uniform'"),
    (lambda: rbp.linear.CGNormal(jvp="forward"), ValueError, "jvp must be 'double_vjp' or 'func'"),
    (lambda: rbp.linear.CGNormal(jvp=None), TypeError, "jvp must be 'double_vjp' or 'func'"),
    (lambda: rbp.Checks(fallback="bptt"), ValueError, "fallback must be one of"),
    (lambda: rbp.Checks(fallback=torch.zeros(2)), TypeError,
     "fallback must be a backward solver name"),
    (lambda: rbp.Checks(trace="yes"), TypeError, "trace must be True or False"),
    (lambda: rbp.Anderson(best_iterate=None), TypeError,
     "Anderson(best_iterate=...) must be True or False"),
    (lambda: rbp.Checks(estimate_error=0), TypeError, "estimate_error must be True or False"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_VALUES,
                         ids=[m for _, _, m in BAD_VALUES])
def test_bad_option_of_a_value_is_refused_when_it_is_built(make, error, match):
    with pytest.raises(error) as caught:
        make()
    assert match in str(caught.value)


def test_unknown_option_is_a_type_error_naming_it():
    p = tanh_rnn()
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'"):
        rbp.fixed_point(p.f, p.h0, 10, tolerance=1e-6)


def test_good_edge_values_are_accepted():
    p = tanh_rnn()
    quiet = rbp.Checks(on_failure="ignore")
    for options in (
        {"tol": 1, "steps": 1},  # an int tolerance is a number
        {"checks": rbp.Checks(settle_tol=None), "steps": 1},
        {"method": "tbptt", "truncate": 10},
        {"solver": rbp.Iterate(tol=1e-300, tol_mode="absolute")},
        {"solver": rbp.Iterate(tol=1)},
        {"inputs": []},
    ):
        rbp.fixed_point(p.f, p.h0, **{"steps": 10, "checks": quiet, **options})


def test_bad_states_name_the_leaf():
    p = tanh_rnn()
    with pytest.raises(TypeError, match=r"h0\['b'\] is a str"):
        rbp.fixed_point(lambda s: s, {"a": p.h0, "b": "x"}, 5)
    with pytest.raises(TypeError, match="h0 holds no tensors"):
        rbp.fixed_point(lambda s: s, (), 5)
    mixed = (p.h0, p.h0.float())
    with pytest.raises(TypeError, match="one dtype and device; leaf 1 is torch.float32"):
        rbp.fixed_point(lambda s: s, mixed, 5, tol=1e-6)
    rbp.fixed_point(
        lambda s: (s[0] * 0.5, s[1] * 0.5), mixed, 5, checks=rbp.Checks(settle_tol=None),
    )  # unroll: ok
    with pytest.raises(ValueError, match="holds no samples"):
        rbp.fixed_point(lambda s: s, torch.zeros(0, 3, dtype=DT), 5, tol=1e-6, batch_dim=0)


def test_f_returning_wrong_things_on_a_sub_batch_is_caught():
    w = torch.eye(3, dtype=DT) * 0.5

    def f(h):  # correct on the full batch only
        return h @ w if h.shape[0] == 4 else (h @ w)[:, :2]

    with pytest.raises(ValueError, match="failed on a sub-batch"):
        rbp.fixed_point(f, torch.ones(4, 3, dtype=DT), 50, tol=1e-8, batch_dim=0)


def test_the_checked_defaults_are_read_off_the_signature():
    # fixed_point checks its keyword options only when one differs from its default: the
    # (name, default) pairs it compares are the signature's, written nowhere else
    import importlib
    import inspect

    module = importlib.import_module("rbp.fixed_point")
    params = [p for p in inspect.signature(rbp.fixed_point).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert list(module._DEFAULTS) == [(p.name, p.default) for p in params]
