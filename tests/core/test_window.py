"""The increments window of the series solvers (Ritz tail): a ring written in place must hold,
per row, the last RATE_WINDOW + 1 increments that row took before it froze."""

from __future__ import annotations

import torch

from rbp.linear import RATE_WINDOW, _Window


def _reference(pushes: list[torch.Tensor], alive: list[torch.Tensor | None]) -> torch.Tensor:
    size, rows = RATE_WINDOW + 1, pushes[0].shape[0]
    k = min(len(pushes), size)
    out = torch.zeros(k, *pushes[0].shape, dtype=pushes[0].dtype)
    for r in range(rows):
        taken = [v[r] for v, a in zip(pushes, alive, strict=True) if a is None or a[r]]
        for j, v in enumerate(taken[-k:][::-1]):
            out[k - 1 - j, r] = v
    return out


def test_ring_window_holds_each_rows_last_increments_before_it_froze() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        rows, n, steps = 5, 3, int(torch.randint(1, 20, (1,), generator=gen))
        window, pushes, alive = _Window(), [], []
        mask = None
        for t in range(steps):
            v = torch.randn(rows, n, generator=gen, dtype=torch.float64)
            if t > 1 and trial % 3:   # rows freeze at random (and stay frozen)
                fresh = torch.rand(rows, generator=gen) > 0.2
                mask = fresh if mask is None else mask & fresh
            window.push(v, mask)
            pushes.append(v)
            alive.append(None if mask is None else mask.clone())
        got = torch.stack(window.tensors())
        torch.testing.assert_close(got, _reference(pushes, alive), rtol=0, atol=0)


def test_window_from_a_first_increment() -> None:
    b = torch.arange(6.0).reshape(2, 3)
    w = _Window(b)
    assert len(w.tensors()) == 1 and torch.equal(w.tensors()[0], b)
