"""The adjoint wiring of rbp.fixed_point: never silently wrong (issue 9), per-sample, autocast."""

from __future__ import annotations

import math
import warnings
import weakref

import pytest
import torch
from dynamics import DT, exact_gradients, max_rel_error, method_gradients, tanh_rnn

import rbp

IMPLICIT = list(rbp.IMPLICIT_METHODS)


def linear(rho: float, n: int = 4):
    """h <- rho h + x: z = g / (1 - rho), dL/dx = z for L = sum(h)."""
    a = (rho * torch.eye(n, dtype=DT)).requires_grad_()
    x = torch.ones(n, dtype=DT, requires_grad=True)
    return a, x, (lambda h: a @ h + x)


# ---- a truncated solve far from the answer is reported ----


@pytest.mark.parametrize("rho", [1.02, 0.99])
@pytest.mark.parametrize("method", ["neumann", "rbp"])
def test_inaccurate_truncation_warns_and_raises(method, rho):
    _, x, f = linear(rho)
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, method, 20, checks=rbp.Checks(settle_tol=None),
    )
    with pytest.warns(rbp.ConvergenceWarning, match=method):
        h.sum().backward()
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, method, 20,
        checks=rbp.Checks(settle_tol=None, on_failure="raise"),
    )
    with pytest.raises(rbp.DivergenceError, match=method):
        h.sum().backward()


@pytest.mark.parametrize("method", IMPLICIT)
def test_contractive_case_stays_silent_and_is_accurate(method):
    p = tanh_rnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = method_gradients(
            p, method, steps=200, truncate=40, checks=rbp.Checks(on_failure="raise"),
        )
    assert max_rel_error(got, exact_gradients(p)) <= 1e-6


def test_error_estimate_is_in_the_info_and_bounds_the_real_error():
    _, x, f = linear(0.9)
    h, info = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "neumann", 20,
        checks=rbp.Checks(settle_tol=None, on_failure="ignore"), return_info=True,
    )
    h.sum().backward()
    real = abs(x.grad[0].item() - 10.0) / x.grad[0].item()
    est = info.backward[0].error_estimate
    assert est == pytest.approx(real, rel=1e-6)  # exact for a geometric series


def test_threshold_is_user_settable():
    _, _, f = linear(0.9)
    for limit, should_raise in ((1.0, False), (1e-3, True), (None, False)):
        h = rbp.fixed_point(
            f, torch.zeros(4, dtype=DT), 1, "neumann", 20,
            checks=rbp.Checks(settle_tol=None, on_failure="raise", max_backward_error=limit),
        )
        if should_raise:
            with pytest.raises(rbp.DivergenceError, match="max_backward_error"):
                h.sum().backward()
        else:
            h.sum().backward()


def test_krylov_error_estimate_is_the_true_residual():
    p = tanh_rnn()
    h, info = rbp.fixed_point(
        p.f, p.h0, 200, "gmres", 3, checks=rbp.Checks(on_failure="ignore"), return_info=True,
    )
    p.loss(h).backward()
    record = info.backward[0]
    # recompute ||(I - J^T) z - g|| / ||g|| densely
    with torch.no_grad():
        hs = p.h0.clone()
        for _ in range(199):
            hs = p.f(hs)
    jac = torch.autograd.functional.jacobian(p.f, hs)
    out_in = hs.clone().requires_grad_()
    out = p.f(out_in)
    g = torch.autograd.grad(p.loss(out), out)[0]
    # z is what reached x: dL/dx = z^T dF/dx = z * (1 - h^2)
    z = p.params[1].grad / (1 - p.f(hs).detach() ** 2)
    true = ((z - jac.T @ z - g).norm() / g.norm()).item()
    assert record.relative_residual == pytest.approx(true, rel=1e-6)
    assert record.error_estimate >= record.relative_residual  # an error, not a residual


# ---- statuses that must not lie ----


