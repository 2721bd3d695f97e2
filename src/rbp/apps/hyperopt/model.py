"""The inner problem of gradient-based hyperparameter optimisation (paper §5.3).

An MLP ``784-50-50-50-10`` with tanh hidden units and softmax cross-entropy is trained by SGD
with momentum (Maclaurin et al., 2015), one ``(a_i, b_i)`` per parameter tensor ``i``::

    v_i <- beta_i v_i - (1 - beta_i) grad_i,    w_i <- w_i + alpha_i v_i,
    alpha_i = exp(a_i),  beta_i = sigmoid(b_i).

Seen as a recurrence ``h_{t+1} = F(h_t, t)`` with state ``h = (w_1..w_n, v_1..v_n)``, one step
of the optimiser is one step of the RNN, and ``(a, b)`` are the RNN's parameters. The inner
gradient is written out by hand (backprop of the MLP as ordinary tensor ops), so the no-grad
steps cost one forward and one backward pass with no autograd bookkeeping, and on graph steps
autograd differentiates through those ops (Hessian-vector products) without ``create_graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensors = list[torch.Tensor]
State = tuple[torch.Tensor, ...]

#: Layer sizes of the paper's network.
PAPER_SIZES: tuple[int, ...] = (784, 50, 50, 50, 10)


def init_params(
    sizes: Sequence[int], seed: int, scale: float = -3.0, dtype: torch.dtype = torch.float32
) -> Tensors:
    """``[W_1, b_1, ..., W_L, b_L]`` with every entry ``N(0, 1) * exp(scale)``; ``W_l`` is
    ``(sizes[l], sizes[l+1])``. The same ``seed`` gives the same weights at every meta step."""
    gen = torch.Generator().manual_seed(seed)
    params: Tensors = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        for shape in ((n_in, n_out), (n_out,)):
            params.append(torch.randn(shape, generator=gen, dtype=dtype) * float(torch.e**scale))
    return params


def logits(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``z_L`` of ``a_0 = x, z_l = a_{l-1} W_l + b_l, a_l = tanh(z_l)`` (no tanh on the last)."""
    a = x
    n = len(params) // 2
    for layer in range(n):
        z = torch.addmm(params[2 * layer + 1], a, params[2 * layer])
        a = torch.tanh(z) if layer < n - 1 else z
    return a


def loss(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-1/B sum_n log softmax(z_L)_{n, y_n}`` (``y``: class indices)."""
    return torch.nn.functional.cross_entropy(logits(params, x), y)


def loss_and_grad(
    params: Sequence[torch.Tensor], x: torch.Tensor, y_onehot: torch.Tensor
) -> tuple[torch.Tensor, Tensors]:
    """Mean cross-entropy and its gradient, by hand-written backprop.

    ``dL/dz_L = (softmax(z_L) - Y) / B``; ``dL/dW_l = a_{l-1}^T dz_l``, ``dL/db_l = sum_n dz_l``,
    ``dz_{l-1} = (dz_l W_l^T) * (1 - a_{l-1}^2)``. Every op is differentiable, so autograd
    through this function gives second-order terms (no ``create_graph`` needed).
    """
    n = len(params) // 2
    acts = [x]
    a = x
    for layer in range(n):
        z = torch.addmm(params[2 * layer + 1], a, params[2 * layer])
        a = torch.tanh(z) if layer < n - 1 else z
        if layer < n - 1:
            acts.append(a)
    logp = torch.log_softmax(a, dim=1)
    batch = x.shape[0]
    value = -(logp * y_onehot).sum() / batch
    dz = (logp.exp() - y_onehot) / batch
    grads: Tensors = [dz] * (2 * n)
    for layer in range(n - 1, -1, -1):
        a_prev = acts[layer]
        grads[2 * layer] = a_prev.t() @ dz
        grads[2 * layer + 1] = dz.sum(0)
        if layer > 0:
            # (dz W^T) * (1 - a^2) as one op: its graph keeps dz W^T and a (shared with the
            # forward), not the extra (1 - a^2) temporary
            dz = torch.ops.aten.tanh_backward(dz @ params[2 * layer].t(), a_prev)
    return value, grads


def loss_and_grad_autograd(
    params: Sequence[torch.Tensor], x: torch.Tensor, y_onehot: torch.Tensor
) -> tuple[torch.Tensor, Tensors]:
    """Same value and gradient as :func:`loss_and_grad`, by ``torch.autograd.grad``.

    The usual way to write the inner gradient: ``create_graph`` is the grad mode of the caller
    (True only on the steps that keep a graph), so graph steps pay for a double-backward graph.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in params]
        logp = torch.log_softmax(logits(leaves, x), dim=1)
        value = -(logp * y_onehot).sum() / x.shape[0]
        grads = torch.autograd.grad(value, leaves, create_graph=create_graph)
    return value, list(grads)


