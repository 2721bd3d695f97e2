"""rbp.WarmStart: stored states are the returned fixed points; fewer steps warm; clear errors."""

from __future__ import annotations

import pytest
import torch

import rbp

DT = torch.float64
N, D = 12, 8


def _model(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = (0.7 / D**0.5 * torch.randn(D, D, generator=g, dtype=DT)).requires_grad_()
    X = torch.randn(N, D, generator=g, dtype=DT)
    return A, X


def _solve(A, x, h0, tol=1e-10):
    f = lambda h, x_: torch.tanh(h @ A.T + x_)  # noqa: E731
    return rbp.fixed_point(f, h0, steps=300, method="gmres", truncate=40, tol=tol,
                           batch_dim=0, inputs=(x,), return_info=True)


def test_per_sample_states_and_fewer_steps() -> None:
    A, X = _model()
    cache = rbp.WarmStart(num_samples=N)
    batches = [torch.tensor([3, 0, 7, 11]), torch.tensor([1, 2, 4, 5, 6]), torch.tensor([8, 9, 10])]
    cold_steps = 0
    for ids in batches:
        h0 = cache.h0(torch.zeros(len(ids), D, dtype=DT), ids)
        assert torch.equal(h0, torch.zeros_like(h0))  # first epoch: all cold
        h, info = _solve(A, X[ids], h0, tol=1e-6)
        cold_steps += sum(info.forward_steps)
        h, _ = _solve(A, X[ids], h0)
        cache.update(h, ids)
    assert (cache.hits, cache.misses, len(cache)) == (0, N, N)
    # the stored states are the returned fixed points, detached
    ids = torch.tensor([11, 3, 5])
    h0 = cache.h0(torch.zeros(3, D, dtype=DT), ids)
    assert not h0.requires_grad
    exact, _ = _solve(A, X[ids], torch.zeros(3, D, dtype=DT), tol=1e-13)
    assert torch.allclose(h0, exact.detach(), atol=1e-9)
    # a training step moves A a little; the second epoch starts warm and takes fewer steps
    with torch.no_grad():
        A += 1e-3 * torch.randn(D, D, generator=torch.Generator().manual_seed(1), dtype=DT)
    cache.hits = cache.misses = 0
    warm_steps = 0
    for ids in batches:
        h0 = cache.h0(torch.zeros(len(ids), D, dtype=DT), ids)
        warm_steps += sum(_solve(A, X[ids], h0, tol=1e-6)[1].forward_steps)
        h, _ = _solve(A, X[ids], h0)
        # same fixed point and same gradient as a cold start
        cold, _ = _solve(A, X[ids], torch.zeros_like(h0))
        assert torch.allclose(h, cold, atol=1e-8)
        ga = torch.autograd.grad(h.sum(), A)[0]
        gc = torch.autograd.grad(cold.sum(), A)[0]
        assert torch.allclose(ga, gc, atol=1e-7)
        cache.update(h, ids)
    assert (cache.hits, cache.misses) == (N, 0)
    # error 1 -> 1e-6 cold, 1e-3 -> 1e-6 warm: about half the steps of a linear rate
    assert warm_steps < 0.65 * cold_steps, (warm_steps, cold_steps)
    print(f"forward steps to 1e-6, {N} samples: cold {cold_steps}, warm {warm_steps}")


def test_unseen_ids_start_cold_and_batch_dim_1() -> None:
    cache = rbp.WarmStart(num_samples=5, batch_dim=1)
    h = torch.arange(6.0).reshape(2, 3)  # (features, batch)
    cache.update(h, torch.tensor([4, 0, 2]))
    h0 = cache.h0(torch.full((2, 2), -1.0), torch.tensor([2, 1]))
    assert torch.equal(h0, torch.tensor([[2.0, -1.0], [5.0, -1.0]]))
    assert (cache.hits, cache.misses) == (1, 1)


def test_whole_state_and_tuples() -> None:
    cache = rbp.WarmStart()
    cold = (torch.zeros(4, 3), torch.zeros(2))
    assert all(torch.equal(a, b) for a, b in zip(cache.h0(cold), cold, strict=True))
    h = (torch.randn(4, 3, requires_grad=True), torch.randn(2))
    cache.update(h)
    out = cache.h0(cold)
    assert torch.equal(out[0], h[0].detach()) and not out[0].requires_grad
    assert torch.equal(out[1], h[1])
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        cache.h0((torch.zeros(5, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="structure"):
        cache.h0(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="float32"):
        cache.h0((torch.zeros(4, 3, dtype=DT), torch.zeros(2, dtype=DT)))
    with pytest.raises(ValueError, match="do not pass ids"):
        cache.h0(cold, torch.tensor([0]))
    cache.clear()
    assert len(cache) == 0 and cache.h0(torch.ones(1)).item() == 1.0


def test_bad_ids_and_shapes() -> None:
    cache = rbp.WarmStart(num_samples=4)
    cache.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass ids"):
        cache.h0(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"in \[0, 4\).*other samples"):
        cache.h0(torch.zeros(2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="3 ids for a batch of"):
        cache.h0(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D integer"):
        cache.h0(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="row shape"):
        cache.h0(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="repeat"):
        cache.update(torch.zeros(2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="float64"):
        cache.update(torch.zeros(2, 3, dtype=DT), torch.tensor([0, 1]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            rbp.WarmStart(num_samples=bad)


def test_other_device_is_refused() -> None:
    cache = rbp.WarmStart(num_samples=3)
    cache.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="on cpu.*on meta"):
        cache.h0(torch.zeros(2, 3, device="meta"), torch.tensor([0, 1]))
    whole = rbp.WarmStart()
    whole.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="on cpu.*on meta"):
        whole.h0(torch.zeros(2, 3, device="meta"))


def test_a_state_with_nan_or_inf_is_not_handed_out() -> None:
    """A diverged sample (NaN or inf in any leaf) starts cold next time instead of poisoning
    every later solve; the other rows of its batch are kept; counted in ``rejected``."""
    cache = rbp.WarmStart(num_samples=5, batch_dim=1)
    h = (torch.arange(8.0).reshape(2, 4), torch.ones(3, 4))   # 4 samples along dim 1
    h[0][1, 2] = float("nan")
    h[1][0, 3] = float("inf")
    cache.update(h, torch.tensor([0, 1, 2, 3]))
    assert cache.rejected == 2 and len(cache) == 2
    out = cache.h0((torch.full((2, 2), -1.0), torch.full((3, 2), -1.0)), torch.tensor([2, 1]))
    assert torch.equal(out[0], torch.tensor([[-1.0, 1.0], [-1.0, 5.0]]))  # id 2 cold, 1 warm
    assert cache.hits == 1 and cache.misses == 1
    # a finite row stored earlier and NaN now: cold from now on
    cache.update((torch.full((2, 1), float("nan")), torch.ones(3, 1)), torch.tensor([1]))
    assert cache.rejected == 3 and len(cache) == 1
    assert torch.equal(cache.h0((torch.zeros(2, 1), torch.zeros(3, 1)), torch.tensor([1]))[0],
                       torch.zeros(2, 1))
    whole = rbp.WarmStart()
    whole.update(torch.ones(3))
    whole.update(torch.tensor([1.0, float("nan"), 0.0]))
    assert whole.rejected == 1 and len(whole) == 0
    assert torch.equal(whole.h0(torch.zeros(3)), torch.zeros(3))
    assert "rejected=1" in repr(whole)
    whole.clear()
    assert whole.rejected == 0