def test_singular_system_is_not_converged():
    _, _, f = linear(1.0)
    h, info = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "gmres", 5,
        checks=rbp.Checks(settle_tol=None, on_failure="ignore"), return_info=True,
    )
    h.sum().backward()
    assert info.backward[0].status == "breakdown"
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "cg", 5,
        checks=rbp.Checks(settle_tol=None, on_failure="raise"),
    )
    with pytest.raises(rbp.DivergenceError, match="breakdown"):
        h.sum().backward()


def test_failed_fallback_under_raise_raises():
    _, x, f = linear(1.0)  # singular: no solver can succeed
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "neumann", 10,
        checks=rbp.Checks(settle_tol=None, fallback="gmres", on_failure="raise"),
    )
    with pytest.raises(rbp.DivergenceError, match="fallback gmres failed too"):
        h.sum().backward()
    h = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "neumann", 10,
        checks=rbp.Checks(settle_tol=None, fallback="gmres"),
    )
    with pytest.warns(rbp.ConvergenceWarning, match="failed too"):
        h.sum().backward()


@pytest.mark.parametrize("method", IMPLICIT)
@pytest.mark.parametrize("k", [10**5, 10])
def test_zero_residual_stops_at_once_without_false_warnings(method, k):
    """A long series stops at the first zero increment; a short untoleranced Neumann (no host
    read inside its loop) runs out its K zero products, and is still 'converged'."""
    a = torch.zeros(4, 4, dtype=DT, requires_grad=True)
    x = torch.ones(4, dtype=DT, requires_grad=True)
    f = lambda h: a @ h + x  # noqa: E731  J = 0
    for scale in (1.0, 0.0):  # J = 0, then g = 0
        h, info = rbp.fixed_point(f, torch.zeros(4, dtype=DT), 3, method, k, return_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (scale * h.sum()).backward()
        record = info.backward[0]
        assert record.status == "converged" and record.error_estimate == 0.0
        assert record.iterations <= (2 if k > 64 else k)
    assert torch.equal(x.grad, torch.ones(4, dtype=DT))


@pytest.mark.parametrize("method", IMPLICIT)
def test_nan_in_the_backward_is_a_clear_divergence(method):
    p = tanh_rnn()
    h = rbp.fixed_point(p.f, p.h0, 200, method, 10, checks=rbp.Checks(on_failure="raise"))
    with pytest.raises(rbp.DivergenceError, match="diverged"):
        (h * torch.tensor(math.nan, dtype=DT)).sum().backward()


# ---- RBP's start ----


def test_rbp_default_start_is_linear_in_the_loss():
    p = tanh_rnn()
    base = method_gradients(p, "rbp", steps=200, truncate=5)
    for q in p.params:
        q.grad = None
    h = rbp.fixed_point(p.f, p.h0, 200, "rbp", 5)
    (1e-6 * p.loss(h)).backward()
    assert max_rel_error([1e6 * q.grad for q in p.params], base) <= 1e-12
    for q in p.params:
        q.grad = None
    h = rbp.fixed_point(p.f, p.h0, 200, "rbp", 5, checks=rbp.Checks(on_failure="ignore"))
    (0.0 * p.loss(h)).backward()
    assert all(torch.equal(q.grad, torch.zeros_like(q)) for q in p.params)


def test_paper_uniform_start_is_an_option():
    p = tanh_rnn()
    torch.manual_seed(0)
    uniform = method_gradients(
        p, rbp.linear.RBP(max_iter=3, init="uniform"), steps=200,
        checks=rbp.Checks(on_failure="ignore"),
    )
    zeros = method_gradients(
        p, "rbp", steps=200, truncate=3, checks=rbp.Checks(on_failure="ignore"),
    )
    assert max_rel_error(uniform, zeros) > 1e-3  # the start matters at small K
    long = method_gradients(p, rbp.linear.RBP(max_iter=120, init="uniform"), steps=200)
    assert max_rel_error(long, exact_gradients(p)) <= 1e-8


# ---- second derivatives and torch.func ----


@pytest.mark.parametrize("method", [*IMPLICIT, rbp.JFB(), rbp.Phantom(3)])
def test_double_backward_is_refused_clearly(method):
    p = tanh_rnn()
    h = rbp.fixed_point(
        p.f, p.h0, 200, method, **({"truncate": 10} if isinstance(method, str) else {})
    )
    with pytest.raises(RuntimeError, match="create_graph=True.*bptt, tbptt"):
        torch.autograd.grad(p.loss(h), p.params, create_graph=True)


def test_double_backward_through_bptt_still_works():
    p = tanh_rnn(n=4)
    h = rbp.fixed_point(p.f, p.h0, 30, "bptt")
    (gw, _) = torch.autograd.grad(p.loss(h), p.params, create_graph=True)
    (hvp,) = torch.autograd.grad(gw.sum(), p.params[1])
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_over_an_implicit_method_is_refused_clearly(transform):
    w = (0.5 * torch.eye(3, dtype=DT)).requires_grad_()

    def fn(x):
        return rbp.fixed_point(
            lambda h: torch.tanh(w @ h + x), torch.zeros(3, dtype=DT), 30, "neumann"
        ).sum()

    x = torch.ones(3, dtype=DT)
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        if transform == "grad":
            torch.func.grad(fn)(x)
        else:
            torch.func.vmap(fn)(torch.ones(2, 3, dtype=DT))


# ---- per-sample solves ----


def _batched_rnn(batch=4, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))[0]
    s = 0.6 * torch.eye(n, dtype=DT) + torch.diag(torch.full((n - 1,), 0.9, dtype=DT), 1)
    w = (q @ s @ q.T).requires_grad_()
    x = torch.randn(batch, n, dtype=DT, generator=gen).requires_grad_()
    target = torch.randn(batch, n, dtype=DT, generator=gen)
    return w, x, target


