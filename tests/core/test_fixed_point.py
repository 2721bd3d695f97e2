"""Behaviour of rbp.fixed_point: states, time-varying maps, memory, diagnostics, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from dynamics import DT, exact_gradients, max_rel_error, method_gradients, tanh_rnn

import rbp


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("method", rbp.IMPLICIT_METHODS)
def test_implicit_memory_does_not_depend_on_steps(method):
    p = tanh_rnn(n=64)
    sizes = [saved_bytes(lambda s=s: rbp.fixed_point(p.f, p.h0, s, method, 10)) for s in (50, 500)]
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("method", rbp.IMPLICIT_METHODS)
def test_implicit_forward_saves_exactly_one_step_of_graph(method):
    p = tanh_rnn(n=64)
    with torch.no_grad():
        h = rbp.fixed_point(p.f, p.h0, 49, "bptt")
    one_step = saved_bytes(lambda: p.f(h.clone().requires_grad_()))
    assert saved_bytes(lambda: rbp.fixed_point(p.f, p.h0, 50, method, 10)) == one_step > 0


def test_bptt_memory_grows_linearly_and_tbptt_with_k():
    p = tanh_rnn(n=64)
    b50, b200, b500 = (
        saved_bytes(lambda s=s: rbp.fixed_point(p.f, p.h0, s, "bptt")) for s in (50, 200, 500)
    )
    per_step = (b500 - b50) / 450
    assert per_step >= 64 * 8  # at least one state per step
    assert b200 == pytest.approx(b50 + 150 * per_step, rel=1e-9)  # exactly linear in T
    t10, t20 = (
        saved_bytes(lambda k=k: rbp.fixed_point(p.f, p.h0, 500, "tbptt", k)) for k in (10, 20)
    )
    assert t20 - t10 == pytest.approx(10 * per_step, rel=1e-6)  # linear in K, not in T
    assert t10 < b50


@pytest.mark.parametrize("method", rbp.METHODS)
def test_pytree_state_matches_flat_state(method):
    """A dict-of-tuples state gives the same gradients as the same dynamics on one vector."""
    p = tanh_rnn(n=8)
    w, x = p.params

    def f_tree(s):
        h = torch.cat([s["a"], s["b"][0], s["b"][1]])
        out = torch.tanh(w @ h + x)
        return {"a": out[:3], "b": (out[3:5], out[5:])}

    s0 = {"a": torch.zeros(3, dtype=DT), "b": (torch.zeros(2, dtype=DT), torch.zeros(3, dtype=DT))}
    torch.manual_seed(0)
    s = rbp.fixed_point(f_tree, s0, 200, method, 60)
    p.loss(torch.cat([s["a"], *s["b"]])).backward()
    tree_grads = [w.grad.clone(), x.grad.clone()]
    torch.manual_seed(0)
    flat = method_gradients(p, method, steps=200, truncate=60)
    assert max_rel_error(tree_grads, flat) <= 1e-12


def test_time_varying_bptt_matches_manual_unroll():
    p = tanh_rnn(n=5)
    w, x = p.params
    drive = torch.randn(7, 5, dtype=DT)

    def f(h, t):
        return torch.tanh(w @ h + x + drive[t])

    h = rbp.fixed_point(f, p.h0, 7, "bptt", time_varying=True)
    p.loss(h).backward()
    got = [w.grad.clone(), x.grad.clone()]
    w.grad = x.grad = None
    hm = p.h0
    for t in range(7):
        hm = f(hm, t)
    p.loss(hm).backward()
    assert max_rel_error(got, [w.grad, x.grad]) <= 1e-14


def test_last_step_is_the_linearisation_map_of_implicit_methods():
    """Implicit gradient = z^T dF_last/dw with z = (I - J_last^T)^{-1} g at h_{T-1}."""
    p = tanh_rnn(n=6)
    w, x = p.params
    seen = []

    def f(h, t):
        seen.append(t)
        return torch.tanh(w @ h + x + 0.1 * torch.sin(torch.tensor(float(t), dtype=DT)))

    def last(h):
        return torch.tanh(0.5 * w @ h + x)

    h = rbp.fixed_point(
        f, p.h0, 30, "neumann", 200, time_varying=True, last_step=last,
        checks=rbp.Checks(settle_tol=None),
    )
    assert seen == list(range(29))  # the last update used `last`, not f
    p.loss(h).backward()
    got = [w.grad.clone(), x.grad.clone()]
    with torch.no_grad():
        h_prev = p.h0
        for t in range(29):
            h_prev = f(h_prev, t)
    jac = torch.autograd.functional.jacobian(last, h_prev)
    hp = h_prev.clone().requires_grad_()
    out = last(hp)
    g = torch.autograd.grad(p.loss(out), out, retain_graph=True)[0]
    z = torch.linalg.solve(torch.eye(6, dtype=DT) - jac.T, g)
    want = torch.autograd.grad(out, [w, x], z)
    assert max_rel_error(got, list(want)) <= 1e-10


def test_input_gradient_and_module_wrapper():
    torch.manual_seed(0)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).double()
            with torch.no_grad():
                self.lin.weight.mul_(0.3)

        def forward(self, x, h):
            return torch.tanh(self.lin(h) + x)

    cell = Cell()
    layer = rbp.FixedPoint(cell, steps=200, method="gmres", truncate=30)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    h = layer(x, torch.zeros(3, 4, dtype=DT))
    h.pow(2).sum().backward()
    gx_layer = x.grad.clone()
    x.grad = None
    bptt = rbp.fixed_point(lambda h: cell(x, h), torch.zeros(3, 4, dtype=DT), 200, "bptt")
    bptt.pow(2).sum().backward()
    assert torch.allclose(gx_layer, x.grad, atol=1e-10)
    assert layer.last_info.backward[0].status == "converged"
    assert "gmres" in repr(layer)


def test_trace_and_info():
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 40, "neumann", 5, checks=rbp.Checks(trace=True), return_info=True,
    )
    assert len(info.forward_trace) == 40
    assert info.forward_trace[-1] < info.forward_trace[0]
    assert info.final_difference == info.forward_trace[-1]
    p.loss(h).backward()
    (record,) = info.backward
    assert record.iterations == 5 and len(record.residuals) == 5 and record.status == "max_iter"


def test_tol_stops_backward_early():
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 200, rbp.linear.Neumann(max_iter=500, tol=1e-10), 500, return_info=True,
    )
    p.loss(h).backward()
    record = info.backward[0]
    assert record.status == "converged" and record.iterations < 500
    got = [q.grad for q in p.params]
    assert max_rel_error(got, exact_gradients(p)) <= 1e-8


def test_no_grad_mode_runs_forward_only():
    p = tanh_rnn()
    with torch.no_grad():
        h = rbp.fixed_point(p.f, p.h0, 50, "neumann")
    assert not h.requires_grad


# ---- numbers are never silently wrong ----


def _expanding(rho: float = 1.3):
    a = (rho * torch.eye(4, dtype=DT)).requires_grad_()
    x = torch.ones(4, dtype=DT, requires_grad=True)
    return a, x, (lambda h: a @ h + x)


@pytest.mark.parametrize("method", ["neumann", "rbp"])
def test_growing_backward_series_is_reported(method):
    a, x, f = _expanding()
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, method, 10, checks=rbp.Checks(settle_tol=None),
    )
    with pytest.warns(rbp.ConvergenceWarning, match="growing|diverged"):
        h.sum().backward()
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, method, 10,
        checks=rbp.Checks(settle_tol=None, on_failure="raise"),
    )
    with pytest.raises(rbp.DivergenceError, match=method):
        h.sum().backward()


def test_fallback_to_gmres_recovers_exact_gradient():
    a, x, f = _expanding()
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "neumann", 10,
        checks=rbp.Checks(settle_tol=None, fallback="gmres"), return_info=True,
    )
    h, info = h
    with pytest.warns(rbp.ConvergenceWarning, match="fell back to gmres"):
        h.sum().backward()
    # z = (I - 1.3 I)^{-1} 1 = -1/0.3 ; dL/dx = z
    assert torch.allclose(x.grad, torch.full((4,), -1 / 0.3, dtype=DT))
    assert info.backward[0].fell_back_to == "gmres"


def test_unsettled_forward_is_reported():
    p = tanh_rnn()
    with pytest.warns(rbp.ConvergenceWarning, match="not settled"):
        rbp.fixed_point(p.f, p.h0, 2, "neumann")
    with pytest.raises(rbp.DivergenceError, match="not settled"):
        rbp.fixed_point(p.f, p.h0, 2, "neumann", checks=rbp.Checks(on_failure="raise"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rbp.fixed_point(p.f, p.h0, 2, "neumann", checks=rbp.Checks(settle_tol=None))
        rbp.fixed_point(p.f, p.h0, 2, "bptt")  # exact for the unroll: nothing to report


def test_divergent_map_raises():
    _, _, f = _expanding(rho=50.0)
    with pytest.raises(rbp.DivergenceError, match="not finite"):
        rbp.fixed_point(f, torch.zeros(4, dtype=DT), 400, "neumann")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "adjoint"}, ValueError, "unknown method 'adjoint'"),
        ({"truncate": 0}, ValueError, "truncate must be an integer >= 1"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"steps": 5, "method": "tbptt", "truncate": 6}, ValueError, "truncate <= steps"),
        ({"checks": rbp.Checks(fallback="gmres"), "method": "bptt"}, ValueError, "fallback"),
        ({"checks": "explode"}, TypeError, "checks"),
        ({"tol": -1.0}, ValueError, "tol must be positive"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    p = tanh_rnn()
    args = {"steps": 10, **kwargs}
    with pytest.raises(error, match=match):
        rbp.fixed_point(p.f, p.h0, **args)


def test_bad_states_and_maps():
    p = tanh_rnn()
    with pytest.raises(TypeError, match=r"h0\[1\] is a int"):
        rbp.fixed_point(lambda s: s, (p.h0, 3), 5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        rbp.fixed_point(lambda s: s, torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="f must be callable"):
        rbp.fixed_point("tanh", p.h0, 5)
    with pytest.raises(TypeError, match="different structure"):
        rbp.fixed_point(lambda s: (s, s), p.h0, 5)
    with pytest.raises(ValueError, match=r"shape of state.*\(8,\) -> \(7,\)"):
        rbp.fixed_point(lambda s: s[:7], p.h0, 5)
    with pytest.raises(TypeError, match="dtype"):
        rbp.fixed_point(lambda s: s.float(), p.h0, 5)


def test_returned_state_can_be_modified_in_place():
    """``h += x`` after fixed_point (a residual connection, say) gives the gradient of
    ``h = h + x``: the returned state is a tensor of its own, not a view of the graph's."""
    torch.manual_seed(0)
    w = (0.5 * torch.randn(8, 8, dtype=torch.float64) / 8**0.5).requires_grad_()
    x = torch.randn(3, 8, dtype=torch.float64)
    grads = []
    for in_place in (False, True):
        w.grad = None
        h = rbp.fixed_point(lambda h: torch.tanh(h @ w.T + x), torch.zeros(3, 8,
                            dtype=torch.float64), 60, "neumann", 40)
        if in_place:
            h += x
        else:
            h = h + x
        (h**2).sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("how", ["call", "module", "tol", "grad"])