INNER_GRADS = {"manual": loss_and_grad, "autograd": loss_and_grad_autograd}


def momentum_update(
    weights: Sequence[torch.Tensor],
    velocities: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    log_lr: torch.Tensor,
    logit_momentum: torch.Tensor,
) -> State:
    """One step: ``v' = beta v - (1-beta) g``, ``w' = w + alpha v'`` per tensor; returns
    ``(w'_1..w'_n, v'_1..v'_n)``; ``alpha = exp(log_lr)``, ``beta = sigmoid(logit_momentum)``."""
    alpha = log_lr.exp()
    beta = torch.sigmoid(logit_momentum)
    new_v = [
        beta[i] * v - (1 - beta[i]) * g
        for i, (v, g) in enumerate(zip(velocities, grads, strict=True))
    ]
    new_w = [w + alpha[i] * v for i, (w, v) in enumerate(zip(weights, new_v, strict=True))]
    return (*new_w, *new_v)


def make_step(
    x: torch.Tensor,
    y_onehot: torch.Tensor,
    log_lr: torch.Tensor,
    logit_momentum: torch.Tensor,
    batches: torch.Tensor | None = None,
    record: list[torch.Tensor] | None = None,
    inner_grad: str = "manual",
) -> Callable[..., State]:
    """The optimiser step as a map ``F(h, t)`` on ``h = (weights..., velocities...)``.

    With ``batches`` (``(T, B)`` example indices) step ``t`` uses mini-batch ``batches[t]``;
    without, every step is full-batch on ``(x, y_onehot)``. ``record`` (if given) collects the
    detached loss of every step's batch before the update. ``inner_grad`` picks
    :func:`loss_and_grad` ("manual") or :func:`loss_and_grad_autograd` ("autograd").
    """
    if inner_grad not in INNER_GRADS:
        raise ValueError(f"inner_grad must be one of {sorted(INNER_GRADS)}, got {inner_grad!r}")
    grad_fn = INNER_GRADS[inner_grad]

    def step(h: State, t: int = 0) -> State:
        n = len(h) // 2
        weights, velocities = h[:n], h[n:]
        if batches is None:
            xb, yb = x, y_onehot
        else:
            idx = batches[t]
            xb, yb = x.index_select(0, idx), y_onehot.index_select(0, idx)
        value, grads = grad_fn(weights, xb, yb)
        if record is not None:
            record.append(value.detach())
        return momentum_update(weights, velocities, grads, log_lr, logit_momentum)

    return step


def minibatch_indices(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch)`` indices: epochs of a seeded random permutation cut into batches
    (a partial last batch of an epoch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    if per_epoch < 1:
        raise ValueError(f"batch size {batch} exceeds the number of examples {n}")
    rows: Tensors = []
    while len(rows) < steps:
        perm = torch.randperm(n, generator=gen)
        rows.extend(perm[: per_epoch * batch].view(per_epoch, batch).unbind(0))
    return torch.stack(rows[:steps])