@pytest.mark.parametrize("method", IMPLICIT)
def test_per_sample_solve_equals_each_sample_alone(method):
    w, x, target = _batched_rnn()

    def f(h, xb):
        return torch.tanh(h @ w.T + xb)

    h, info = rbp.fixed_point(
        f, torch.zeros_like(x), 300, method, 6, batch_dim=0, inputs=(x,),
        checks=rbp.Checks(on_failure="ignore"), return_info=True,
    )
    (0.5 * (h - target).pow(2).sum()).backward()
    batched_w, batched_x = w.grad.clone(), x.grad.clone()
    errors = info.backward[0].sample_errors
    assert len(errors) == 4
    sum_w = torch.zeros_like(w)
    for i in range(4):
        w.grad = x.grad = None
        xi = x[i : i + 1]
        hi, infoi = rbp.fixed_point(
            lambda h, xi=xi: torch.tanh(h @ w.T + xi), torch.zeros_like(xi), 300, method, 6,
            checks=rbp.Checks(on_failure="ignore"), return_info=True,
        )
        (0.5 * (hi - target[i : i + 1]).pow(2).sum()).backward()
        sum_w += w.grad
        assert torch.allclose(batched_x[i], x.grad[i], rtol=1e-9, atol=1e-12)
        assert errors[i] == pytest.approx(infoi.backward[0].error_estimate, rel=1e-6)
    assert torch.allclose(batched_w, sum_w, rtol=1e-9, atol=1e-12)


