"""Penalties to add to a loss so that training keeps the map ``F`` contractive.

``jacobian_penalty(f, h)`` is the Hutchinson estimate of ``||J||_F^2`` at ``h``
(``J = dF/dh``): for probes ``v ~ N(0, I)``, ``E ||J^T v||^2 = tr(J J^T) = ||J||_F^2``; one
reverse product per probe, differentiable in the parameters of ``f`` (``create_graph``), as in
the DEQ literature's Jacobian regularisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rbp import tree
from rbp.diagnostics import report, spectral_radius_power
from rbp.tree import State

Tensor = torch.Tensor


def jacobian_penalty(
    f: Callable[[State], State],
    h: State,
    *,
    probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    spectral_radius: bool = False,
    radius_iters: int = 20,
) -> Tensor | tuple[Tensor, float]:
    """Unbiased estimate of ``||dF/dh||_F^2`` at ``h``, averaged over ``probes`` Gaussian probes.

    Args:
        f: the map ``h -> F(h)`` (closing over its parameters), as passed to
            :func:`rbp.fixed_point`.
        h: the state at which to measure (e.g. the fixed point); it is detached.
        probes: number of probes (the variance falls as 1 / probes).
        generator: a ``torch.Generator`` (on ``h``'s device) for reproducible probes.
        create_graph: keep the graph so the penalty can be back-propagated into ``f``'s
            parameters (``False``: a number to monitor).
        spectral_radius: also return the power-iteration estimate of the spectral radius of J
            (:func:`rbp.diagnostics.spectral_radius_power`: ``radius_iters`` products, no
            graph, Gelfand's formula over the last half of them); ``< 1`` is what the Neumann /
            RBP solvers need. An estimate that has not converged (its value over the second,
            third and last quarter of the products differ by more than 0.5 %) is reported
            with a :class:`~rbp.ConvergenceWarning`: raise ``radius_iters``.

    Returns:
        The penalty (a 0-dim tensor), or ``(penalty, rho_estimate)``.
    """
    if not callable(f):
        raise TypeError(f"f must be callable (state -> state), got {type(f).__name__}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    if isinstance(radius_iters, bool) or not isinstance(radius_iters, int) or radius_iters < 1:
        raise ValueError(f"radius_iters must be an integer >= 1, got {radius_iters!r}")
    h_in, spec = tree.graph_inputs(h, "jacobian_penalty")
    with torch.enable_grad():
        out = tree.check_same_structure(spec, h_in, f(tree.unflatten(spec, h_in)), 0)
        live = [i for i, o in enumerate(out) if o.requires_grad]
        if not live:
            raise ValueError(
                "f(h) does not depend on anything that requires grad: its Jacobian is not "
                "defined through autograd (does f use h?)"
            )
        total = out[live[0]].new_zeros(())
        for _ in range(probes):
            vs = [
                torch.randn(
                    out[i].shape, generator=generator, dtype=out[i].dtype, device=out[i].device
                )
                for i in live
            ]
            jt_v = torch.autograd.grad(
                [out[i] for i in live],
                h_in,
                vs,
                create_graph=create_graph,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            total = total + sum(
                g.float().pow(2).sum() if g.dtype != torch.float64 else g.pow(2).sum() for g in jt_v
            )
    penalty = total / probes
    if not create_graph:
        penalty = penalty.detach()
    if not spectral_radius:
        return penalty

    def vjp(v: Tensor) -> Tensor:
        vs = tree.from_vector(v, [out[i] for i in live])
        full = torch.autograd.grad(
            [out[i] for i in live],
            h_in,
            vs,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return tree.to_vector([g.detach() for g in full])

    like = tree.to_vector([out[i].detach() for i in live])
    if like.numel() != sum(x.numel() for x in h_in):
        raise ValueError("spectral_radius needs every state leaf to depend on the graph")
    rho, converged = spectral_radius_power(vjp, like, iters=radius_iters)
    if not converged:
        report(
            "warn",
            f"jacobian_penalty: the spectral-radius estimate {rho:.4g} has not converged after "
            f"radius_iters={radius_iters} power iterations (it still moves by more than 0.5 % "
            "between the last quarters of them); it may be well off the true value. Raise "
            "radius_iters.",
        )
    return penalty, (rho if math.isfinite(rho) else math.inf)
