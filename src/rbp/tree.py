"""Flat views of recurrent states: a tensor, or a tuple / list / dict of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

State = Any  # a tensor or a (nested) tuple / list / dict of tensors

# The structure of a bare-tensor state: flatten/unflatten skip pytree for it (once per step).
LEAF: pytree.TreeSpec = pytree.tree_flatten(torch.zeros(()))[1]


def flatten(state: State, what: str = "state") -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """Leaves and structure of ``state``; every leaf must be a floating-point tensor."""
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return [state], LEAF
    leaves, spec = pytree.tree_flatten(state)
    if not leaves:
        raise TypeError(f"{what} holds no tensors: pass a tensor or a tuple/list/dict of tensors")
    if all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves):
        return leaves, spec  # the common case: no readable paths needed
    for path, leaf in zip(_paths(spec), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what}{path} is a {type(leaf).__name__}, not a tensor: a state must be a tensor "
                "or a tuple/list/dict of tensors"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{what}{path} has dtype {leaf.dtype}; states must be floating point "
                "(float32 or float64)"
            )
    return leaves, spec


def graph_inputs(state: State, who: str) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The leaves of ``state`` as fresh tensors that require grad, and its structure, for
    ``who``'s vector-Jacobian products (clones: an inference tensor, made under
    ``torch.inference_mode``, cannot join a graph); RuntimeError under inference mode itself,
    which forbids the products."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{who} needs vector-Jacobian products, which "
                           "torch.inference_mode() forbids: call it outside inference mode "
                           "(under torch.no_grad() it works)")
    leaves, spec = flatten(state, "h")
    return [leaf.detach().clone().requires_grad_() for leaf in leaves], spec


def unflatten(spec: pytree.TreeSpec, leaves: Sequence[torch.Tensor]) -> State:
    """Inverse of :func:`flatten`."""
    if spec is LEAF:
        return leaves[0]
    return pytree.tree_unflatten(list(leaves), spec)


def check_same_structure(
    spec: pytree.TreeSpec, leaves: Sequence[torch.Tensor], out: State, step: int
) -> list[torch.Tensor]:
    """Leaves of ``out`` after checking it matches the structure, shapes and dtypes of the state."""
    if spec is LEAF and isinstance(out, torch.Tensor):
        a = leaves[0]
        if a.shape == out.shape and a.dtype == out.dtype:
            return [out]
    out_leaves, out_spec = pytree.tree_flatten(out)
    if out_spec != spec:
        template = pytree.tree_unflatten([None] * spec.num_leaves, spec)
        if pytree.tree_flatten(_ordered_like(template, out))[1] == spec:
            raise TypeError(
                f"f returned the state's dict keys in another order at step {step} "
                f"({_key_orders(template, out)}); the order is part of the state's structure: "
                "return the keys in h0's order (e.g. build the dict as {k: ... for k in h})")
        raise TypeError(
            f"f returned a different structure at step {step}: expected {spec}, got {out_spec}. "
            "f must map a state to a state of the same structure"
        )
    if all(
        isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(leaves, out_leaves, strict=True)
    ):
        return out_leaves
    for path, a, b in zip(_paths(spec), leaves, out_leaves, strict=True):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"f returned a {type(b).__name__} at state{path}, not a tensor")
        if a.shape != b.shape:
            raise ValueError(
                f"f changed the shape of state{path} at step {step}: "
                f"{tuple(a.shape)} -> {tuple(b.shape)}"
            )
        if a.dtype != b.dtype:
            hint = (
                "under torch.autocast, cast f's output back (e.g. return out.to(h.dtype)) "
                "or start from h0 in the autocast dtype"
                if _autocast_on(b.device.type)
                else "cast f's output (e.g. out.to(h.dtype)) or start from h0 in that dtype"
            )
            raise TypeError(
                f"f changed the dtype of state{path} at step {step}: {a.dtype} -> {b.dtype}; "
                f"f must return the dtype of h0: {hint}"
            )
    return out_leaves


def _ordered_like(template: Any, value: Any) -> Any:
    """``value`` with each dict's keys in the order of ``template``'s (same key sets only)."""
    if isinstance(template, dict) and isinstance(value, dict) and set(template) == set(value):
        return type(value)((k, _ordered_like(template[k], value[k])) for k in template)
    if (isinstance(template, (list, tuple)) and type(template) is type(value)
            and len(template) == len(value)):
        items = [_ordered_like(t, v) for t, v in zip(template, value, strict=True)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _key_orders(template: Any, value: Any) -> str:
    """The first dict whose keys come in another order: 'h0 has [a, b], f gave [b, a]'."""
    if isinstance(template, dict) and isinstance(value, dict):
        if list(template) != list(value):
            return f"h0 has {list(template)}, f gave {list(value)}"
        pairs = [(template[k], value[k]) for k in template]
    elif isinstance(template, (list, tuple)) and isinstance(value, (list, tuple)):
        pairs = list(zip(template, value, strict=False))
    else:
        return ""
    return next((found for t, v in pairs if (found := _key_orders(t, v))), "")


def to_vector(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate leaves into one flat vector (a view when there is a single leaf)."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def from_vector(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector back into tensors shaped like ``like``."""
    if len(like) == 1:
        return [vector.view_as(like[0])]
    sizes = [leaf.numel() for leaf in like]
    return [part.view_as(leaf) for part, leaf in zip(torch.split(vector, sizes), like, strict=True)]


def _paths(spec: pytree.TreeSpec) -> list[str]:
    """Readable paths (``[0]``, ``['w']``) of the leaves of ``spec``, for error messages."""
    dummy = pytree.tree_unflatten([None] * spec.num_leaves, spec)
    return [
        "".join(f"[{k.idx}]" if hasattr(k, "idx") else f"[{k.key!r}]" for k in keypath)
        for keypath, _ in pytree.tree_flatten_with_path(dummy)[0]
    ]


def batch_axes(leaves: Sequence[torch.Tensor], batch_dim: int) -> tuple[tuple[int, ...], int]:
    """The batch axis of every leaf (``batch_dim`` made non-negative) and the one batch size.

    Raises a clear ``ValueError`` when a leaf lacks that axis, the leaves disagree on the batch
    size, or the batch is empty.
    """
    dims: list[int] = []
    batch: int | None = None
    for i, leaf in enumerate(leaves):
        if not -leaf.dim() <= batch_dim < leaf.dim():
            raise ValueError(
                f"batch_dim={batch_dim} is out of range for state leaf {i} of shape "
                f"{tuple(leaf.shape)}; every leaf needs the batch along batch_dim"
            )
        d = batch_dim % leaf.dim()
        if batch is None:
            batch = leaf.shape[d]
        elif leaf.shape[d] != batch:
            raise ValueError(
                f"batch_dim={batch_dim}: state leaf {i} has {leaf.shape[d]} samples, leaf 0 "
                f"{batch}; every leaf must hold the same batch"
            )
        dims.append(d)
    if not batch:
        raise ValueError(f"batch_dim={batch_dim}: the state holds no samples (batch size 0)")
    return tuple(dims), batch


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())