def test_per_sample_gmres_is_more_accurate_than_one_space_for_the_batch():
    w, x, target = _batched_rnn(batch=8)

    def loss_grads(batch_dim):
        w.grad = x.grad = None
        h = rbp.fixed_point(
            lambda h, xb: torch.tanh(h @ w.T + xb), torch.zeros_like(x), 300, "gmres", 4,
            batch_dim=batch_dim, inputs=(x,), checks=rbp.Checks(on_failure="ignore"),
        )
        (0.5 * (h - target).pow(2).sum()).backward()
        return [w.grad.clone(), x.grad.clone()]

    w.grad = x.grad = None
    h = rbp.fixed_point(
        lambda h, xb: torch.tanh(h @ w.T + xb),
        torch.zeros_like(x),
        300,
        "gmres",
        6,
        batch_dim=0,
        inputs=(x,),
    )
    (0.5 * (h - target).pow(2).sum()).backward()
    exact = [w.grad.clone(), x.grad.clone()]  # K = n: exact per sample
    per_sample, whole = loss_grads(0), loss_grads(None)
    assert max_rel_error(per_sample, exact) < max_rel_error(whole, exact)


def test_bad_batch_dim_is_refused():
    p = tanh_rnn()
    with pytest.raises((ValueError, TypeError), match="batch_dim"):
        rbp.fixed_point(p.f, p.h0, 10, "neumann", batch_dim=3)


# ---- mixed precision ----


def test_autocast_bfloat16_forward_float32_adjoint():
    torch.manual_seed(0)
    n, batch = 32, 4
    w = (0.5 * torch.linalg.qr(torch.randn(n, n))[0]).requires_grad_()
    x = torch.randn(batch, n, requires_grad=True)
    target = torch.randn(batch, n)

    def run(autocast: bool):
        w.grad = x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h, info = rbp.fixed_point(
                lambda h: torch.tanh(h @ w.T + x).float(), torch.zeros(batch, n), 60, "neumann", 20,
                return_info=True, checks=rbp.Checks(settle_tol=None),
            )
        (0.5 * (h - target).pow(2).sum()).backward()
        return [w.grad.clone(), x.grad.clone()], info

    ref, _ = run(False)
    got, info = run(True)
    assert info.backward[0].dtype == "float32"
    assert max_rel_error(got, ref) <= 3e-2  # bfloat16 matmuls: ~8 bits of mantissa


def test_autocast_without_a_cast_back_says_how_to_fix_it():
    w = (0.5 * torch.eye(8)).requires_grad_()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(TypeError, match=r"float32 -> torch.bfloat16.*under torch.autocast"),
    ):
        rbp.fixed_point(lambda h: torch.tanh(h @ w.T), torch.zeros(4, 8), 10, "gmres")


def test_bfloat16_state_solves_in_float32():
    w = (0.5 * torch.eye(8)).to(torch.bfloat16).requires_grad_()
    x = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    h, info = rbp.fixed_point(
        lambda h: w @ h + x,
        torch.zeros(8, dtype=torch.bfloat16),
        40,
        "neumann",
        30,
        return_info=True,
    )
    h.float().sum().backward()
    assert info.backward[0].dtype == "float32"
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.float(), torch.full((8,), 2.0), rtol=1e-2)


# ---- memory ----


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("method", [rbp.JFB(), rbp.Phantom(5), rbp.Implicit(rbp.linear.GMRES())])
def test_value_methods_keep_constant_memory(method):
    p = tanh_rnn(n=64)
    sizes = [_saved_bytes(lambda s=s: rbp.fixed_point(p.f, p.h0, s, method)) for s in (50, 500)]
    assert sizes[0] == sizes[1] > 0


def test_an_inaccurate_truncation_falls_back_and_is_then_exact():
    _, x, f = linear(0.99)
    h, info = rbp.fixed_point(
        f, torch.zeros(4, dtype=DT), 1, "neumann", 20,
        checks=rbp.Checks(settle_tol=None, fallback="gmres"), return_info=True,
    )
    with pytest.warns(rbp.ConvergenceWarning, match="max_backward_error.*fell back to gmres"):
        h.sum().backward()
    assert torch.allclose(x.grad, torch.full((4,), 100.0, dtype=DT))
    assert info.backward[0].fell_back_to == "gmres" and info.backward[0].error_estimate < 1e-12


