"""Warm starts: begin the next solve from the fixed point a previous solve returned.

A DEQ trained for many epochs solves ``h* = F(x, w, h*)`` for the same samples again and
again, with parameters that moved a little since. Starting the solve from the last ``h*`` of
each sample instead of zeros leaves the forward fewer iterations to the same tolerance.
:class:`WarmStart` keeps those states, detached, keyed by the user's sample ids (a mini-batch
model), or as one whole state (a full-graph model, such as a GNN over one graph).

>>> cache = rbp.WarmStart(num_samples=len(train_set))
>>> h0 = cache.h0(torch.zeros(b, d), ids)      # stored rows for seen ids, zeros otherwise
>>> h = rbp.fixed_point(f, h0, steps=50, tol=1e-4, solver="anderson")
>>> cache.update(h, ids)

A warm start changes where the forward begins, not what it converges to: with a forward
tolerance the returned state is the fixed point to that tolerance either way, and the
implicit gradient is taken there.
"""

from __future__ import annotations

import torch

from rbp import tree
from rbp.tree import State

Tensor = torch.Tensor

__all__ = ["WarmStart"]


class WarmStart:
    """A cache of fixed points to start the next solve from (detached, no gradient).

    Per sample (``num_samples`` given): states are kept row by row along ``batch_dim`` in a
    buffer of ``num_samples`` rows, indexed by integer ids in ``[0, num_samples)``;
    :meth:`h0` returns the cold state with the rows of already seen ids replaced by their
    stored fixed points (unseen ids start cold: the first epoch is a cold start; counted in
    :attr:`misses`). Whole state (``num_samples=None``): :meth:`h0` returns the last stored
    state, or the cold one before any :meth:`update`.

    A stored state with NaN or inf is not kept: that sample (or the whole state) starts cold
    the next time, counted in :attr:`rejected` (a diverged solve must not poison the cache).

    The cache belongs to one model and one state layout: a state of another structure, row
    shape, dtype or device than the stored ones raises ``ValueError`` (call :meth:`clear`
    when the layout changes), as do ids out of range, repeated or not matching the batch.

    Args:
        num_samples: number of distinct sample ids (the data set's size), or ``None`` for one
            whole state.
        batch_dim: the dim of every state leaf that indexes samples (per-sample mode).
    """

    def __init__(self, num_samples: int | None = None, *, batch_dim: int = 0) -> None:
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be an integer >= 1 or None, got {num_samples!r}")
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"batch_dim must be an integer >= 0, got {batch_dim!r}")
        self.num_samples = num_samples
        self.batch_dim = batch_dim
        self._buffers: list[Tensor] | None = None  # per leaf: (num_samples, *row shape)
        self._seen: Tensor | None = None  # (num_samples,) bool
        self._spec = None
        self._whole: list[Tensor] | None = None
        self.hits = 0  #: rows (or whole states) started warm since the last clear()
        self.misses = 0  #: rows (or whole states) started cold since the last clear()
        self.rejected = 0  #: rows (or whole states) not stored for NaN or inf since clear()

    # ------------------------------------------------------------------ public

    def h0(self, cold: State, ids: Tensor | None = None) -> State:
        """The state to start from: ``cold`` with the stored fixed points put in.

        Args:
            cold: the cold start for this batch (e.g. zeros), of the state's full shape.
            ids: per-sample mode: a 1-D integer tensor, one id per sample of the batch.

        Returns:
            A new state (``cold`` is not modified), detached.
        """
        leaves, spec = tree.flatten(cold, "cold")
        if self.num_samples is None:
            self._no_ids(ids)
            if self._whole is None:
                self.misses += 1
                return tree.unflatten(spec, [leaf.detach().clone() for leaf in leaves])
            self._check_layout(spec, leaves, [w.shape for w in self._whole], whole=True)
            self.hits += 1
            return tree.unflatten(spec, [w.clone() for w in self._whole])
        idx = self._ids(ids, leaves)
        out = [leaf.detach().clone() for leaf in leaves]
        if self._buffers is None:
            self.misses += len(idx)
            return tree.unflatten(spec, out)
        self._check_layout(spec, leaves, [b.shape[1:] for b in self._buffers], whole=False)
        assert self._seen is not None
        seen = self._seen[idx]
        n_seen = int(seen.sum())
        self.hits += n_seen
        self.misses += len(idx) - n_seen
        if n_seen:
            rows = torch.nonzero(seen).squeeze(1)
            for o, b in zip(out, self._buffers, strict=True):
                stored = b[idx[rows]]  # (n_seen, *row shape)
                o.index_copy_(self.batch_dim, rows, stored.movedim(0, self.batch_dim))
        return tree.unflatten(spec, out)

    def update(self, h: State, ids: Tensor | None = None) -> None:
        """Store the (detached) fixed points ``h`` of this batch under ``ids``."""
        leaves, spec = tree.flatten(h, "h")
        if self.num_samples is None:
            self._no_ids(ids)
            if self._whole is not None:
                self._check_layout(spec, leaves, [w.shape for w in self._whole], whole=True)
            self._spec = spec
            if all(bool(torch.isfinite(leaf.detach()).all()) for leaf in leaves):
                self._whole = [leaf.detach().clone() for leaf in leaves]
            else:
                self._whole = None
                self.rejected += 1
            return
        idx = self._ids(ids, leaves)
        if len(torch.unique(idx)) != len(idx):
            raise ValueError("ids repeat a sample: each stored row must have one id")
        if self._buffers is None:
            self._spec = spec
            self._buffers = [
                leaf.new_zeros((self.num_samples, *self._row_shape(leaf))) for leaf in leaves
            ]
            self._seen = torch.zeros(self.num_samples, dtype=torch.bool, device=idx.device)
        else:
            self._check_layout(spec, leaves, [b.shape[1:] for b in self._buffers], whole=False)
        assert self._seen is not None
        rows = [leaf.detach().movedim(self.batch_dim, 0) for leaf in leaves]
        finite = torch.stack([r.reshape(len(idx), -1).isfinite().all(1) for r in rows]).all(0)
        for b, r in zip(self._buffers, rows, strict=True):
            b[idx] = r
        self._seen[idx] = finite  # a row with NaN or inf is stored but never handed out
        self.rejected += len(idx) - int(finite.sum())

    def clear(self) -> None:
        """Forget every stored state (and the layout) and zero the counters."""
        self._buffers = self._seen = self._spec = self._whole = None
        self.hits = self.misses = self.rejected = 0

    def __len__(self) -> int:
        """Number of samples (per-sample mode) or states (0 or 1) stored."""
        if self.num_samples is None:
            return int(self._whole is not None)
        return 0 if self._seen is None else int(self._seen.sum())

    def __repr__(self) -> str:
        what = "whole state" if self.num_samples is None else f"num_samples={self.num_samples}"
        return (f"WarmStart({what}, stored={len(self)}, hits={self.hits}, misses={self.misses}, "
                f"rejected={self.rejected})")

    # ------------------------------------------------------------------ checks

    def _row_shape(self, leaf: Tensor) -> tuple[int, ...]:
        if leaf.dim() <= self.batch_dim:
            raise ValueError(
                f"a state leaf of shape {tuple(leaf.shape)} has no batch dim {self.batch_dim}"
            )
        shape = list(leaf.shape)
        shape.pop(self.batch_dim)
        return tuple(shape)

    def _no_ids(self, ids: Tensor | None) -> None:
        if ids is not None:
            raise ValueError(
                "this WarmStart keeps one whole state (num_samples=None): do not pass ids, or "
                "build it as WarmStart(num_samples=N) to key states by sample id"
            )

    def _ids(self, ids: Tensor | None, leaves: list[Tensor]) -> Tensor:
        if ids is None:
            raise ValueError(
                "this WarmStart keys states by sample id (num_samples given): pass ids, a 1-D "
                "integer tensor with one id per sample of the batch"
            )
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() or (
            ids.dtype == torch.bool or ids.is_complex()
        ):
            got = (
                type(ids).__name__ if not isinstance(ids, Tensor)
                else f"{ids.dtype} of shape {tuple(ids.shape)}"
            )
            raise ValueError(f"ids must be a 1-D integer tensor, got {got}")
        rows = {leaf.shape[self.batch_dim] if leaf.dim() > self.batch_dim else None
                for leaf in leaves}
        if rows != {len(ids)}:
            raise ValueError(
                f"{len(ids)} ids for a batch of {sorted(rows, key=str)} samples along "
                f"batch_dim={self.batch_dim}: pass one id per sample"
            )
        assert self.num_samples is not None
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(
                f"ids must lie in [0, {self.num_samples}), got ids from {int(ids.min())} to "
                f"{int(ids.max())}: other samples than the cache was built for"
            )
        device = leaves[0].device if self._seen is None else self._seen.device
        return ids.to(device=device, dtype=torch.long)

    def _check_layout(
        self, spec: object, leaves: list[Tensor], shapes: list[torch.Size], *, whole: bool
    ) -> None:
        if spec != self._spec:
            raise ValueError(
                f"the cache holds states of structure {self._spec}, got {spec}; call clear() "
                "when the state's layout changes"
            )
        stored = self._whole if whole else self._buffers
        assert stored is not None
        for i, (leaf, shape, s) in enumerate(zip(leaves, shapes, stored, strict=True)):
            have = tuple(leaf.shape) if whole else self._row_shape(leaf)
            if have != tuple(shape):
                kind = "shape" if whole else "row shape (the state without its batch dim)"
                raise ValueError(
                    f"the cache holds states of {kind} {tuple(shape)} (leaf {i}), got "
                    f"{have}; a cache belongs to one model: call clear() when it changes"
                )
            if leaf.dtype != s.dtype or leaf.device != s.device:
                raise ValueError(
                    f"the cache holds {s.dtype} states on {s.device} (leaf {i}), got "
                    f"{leaf.dtype} on {leaf.device}; convert the state, or clear() the cache"
                )
