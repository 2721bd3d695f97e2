"""Products with ``J = dF/dh`` at the fixed point, for the adjoint solve and its checks.

:class:`JacobianRows` holds the graph of one step ``h_out = F(h_in)`` and gives ``J^T v`` and
``J v`` on ``(batch, n)`` rows (one row per sample with ``batch_dim``, else one row holding the
whole state), computed in float32 at least. ``J^T v`` is one vjp through that graph; ``J v``
(what CG-RBP's normal equations need) a double vjp, ``d/du <J^T u, v>``, or forward mode
through f run again (:func:`jvp_products`). :func:`check_jvp` and :func:`check_same_map` catch
the two ways those can silently be wrong: a step whose backward cannot be differentiated, and
an f that changed between the forward and the backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rbp import tree
from rbp.forward.rows import Layout, describe, from_rows, to_rows
from rbp.tree import State

Tensor = torch.Tensor

__all__ = ["JVP_BY_DOUBLE_VJP", "JVP_FUNC_REMEDY", "JacobianRows", "check_jvp", "check_same_map",
           "jvp_products"]

# What torch.autograd.grad calls once it has checked its arguments (None: not in this torch):
# its Python wrapper, and the C++ engine under it. On CPU the K products call the engine
# directly: they run inside a backward that torch has set up, on the calling thread, and the
# wrapper's logging test and context stash cost ~1 us a product. Other devices keep the
# wrapper (its context reaches the device threads; the launch latency hides its cost there).
_ENGINE_RUN_BACKWARD: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)
_ENGINE_DIRECT: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None
)


def jvp_products(
    mode: str, map_at_fixed_point: Callable[[State], State], spec: Any,
    h_in: list[Tensor], h_out: list[Tensor], live: list[int],
) -> Callable[[list[Tensor]], list[Tensor]]:
    """``v -> J v`` on leaves at ``h_out = F(h_in)``: ``mode="func"`` by forward mode through
    ``map_at_fixed_point`` (f run again, checked to be the forward's map on first use), else
    ``d/du <J^T u, v>`` by a double vjp through the graph of the step (``live``: the leaves of
    ``h_out`` with a graph)."""
    if mode == "func":
        primals = tuple(x.detach() for x in h_in)

        checked: list[bool] = []

        def forward_mode(tangents: list[Tensor]) -> list[Tensor]:
            def fn(*leaves: Tensor) -> tuple[Tensor, ...]:
                out = map_at_fixed_point(tree.unflatten(spec, list(leaves)))
                return tuple(tree.flatten(out)[0])

            with torch.enable_grad():
                values, out_tangents = torch.func.jvp(fn, primals, tuple(tangents))
            if not checked:  # f runs again here: it must still be the forward's map
                check_same_map(values, h_out, "cg (jvp='func')", JVP_FUNC_REMEDY)
                checked.append(True)
            return [t.detach() for t in out_tangents]

        return forward_mode

    # J v = d/du <J^T u, v>: build u -> J^T u once with a graph, then one vjp per product.
    with torch.enable_grad(), _name_jvp_func():
        u = [torch.zeros_like(h_out[i], requires_grad=True) for i in live]
        jt_u = torch.autograd.grad(
            [h_out[i] for i in live],
            h_in,
            u,
            retain_graph=True,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    def double_vjp(vs: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad(), _name_jvp_func():
            outs = torch.autograd.grad(
                jt_u, u, vs, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        full = [torch.zeros_like(o) for o in h_out]
        for i, o in zip(live, outs, strict=True):
            full[i] = o
        return full

    return double_vjp


class JacobianRows:
    """The adjoint's right-hand side ``b = g`` as ``(batch, n)`` rows (in float32 at least) and
    the products ``J^T v`` / ``J v`` on rows, on the graph ``h_out = F(h_in)``."""

    def __init__(self, h_in: list[Tensor], h_out: list[Tensor], grads: Sequence[Tensor | None],
                 batch_dim: int | None,
                 make_jvp: Callable[[list[Tensor], list[Tensor], list[int]],
                                    Callable[[list[Tensor]], list[Tensor]]],
                 check_jvp: bool = False, eps: float = 0.0) -> None:
        self.h_in, self.h_out, self.batch_dim, self._make_jvp = h_in, h_out, batch_dim, make_jvp
        self._check_jvp_first = check_jvp  # J v by a double vjp: tested on its first use
        # the products' unit round-off: the least precise leaf's, or the autocast dtype's
        self.eps = max(eps, *(torch.finfo(o.dtype).eps for o in h_out))
        out0 = h_out[0]
        self.out_dtype = out0.dtype
        self._layout: Layout | None = None
        self._jvp: Callable[[list[Tensor]], list[Tensor]] | None = None
        self.single = (len(h_out) == 1 and len(h_in) == 1 and batch_dim is None
                       and out0.requires_grad)
        work = torch.promote_types(self.out_dtype, torch.float32)
        if self.single:  # the common case, set up without the row bookkeeping
            g0 = grads[0]
            self.b = (torch.zeros_like(out0) if g0 is None else g0).reshape(1, -1).to(work)
            self.live = [0]
            self._single = self._single_products(out0, h_in[0], work)
        else:
            for o in h_out[1:]:
                work = torch.promote_types(work, o.dtype)
            g_leaves = [torch.zeros_like(o) if g is None else g
                        for g, o in zip(grads, h_out, strict=True)]
            self.b = to_rows(g_leaves, self.layout(), work)
            self.live = [i for i, o in enumerate(h_out) if o.requires_grad]
            self._single = None
        self.work = work

    def layout(self) -> Layout:  # built on first use: the single-leaf products never need it
        if self._layout is None:
            self._layout = describe(self.h_out, None, self.batch_dim)  # the forward's layout
        return self._layout

    def _single_products(self, out0: Tensor, in0: Tensor, work: torch.dtype
                         ) -> Callable[[Tensor], Tensor]:
        """``J^T v`` for one leaf and one row. The K products reuse one graph with arguments
        checked here, so they call the engine the way torch.autograd.grad does, without its
        per-call Python re-validation (~10 us a product); a tensor subclass, or a v of another
        shape, takes the public path."""
        cast = self.out_dtype != work
        row_shape = self.b.shape
        direct = _ENGINE_DIRECT if out0.is_cpu else None
        engine = direct or _ENGINE_RUN_BACKWARD
        if engine is not None and torch.overrides.has_torch_function((out0, in0)):
            engine = None
        out_row = out0
        if engine is not None:
            torch._C._set_grad_enabled(True)  # (the context manager costs more, once a call)
            try:
                out_row = out0.reshape(row_shape)  # grads arrive as rows: no reshape per product
            finally:
                torch._C._set_grad_enabled(False)
        out_dtype = self.out_dtype

        def vjp_single(v: Tensor) -> Tensor:
            if engine is not None and v.shape == row_shape and v.dtype == work:
                (gi,) = engine(
                    (out_row,), (v.to(out_dtype) if cast else v,), True, False, (in0,), True,
                    accumulate_grad=False,
                )
            else:
                u = v.reshape(out0.shape)
                (gi,) = torch.autograd.grad(
                    out0, in0, u.to(out_dtype) if cast else u, retain_graph=True,
                    allow_unused=True,
                )
            if gi is None:
                return torch.zeros_like(v)
            return gi.reshape(1, -1).to(work) if cast else gi.reshape(1, -1)

        return vjp_single

    def vjp(self, v: Tensor) -> Tensor:
        """``J^T v`` on rows (a method, not a stored bound method: no reference cycle keeps the
        graph alive after the backward)."""
        if self._single is not None:
            return self._single(v)
        h_out, live = self.h_out, self.live
        vs = from_rows(v, self.layout(), [o.dtype for o in h_out])
        out = torch.autograd.grad(
            [h_out[i] for i in live], self.h_in, [vs[i] for i in live], retain_graph=True,
            allow_unused=True, materialize_grads=True,
        )
        return to_rows(out, self.layout(), self.work)

    def jvp(self, v: Tensor) -> Tensor:
        if self._jvp is None:
            self._jvp = self._make_jvp(self.h_in, self.h_out, self.live)
            if self._check_jvp_first:  # self.jvp no longer comes back here: _jvp is set
                check_jvp(self.vjp, self.jvp, v, JVP_BY_DOUBLE_VJP, self.eps)
        vs = from_rows(v, self.layout(), [x.dtype for x in self.h_in])
        return to_rows(self._jvp(vs), self.layout(), self.work)

    def leaves(self, z: Tensor) -> list[Tensor]:
        """The rows ``z`` as leaves shaped and typed like ``h_out``."""
        if self.single:
            out = z.reshape(self.h_out[0].shape)
            return [out.to(self.out_dtype) if self.out_dtype != self.work else out]
        return from_rows(z, self.layout(), [o.dtype for o in self.h_out])


JVP_FUNC_REMEDY = ("use a method whose backward does not run f again (gmres, neumann, or cg "
                   "with jvp='double_vjp')")

JVP_BY_DOUBLE_VJP = (
    "cg obtains J v that way (jvp='double_vjp'). Make that backward differentiable, pass "
    "method=rbp.linear.CGNormal(max_iter=..., jvp='func') (forward mode; the Function needs a "
    "jvp), or use method='gmres', which needs no J v")


def check_same_map(values: Sequence[Tensor], stored: Sequence[Tensor], who: str,
                   remedy: str) -> None:
    """``f`` run again in the backward at ``h_{T-1}`` must give the forward's ``F(h_{T-1})``
    (to ``sqrt(eps)``, relative): a new dropout mask, a train/eval switch or a weight
    recomputed in between would make the derivatives those of another map."""
    worst = max((float((v.detach() - o.detach()).abs().max()
                       / o.detach().abs().max().clamp_min(1e-30))
                 for v, o in zip(values, stored, strict=True) if o.numel()), default=0.0)
    if not worst <= math.sqrt(max(torch.finfo(o.dtype).eps for o in stored)):
        raise RuntimeError(
            f"{who}: the backward runs f again at the fixed point, and f(h) differs from the "
            f"forward's by {worst:.2g} (relative): f changed in between (a new dropout mask, a "
            "train/eval switch, a weight recomputed outside `with rbp.cached_norm(...)`). Run "
            f"the backward before anything f reads changes, or {remedy}.")


def check_jvp(vjp: Callable[[Tensor], Tensor], jvp: Callable[[Tensor], Tensor], like: Tensor,
              remedy: str, eps: float | None = None) -> None:
    """``<J (J^T w), w> = ||J^T w||^2`` for one random ``w`` (rows shaped like ``like``): a map
    whose backward cannot be differentiated (an ``autograd.Function`` with
    ``once_differentiable``, a backward that detaches) gives ``J v`` by a double vjp as zeros
    or worse, without any error. Two products; RuntimeError with ``remedy`` when it fails.
    ``eps``: the products' unit round-off (default: ``like``'s); the test allows 1e-8 when
    they run in float64, else ``max(1e-3, 10 eps)`` (7.8 % when in bfloat16, where 0.3 % was
    seen; a J v by zeros is 100 % off)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    a = vjp(w)
    want = float(a.double().square().sum())  # sums in float64: no round-off growing with n
    if not want > 0.0 or not math.isfinite(want):  # J^T w = 0 or non-finite: no test
        return
    got = float((jvp(a).double() * w.double()).sum())
    eps = max(torch.finfo(like.dtype).eps, eps or 0.0)
    tol = 1e-8 if eps <= torch.finfo(torch.float64).eps else max(1e-3, 10 * eps)
    if abs(got - want) > tol * want:
        raise RuntimeError(
            f"J v is wrong: <J J^T w, w> = {got:.4g} where ||J^T w||^2 = {want:.4g}: the step's "
            f"backward cannot be differentiated again (an autograd.Function whose backward is "
            f"once_differentiable or detaches), and {remedy}.")


@contextlib.contextmanager
def _name_jvp_func() -> Any:
    """Say what to do when the double vjp behind ``J v`` meets a graph that cannot be
    differentiated twice (a step compiled by ``torch.compile``: AOTAutograd)."""
    try:
        yield
    except RuntimeError as exc:
        if "double backward" not in str(exc):
            raise
        raise RuntimeError(
            f"{exc}. cg obtains J v by differentiating the backward of the last step "
            "(jvp='double_vjp', the default), which a step compiled by torch.compile cannot "
            "give; pass method=rbp.linear.CGNormal(max_iter=..., jvp='func') (forward-mode "
            "J v through torch.func.jvp), or use method='gmres', which needs no J v."
        ) from exc