def test_warnings_point_at_the_users_line(how):
    """Forward and backward warnings name the user's call (``fixed_point(...)``, the module
    call, ``loss.backward()`` or ``torch.autograd.grad``), not a frame inside rbp or torch."""
    p = tanh_rnn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "call":
            h = rbp.fixed_point(p.f, p.h0, 2, "neumann", 5)  # not settled after 2 steps
        elif how == "module":
            layer = rbp.FixedPoint(lambda x, h: p.f(h) + 0 * x, steps=2, truncate=5)
            h = layer(torch.zeros(()), p.h0)
        elif how == "tol":
            h = rbp.fixed_point(
                p.f, p.h0, 2, "neumann", 5, tol=1e-12, checks=rbp.Checks(settle_tol=None),
            )
        else:
            h = rbp.fixed_point(
                p.f, p.h0, 200, "neumann", 1, checks=rbp.Checks(max_backward_error=1e-12),
            )
        here = len(caught)
        if how == "grad":
            torch.autograd.grad(h.sum(), p.params)  # backward: a 1-term series is inaccurate
        else:
            h.sum().backward()
    assert caught and all(issubclass(w.category, rbp.ConvergenceWarning) for w in caught)
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
    if how == "grad":
        assert here == 0  # the warning came from the backward, and still names this file


@pytest.mark.parametrize("method", ["bptt", "gmres"])
def test_dict_keys_in_another_order_are_named(method):
    """The order of a dict state's keys is part of its structure: f returning them in another
    order is told so, at step 0, naming both orders."""
    w = (0.3 * torch.randn(4, 4, dtype=DT)).requires_grad_()
    h0 = {"a": torch.zeros(2, 4, dtype=DT), "b": torch.ones(3, dtype=DT)}
    f = lambda s: {"b": 0.5 * s["b"], "a": torch.tanh(s["a"] @ w.T + 1)}  # noqa: E731
    with pytest.raises(TypeError, match=r"dict keys in another order at step 0 \(h0 has "
                       r"\['a', 'b'\], f gave \['b', 'a'\]\)"):
        rbp.fixed_point(f, h0, 30, method, 10)
    g = lambda s: {k: (0.5 * s[k] if k == "b" else torch.tanh(s[k] @ w.T + 1)) for k in s}  # noqa: E731
    assert list(rbp.fixed_point(g, h0, 30, method, 10)) == ["a", "b"]
