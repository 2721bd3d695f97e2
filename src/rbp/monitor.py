"""Monitoring a DEQ: residual traces of a solve, and the spectral radius of J at its end.

- :class:`ResidualMonitor` wraps ``f`` and records, at every call, the absolute residual
  ``||F(h) - h||`` and the relative one ``||F(h) - h|| / ||F(h)||`` (the quantity
  :func:`rbp.fixed_point`'s ``tol`` tests), whatever forward solver makes the calls.
- :func:`spectral_radius` estimates ``rho(J)``, ``J = dF/dh`` at a state (a fixed point), by
  power iteration on vector-Jacobian products, and says whether the estimate converged:
  ``rho < 1`` is what the fixed-point iteration and the Neumann / RBP backward need.

>>> mon = rbp.ResidualMonitor(f)
>>> h = rbp.fixed_point(mon, h0, steps=50, tol=1e-4, solver="anderson")
>>> mon.abs_trace[-1], mon.rel_trace[-1]
>>> rbp.spectral_radius(f, h)            # RadiusEstimate(rho=0.62, converged=True, iters=50)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from rbp import tree
from rbp.diagnostics import spectral_radius_power
from rbp.tree import State

Tensor = torch.Tensor

__all__ = ["RadiusEstimate", "ResidualMonitor", "spectral_radius"]


class ResidualMonitor:
    """``f`` that records its residuals: pass it to :func:`rbp.fixed_point` in place of ``f``.

    Call ``t`` (0-based) records ``abs_trace[t] = ||F(h) - h||`` and ``rel_trace[t] =
    ||F(h) - h|| / ||F(h)||`` for the state ``h`` it was called with (norms over all state
    leaves). With the plain iteration ``abs_trace[t] = ||h_{t+1} - h_t||``; with Anderson or
    Broyden it is the residual at each of the solver's iterates; with ``batch_dim`` a call
    sees the not-yet-converged samples only, so later entries cover fewer samples. Every call
    is recorded, including those :func:`rbp.fixed_point` makes besides the iterations: its
    checks (with ``batch_dim``, a probe on a 2-sample sub-batch) and, for the implicit methods
    after a graph-free solve, the differentiable step at the returned state (a repeat of the
    last residual). The norms
    are kept as tensors (no host sync per call) and read as floats on access. The monitor
    passes extra arguments (``t``, ``inputs``) through; :meth:`reset` empties the traces.
    """

    def __init__(self, f: Callable[..., State]) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
        self.f = f
        self._abs: list[Tensor] = []
        self._out: list[Tensor] = []

    def __call__(self, h: State, *args: Any) -> State:
        out = self.f(h, *args)
        with torch.no_grad():
            h_leaves, spec = tree.flatten(h, "h")
            o_leaves = tree.check_same_structure(spec, h_leaves, out, len(self._abs))
            diff = torch.stack([(o.detach() - a.detach()).double().norm() for o, a in
                                zip(o_leaves, h_leaves, strict=True)]).norm()
            size = torch.stack([o.detach().double().norm() for o in o_leaves]).norm()
        self._abs.append(diff)
        self._out.append(size)
        return out

    @property
    def calls(self) -> int:
        """Number of calls of ``f`` recorded."""
        return len(self._abs)

    @property
    def abs_trace(self) -> list[float]:
        """``||F(h) - h||`` at each call."""
        return torch.stack(self._abs).tolist() if self._abs else []

    @property
    def rel_trace(self) -> list[float]:
        """``||F(h) - h|| / ||F(h)||`` at each call (``inf`` where ``F(h) = 0 != h``)."""
        if not self._abs:
            return []
        a, o = torch.stack(self._abs), torch.stack(self._out)
        return torch.where(a == 0, torch.zeros_like(a), a / o).tolist()

    def reset(self) -> None:
        """Empty the traces (e.g. before the next solve)."""
        self._abs.clear()
        self._out.clear()


class RadiusEstimate(NamedTuple):
    """A power-iteration estimate of ``rho(J)``: ``converged`` tells whether to trust it.

    With ``batch_dim``, ``per_sample[i]`` is sample ``i``'s radius and ``per_sample_converged``
    its flag; ``rho`` is their largest and ``converged`` whether all converged.
    """

    rho: float
    converged: bool
    iters: int
    per_sample: tuple[float, ...] | None = None
    per_sample_converged: tuple[bool, ...] | None = None


def spectral_radius(
    f: Callable[..., State],
    h: State,
    *,
    iters: int = 50,
    seed: int = 0,
    rel_tol: float = 5e-3,
    inputs: Sequence[Any] = (),
    batch_dim: int | None = None,
) -> RadiusEstimate:
    """Estimate the spectral radius of ``J = dF/dh`` at ``h``, and whether it converged.

    Power iteration on ``v -> J^T v`` (one reverse product of one ``f`` call's graph per
    step, no graph kept for the parameters): ``rho ~ (||(J^T)^k v|| / ||v||)^(1/k)`` over the
    last half of the ``iters`` products (Gelfand's formula). ``converged`` is ``True`` when
    the rate over each of the last three quarters agrees within ``rel_tol``
    (:func:`rbp.diagnostics.spectral_radius_power`); otherwise raise ``iters``. For a batch,
    ``J`` is the whole state's Jacobian (block-diagonal over independent samples: its radius
    is the largest sample's, but close radii of different samples slow the estimate down);
    ``batch_dim`` runs one power iteration per sample instead, in the same products (valid
    when ``f`` treats samples independently, as :func:`rbp.fixed_point`'s ``batch_dim``
    assumes). Costs ``iters`` vector-Jacobian products, e.g. once per evaluation, at test time.

    Args:
        f: the map, ``f(h, *inputs)``.
        h: the state at which to measure (detached here).
        iters: number of products (>= 4).
        seed: seed of the random start vector.
        rel_tol: agreement required to call the estimate converged.
        inputs: extra arguments of ``f``.
        batch_dim: the dim of every state leaf that indexes independent samples, for one
            estimate per sample.
    """
    if not callable(f):
        raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 4:
        raise ValueError(f"iters must be an integer >= 4, got {iters!r}")
    h_in, spec = tree.graph_inputs(h, "spectral_radius")
    bad = [i for i, leaf in enumerate(h_in) if not bool(torch.isfinite(leaf.detach()).all())]
    if bad:
        raise ValueError(f"h holds NaN or inf (leaf {bad[0]}): J is not defined there; "
                         "measure at a finite state")
    with torch.enable_grad():
        out = tree.check_same_structure(spec, h_in, f(tree.unflatten(spec, h_in), *inputs), 0)
    live = [i for i, o in enumerate(out) if o.requires_grad]
    if not live:
        raise ValueError("f(h) does not depend on h through autograd: J is not defined")
    flat = tree.to_vector([leaf.detach() for leaf in h_in])

    def vjp(v: Tensor) -> Tensor:
        parts = tree.from_vector(v, out)
        grads = torch.autograd.grad([out[i] for i in live], h_in, [parts[i] for i in live],
                                    retain_graph=True, allow_unused=True)
        return tree.to_vector([torch.zeros_like(x) if g is None else g
                               for g, x in zip(grads, h_in, strict=True)])

    if batch_dim is not None:
        return _per_sample(vjp, flat, [leaf.detach() for leaf in h_in], batch_dim, iters, seed,
                           rel_tol)
    with torch.no_grad():
        rho, converged = spectral_radius_power(vjp, flat, iters=iters, seed=seed,
                                               rel_tol=rel_tol)
    return RadiusEstimate(float(rho), bool(converged), iters)


def _per_sample(
    vjp: Callable[[Tensor], Tensor], flat: Tensor, leaves: list[Tensor], batch_dim: int,
    iters: int, seed: int, rel_tol: float,
) -> RadiusEstimate:
    """One power iteration per sample (the rows of ``batch_dim``), in shared products."""
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise ValueError(f"batch_dim must be an integer or None, got {batch_dim!r}")
    sizes = {leaf.shape[batch_dim] if -leaf.dim() <= batch_dim < leaf.dim() else None
             for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"batch_dim={batch_dim} must index the same number of samples in every state leaf; "
            f"the leaves have shapes {[tuple(leaf.shape) for leaf in leaves]}"
        )
    (n,) = sizes
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(flat.shape, generator=gen, dtype=flat.dtype).to(flat.device)

    def rows(vec: Tensor) -> list[Tensor]:  # each leaf as (samples, rest)
        return [part.movedim(batch_dim, 0).reshape(n, -1)
                for part in tree.from_vector(vec, leaves)]

    def norms(vec: Tensor) -> Tensor:
        return torch.cat(rows(vec), dim=1).norm(dim=1)

    def scale(vec: Tensor, by: Tensor) -> Tensor:
        parts = []
        for part in tree.from_vector(vec, leaves):
            shape = [1] * part.dim()
            shape[batch_dim] = n
            parts.append(part / by.reshape(shape))
        return tree.to_vector(parts)

    logs = []
    with torch.no_grad():
        v = scale(v, norms(v))
        for _ in range(iters):
            v = vjp(v)
            size = norms(v)
            logs.append(size.log())
            v = scale(v, torch.where(size > 0, size, torch.ones_like(size)))
    logs_t = torch.stack(logs)  # (iters, samples)
    half, mid = iters // 2, iters // 2 + (iters - iters // 2) // 2
    rho = logs_t[half:].mean(0).exp()
    rates = torch.stack([logs_t[a:b].mean(0).exp()
                         for a, b in ((iters // 4, half), (half, mid), (mid, iters))])
    spread = rates.max(0).values - rates.min(0).values
    ok = (rho == 0) | (spread <= rel_tol * rho)
    per = tuple(float(r) for r in rho)
    per_ok = tuple(bool(c) for c in ok)
    return RadiusEstimate(max(per), all(per_ok), iters, per, per_ok)
