"""States as row matrices, and calling ``f`` safely: the forward's row layout of a state, the
checks of ``f`` (in-place writes, per-sample inputs, independent samples) and the per-row
differences of the settle check."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rbp import tree
from rbp.tree import State

Tensor = torch.Tensor
RowMap = Callable[[Tensor, "Tensor | None"], Tensor]  # F on live rows: (X_live, rows) -> F(X_live)


@dataclass(frozen=True)
class Layout:
    """How the leaves of a state map to the rows of a ``(b, n)`` matrix and back."""

    spec: Any
    shapes: tuple[tuple[int, ...], ...]  # full shape of each leaf
    dims: tuple[int, ...] | None  # batch dim of each leaf (None: one row, the whole state)
    sizes: tuple[int, ...]  # numel of one row of each leaf
    batch: int


def layout(leaves: Sequence[Tensor], spec: Any, batch_dim: int | None) -> Layout:
    """Check the leaves for a row solve (one dtype and device; one batch size) and describe them."""
    first = leaves[0]
    for i, leaf in enumerate(leaves):
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise TypeError(
                f"a forward solve needs every state leaf of one dtype and device; leaf {i} is "
                f"{leaf.dtype} on {leaf.device}, leaf 0 {first.dtype} on {first.device}"
            )
    return describe(leaves, spec, batch_dim)


def describe(leaves: Sequence[Tensor], spec: Any, batch_dim: int | None) -> Layout:
    """The layout of the leaves (one batch size along ``batch_dim``), whatever their dtypes: the
    one row layout of the forward and of the adjoint (:mod:`rbp.adjoint`)."""
    shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    if batch_dim is None:
        return Layout(spec, shapes, None, tuple(leaf.numel() for leaf in leaves), 1)
    dims, batch = tree.batch_axes(leaves, batch_dim)
    sizes = tuple(leaf.numel() // batch for leaf in leaves)
    return Layout(spec, shapes, dims, sizes, batch)


def to_rows(leaves: Sequence[Tensor], lay: Layout, dtype: torch.dtype | None = None) -> Tensor:
    """``(b, n)`` matrix of the leaves: one row per sample (or one row in all), in ``dtype``
    when given."""
    if lay.dims is None:
        parts = [leaf.reshape(1, -1) for leaf in leaves]
    else:
        parts = [
            leaf.movedim(d, 0).reshape(leaf.shape[d], -1)
            for leaf, d in zip(leaves, lay.dims, strict=True)
        ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if dtype is None else out.to(dtype)


def from_rows(x: Tensor, lay: Layout, dtypes: Sequence[torch.dtype] | None = None
              ) -> list[Tensor]:
    """Leaves of the rows ``x`` (any number of rows when there is a batch dim), leaf ``i`` in
    ``dtypes[i]`` when given."""
    parts = [x] if len(lay.sizes) == 1 else list(x.split(lay.sizes, dim=1))
    if lay.dims is None:
        out = [p.reshape(s) for p, s in zip(parts, lay.shapes, strict=True)]
    else:
        out = []
        for p, s, d in zip(parts, lay.shapes, lay.dims, strict=True):
            rest = s[:d] + s[d + 1 :]
            out.append(p.reshape(x.shape[0], *rest).movedim(0, d))
    if dtypes is None:
        return out
    return [leaf.to(dt) for leaf, dt in zip(out, dtypes, strict=True)]


def _leaves_of(state: State) -> list[Tensor]:
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(state) if isinstance(leaf, Tensor)]


def call_map(fn: Callable[..., State], h: State, *args: Any) -> State:
    """``fn(h, *args)``, refusing an ``fn`` that modifies its input state in place."""
    if isinstance(h, Tensor):  # the common case, kept cheap: it runs once per step
        # an inference tensor (torch.inference_mode) has no version counter: nothing to compare
        # (Dynamo cannot trace is_inference; a compiled call has no inference tensors)
        if not _is_compiling() and h.is_inference():
            return fn(h, *args)
        version = h._version
        out = fn(h, *args)
        if h._version != version:
            _raise_in_place(0)
        return out
    leaves = _leaves_of(h)
    if not _is_compiling():
        leaves = [leaf for leaf in leaves if not leaf.is_inference()]
    versions = [leaf._version for leaf in leaves]
    out = fn(h, *args)
    for i, (leaf, v) in enumerate(zip(leaves, versions, strict=True)):
        if leaf._version != v:
            _raise_in_place(i)
    return out


def _raise_in_place(i: int) -> None:
    raise ValueError(
        f"f modified its input state in place (leaf {i}); fixed_point keeps earlier states, so "
        "f must return new tensors: write h = h + x, not h += x or h.add_(x)"
    )


def _slice_inputs(inputs: Sequence[Tensor], dims: Sequence[int], rows: Tensor | None) -> list:
    if rows is None:
        return list(inputs)
    return [x.index_select(d, rows) for x, d in zip(inputs, dims, strict=True)]


def check_inputs(inputs: Any, batch_dim: int | None, batch: int | None) -> tuple[list, list[int]]:
    """Validate ``inputs=``: a tuple/list of tensors, each with the batch along ``batch_dim``."""
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(
            f"inputs must be a tuple or list of tensors passed to f(h, *inputs), got "
            f"{type(inputs).__name__}"
        )
    dims = []
    for i, x in enumerate(inputs):
        if batch_dim is None:
            dims.append(0)
            continue
        if not isinstance(x, Tensor):
            raise TypeError(
                f"inputs[{i}] is a {type(x).__name__}; with batch_dim every input must be a "
                "tensor holding the batch along batch_dim (close over anything else in f)"
            )
        if not -x.dim() <= batch_dim < x.dim() or x.shape[batch_dim % x.dim()] != batch:
            raise ValueError(
                f"inputs[{i}] of shape {tuple(x.shape)} does not hold the {batch} samples of the "
                f"state along batch_dim={batch_dim}"
            )
        dims.append(batch_dim % x.dim())
    return list(inputs), dims


def check_rows_independent(fmap: RowMap, x0: Tensor, fx0: Tensor, batch_dim: int) -> None:
    """Refuse an f that mixes samples, or that is random, before a per-sample solve.

    One evaluation beyond ``fx0 = F(x0)``: F on the sub-batch of samples ``[b-1, 0]``, with
    sample ``b-1`` moved in a random direction, must give sample 0 the row it has in ``fx0``.
    That catches per-sample tensors closed over instead of passed as ``inputs`` and mixing
    through h (a batch mean, a flip), also from equal rows such as ``h0 = 0``, which an
    unmoved sub-batch would hide. A failure is told apart from a random f (dropout) by
    evaluating the sub-batch once more.
    """
    b = x0.shape[0]
    if b < 2:
        return
    rows = torch.tensor([b - 1, 0], device=x0.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    step = torch.randn(x0.shape[1], generator=gen, dtype=torch.float64)
    size = 0.1 * float(x0[b - 1].abs().amax().clamp_min(1.0))
    sub_in = x0[rows].clone()
    sub_in[0] += (size * step / step.norm().clamp_min(1e-30)).to(x0.dtype).to(x0.device)
    try:
        with torch.no_grad():
            sub = fmap(sub_in, rows)
    except Exception as exc:  # noqa: BLE001 - re-raised with the reason attached
        raise ValueError(
            f"batch_dim={batch_dim}: f failed on a sub-batch of 2 samples ({exc}); per-sample "
            "stopping calls f on the live samples only, so f must treat samples independently "
            "and take per-sample inputs through inputs=(...). Use batch_dim=None to stop on "
            "the whole batch."
        ) from exc
    eps = torch.finfo(x0.dtype).eps
    limit = math.sqrt(eps) * fx0.abs().amax().clamp_min(1.0)
    err = (sub[1] - fx0[0]).abs().amax()
    if bool(err <= limit):
        return
    with torch.no_grad():
        again = fmap(sub_in, rows)
    if not bool((again - sub).abs().amax() <= limit):
        raise ValueError(
            f"batch_dim={batch_dim}: f is random (e.g. dropout): two calls on the same state "
            "differ. A fixed point of a random map is not defined; evaluate the model in "
            "eval mode (model.eval()) or fix the randomness inside f (e.g. one dropout mask "
            "drawn outside f and passed through inputs=(...))."
        )
    raise ValueError(
        f"batch_dim={batch_dim}: f mixes samples (f on samples [{b - 1}, 0], with sample "
        f"{b - 1} moved, gives sample 0 a row that differs from its row in f on the whole "
        f"batch by {err.item():.3g}). Per-sample stopping needs an f whose samples are "
        "independent (no batch norm or mean over the batch, no closed-over per-sample "
        "tensors: pass them as inputs=(...), which fixed_point slices). Use batch_dim=None "
        "to stop on the whole batch."
    )


def row_differences(
    out: Sequence[Tensor], prev: Sequence[Tensor], lay: Layout | None = None
) -> tuple[Tensor, Tensor] | None:
    """``(||h_T - h_T-1||, ||h_T||)`` per row of the settle check (float64, on the device).

    The rows: with a batch layout ``lay``, one per sample (all leaves of that sample together);
    without, one per index of dim 0 of every leaf of two or more dims, and the whole leaf for a
    leaf of fewer (a batch-first state is then checked sample by sample even without
    ``batch_dim``), each row's ``||h_T||`` floored at the rms row norm of its leaf (a near-zero
    row of one system is not held to its own tiny norm). ``None`` when the whole state is a
    single row (the whole-state ratio).
    """
    wide = torch.float32 if out[0].device.type == "mps" else torch.float64  # MPS: no float64
    if lay is not None and lay.dims is not None:
        with torch.no_grad():
            d = to_rows(out, lay) - to_rows(prev, lay)
            return (torch.linalg.vector_norm(d, dim=1, dtype=wide),
                    torch.linalg.vector_norm(to_rows(out, lay), dim=1, dtype=wide))
    if not any(o.dim() >= 2 and o.shape[0] > 1 for o in out) and len(out) == 1:
        return None
    diffs, norms = [], []
    with torch.no_grad():
        for o, p in zip(out, prev, strict=True):
            lead = o.shape[0] if o.dim() >= 2 else 1
            diffs.append(torch.linalg.vector_norm((o - p).reshape(lead, -1), dim=1,
                                                  dtype=wide))
            n = torch.linalg.vector_norm(o.reshape(lead, -1), dim=1, dtype=wide)
            norms.append(n.clamp_min(torch.linalg.vector_norm(n) / math.sqrt(lead)))
    return torch.cat(diffs), torch.cat(norms)


_COMPILER_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _is_compiling() -> bool:
    check = _COMPILER_IS_COMPILING  # torch >= 2.3
    if check is None:
        dynamo = sys.modules.get("torch._dynamo")  # torch 2.2: only if dynamo is loaded
        check = getattr(dynamo, "is_compiling", None) if dynamo is not None else None
    return bool(check()) if check is not None else False