def test_per_sample_backward_tol_stops_each_sample():
    w, x, target = _batched_rnn()
    h, info = rbp.fixed_point(
        lambda h, xb: torch.tanh(h @ w.T + xb), torch.zeros_like(x), 300,
        rbp.linear.GMRES(max_iter=50, tol=1e-9), 50, batch_dim=0, inputs=(x,), return_info=True,
    )
    (0.5 * (h - target).pow(2).sum()).backward()
    record = info.backward[0]
    assert record.status == "converged"
    assert max(record.sample_errors) <= 1e-9


def _counting(fn, calls: list) -> object:
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_engine_fast_path_equals_the_public_autograd_path(monkeypatch):
    """The per-product engine call gives the same gradient as torch.autograd.grad (both
    engine entry points off: the CPU takes the direct one first)."""
    from rbp import jacobian

    p = tanh_rnn()
    engine_calls: list = []
    direct = jacobian._ENGINE_DIRECT or jacobian._ENGINE_RUN_BACKWARD
    assert direct is not None, "neither engine entry point exists in this torch"
    monkeypatch.setattr(jacobian, "_ENGINE_DIRECT", _counting(direct, engine_calls))
    fast = method_gradients(p, "neumann", steps=200, truncate=20)
    assert engine_calls, "the fast path was not taken"
    monkeypatch.setattr(jacobian, "_ENGINE_DIRECT", None)
    monkeypatch.setattr(jacobian, "_ENGINE_RUN_BACKWARD", None)
    calls: list = []
    monkeypatch.setattr(torch.autograd, "grad", _counting(torch.autograd.grad, calls))
    slow = method_gradients(p, "neumann", steps=200, truncate=20)
    assert len(calls) >= 20, "the public path was not taken"
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert max_rel_error(fast, exact_gradients(p)) <= 1e-6


def test_user_solver_with_a_flat_vector_takes_the_public_path():
    p = tanh_rnn()

    def solve(matvec, b):  # a Neumann series on 1-D vectors (another shape than b)
        v, z = b.reshape(-1), b.reshape(-1).clone()
        for _ in range(60):
            v = matvec.vjp(v).reshape(-1)
            z = z + v
        return z.reshape(b.shape)

    h = rbp.fixed_point(p.f, p.h0, 200, rbp.Implicit(solve))
    p.loss(h).backward()
    assert max_rel_error([q.grad for q in p.params], exact_gradients(p)) <= 1e-9


# ---- the adjoint holds no reference cycle: the graph is freed as soon as it is unreachable ----


class _Marker:
    pass


class _Tag(torch.autograd.Function):
    """Identity whose graph node holds a marker object: the node's lifetime is observable."""

    markers: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.marker = _Marker()
        _Tag.markers.append(weakref.ref(ctx.marker))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("pytree", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("backward", [False, True])
def test_graph_of_the_last_step_is_freed_without_the_garbage_collector(pytree, backward):
    import gc

    w = (0.3 * torch.randn(5, 5, dtype=DT)).requires_grad_()
    if pytree:
        def f(h):
            return (torch.tanh(_Tag.apply(h[0]) @ w), torch.tanh(h[1] @ w.T))
        h0 = (torch.zeros(2, 5, dtype=DT), torch.zeros(2, 5, dtype=DT))
    else:
        def f(h):
            return torch.tanh(_Tag.apply(h) @ w + 1.0)
        h0 = torch.zeros(2, 5, dtype=DT)
    _Tag.markers.clear()
    gc.disable()  # a cycle would keep the graph alive until a collection
    try:
        h = rbp.fixed_point(f, h0, 30, "neumann", 5)
        loss = sum(x.sum() for x in (h if pytree else (h,)))
        if backward:
            loss.backward(retain_graph=True)
            assert w.grad is not None and torch.isfinite(w.grad).all()
        assert any(r() is not None for r in _Tag.markers)  # the last step's node is alive
        del h, loss
        assert all(r() is None for r in _Tag.markers), "the last step's graph outlived its output"
    finally:
        gc.enable()
