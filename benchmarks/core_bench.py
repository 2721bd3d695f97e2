"""rbp's gradient methods against TorchDEQ, torchopt and a hand-written loop, at equal budgets.

Every method differentiates the same recurrence ``h_{t+1} = F(h_t)`` (batched, per-row
independent) after the same forward of ``T`` updates, with the same backward budget ``K``
(iterations of its linear solve, or truncation length for TBPTT). Against the exact implicit
gradient ``dL/dw = z^T dF/dw`` with ``(I - J^T) z = g`` solved densely per batch row at a fully
converged ``h*`` (``J = dF/dh`` is block-diagonal: one ``torch.func.jacrev`` block per row,
vmapped), it reports for each method:

* ``rel_err_W`` / ``rel_err_x``: ``||grad - exact|| / ||exact||`` for the recurrent weight and the
  input (float64 problems; the float32 variant is compared with the float64 exact gradient);
* ``time_ms`` / ``cpu_ms``: median wall / process-CPU time of forward + loss + backward over
  ``--repeats`` timed calls after one warm-up; all configurations of a problem are timed
  round-robin so that load from other processes falls on them alike (CPU time leaves out the
  time spent waiting for a core on a shared machine);
* ``saved_kib``: distinct tensor storages autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), not counting the problem's own leaves
  (parameters, input, initial state), which every method references without copying;
  ``bwd_saved_kib``: the same for graphs built during the backward (recomputed steps,
  double-backward graphs);
* ``n_f`` / ``n_vjp``: evaluations of F and reverse products through F, counted in a separate
  untimed run (forward-mode / double-backward products of ``cg`` are not in ``n_vjp``);
* ``ratio_vs_hand`` / ``cpu_ratio_vs_hand``: time over the hand-written Neumann-RBP loop at the
  same K (the overhead baseline); ``overhead_paired`` times rbp's neumann against that loop
  call by call, alternating, with forward and backward apart, on the same problems and on a
  tiny one where per-call Python work is all there is.

Peers (``torchdeq``, ``torchopt``) are optional and imported lazily; their rows are skipped with a
note when absent. Run ``python benchmarks/core_bench.py [--quick] [--repeats N] [--device NAME]
[--out DIR]``; writes ``DIR/bench.json`` (default ``results/core_bench``) and prints the table.

``--device`` (auto, cpu, cuda, cuda:N, mps; default cpu) is where every problem, method and
timing runs: the problems are built on the CPU from the same seeds and then moved, while the
dense float64 references (the converged state and the exact gradients) stay on the CPU, and
each method's gradients are compared there. On a GPU the clock is read after
``torch.cuda.synchronize`` and only wall time is recorded: process CPU time leaves out the
device's work, so the ``cpu_*`` fields are ``null`` and the overhead tables compare wall time.
``settings.device`` (and ``settings.gpu``) name the device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rbp
from rbp.runner.device import describe_device, resolve_device

Tensor = torch.Tensor
Step = Callable[..., Tensor]  # F(h, *args) -> h, batched over rows
Forward = Callable[[], Tensor]  # one forward with the method's gradient attached -> h_T

KIB = 1024.0
RBP_METHODS = ("bptt", "tbptt", "rbp", "cg", "neumann", "gmres")


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A batched recurrence ``h <- step(h, *args)`` and the loss ``0.5 ||h - target||^2``.

    ``args`` are every tensor the step uses, all leaves with ``requires_grad``; the one at
    ``weight_index`` is the recurrent weight W and the one at ``input_index`` the input x
    (shape (batch, ...), one row per independent recurrence).
    """

    name: str
    description: str
    step: Step
    args: tuple[Tensor, ...]
    arg_names: tuple[str, ...]
    h0: Tensor
    target: Tensor
    weight_index: int
    input_index: int

    def f(self, h: Tensor) -> Tensor:
        """One update ``F(h)`` closing over the problem's tensors (what an rbp user writes)."""
        return self.step(h, *self.args)

    def with_input(self) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
        """``(f(h, x), x)``: the update taking the input x as an argument, for
        ``inputs=(x,)`` (which ``batch_dim`` slices sample by sample)."""
        xi, args, step = self.input_index, list(self.args), self.step

        def f(h: Tensor, x: Tensor) -> Tensor:
            a = list(args)
            a[xi] = x
            return step(h, *a)

        return f, args[xi]

    def loss(self, h: Tensor) -> Tensor:
        """``L = 0.5 ||h - target||^2``, so ``g = dL/dh = h - target``."""
        return 0.5 * (h - self.target).pow(2).sum()

    def leaves(self) -> tuple[Tensor, ...]:
        return (*self.args, self.h0, self.target)

    def zero_grad(self) -> None:
        for a in self.args:
            a.grad = None

    def grads(self) -> tuple[Tensor, Tensor]:
        w, x = self.args[self.weight_index].grad, self.args[self.input_index].grad
        if w is None or x is None:
            raise RuntimeError(f"{self.name}: a method left W or x without a gradient")
        return w, x

    @property
    def device(self) -> torch.device:
        return self.h0.device

    def cast(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Problem:
        """The same problem in ``dtype`` on ``device`` (default: where it is), fresh leaves."""
        device = self.device if device is None else torch.device(device)
        args = tuple(a.detach().to(device=device, dtype=dtype).requires_grad_()
                     for a in self.args)
        return Problem(
            self.name, self.description, self.step, args, self.arg_names,
            self.h0.to(device=device, dtype=dtype), self.target.to(device=device, dtype=dtype),
            self.weight_index, self.input_index,
        )

    def on(self, dtype: torch.dtype, device: torch.device) -> Problem:
        """This problem itself if it already is in ``dtype`` on ``device``, else a cast."""
        if self.h0.dtype == dtype and self.device == device:
            return self
        return self.cast(dtype, device)


def rnn_step(h: Tensor, w: Tensor, u: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """Contractive tanh RNN: ``F(h) = tanh(h W^T + x U^T + b)``."""
    return torch.tanh(torch.addmm(b, x, u.t()) + h @ w.t())


def gru_step(
    h: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> Tensor:
    """``torch.nn.GRUCell(x, h)`` written out: ``(1 - z) n + z h`` with gates r, z and n."""
    gi = torch.addmm(b_ih, x, w_ih.t())
    gh = torch.addmm(b_hh, h, w_hh.t())
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def make_rnn(
    hidden: int, batch: int, inputs: int, seed: int, *, nonnormal: bool = False
) -> Problem:
    """(a) ``W = 0.9 Q`` (Q orthogonal: every singular value 0.9, eigenvalues on |lambda| = 0.9)
    and a weak input drive (``U ~ 0.3 N(0, 1/inputs)``) so that tanh stays near its linear range
    and J = diag(1 - h^2) W contracts slowly; (c) ``W = Q S Q^T`` with S block-diagonal 2x2
    Jordan blocks ``[[0.6, 1.5], [0, 0.6]]``: rho(W) = 0.6 but ||W||_2 ~ 1.8, so powers of J
    grow before they decay."""
    gen = torch.Generator().manual_seed(seed)
    if nonnormal:
        s = 0.6 * torch.eye(hidden, dtype=torch.float64)
        idx = torch.arange(0, hidden - 1, 2)
        s[idx, idx + 1] = 1.5
        q = _orthogonal(hidden, gen)
        w = q @ s @ q.t()
        name, desc = "rnn-nonnormal", "tanh RNN, W = Q S Q^T, rho(W)=0.6, ||W||~1.8"
    else:
        w = 0.9 * _orthogonal(hidden, gen)
        name, desc = "rnn", "tanh RNN, W = 0.9 Q (||W||_2 = 0.9)"
    drive = 1.0 if nonnormal else 0.3
    u = drive * torch.randn(hidden, inputs, generator=gen, dtype=torch.float64) / math.sqrt(inputs)
    b = 0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, inputs, generator=gen, dtype=torch.float64)
    target = 0.5 * torch.randn(batch, hidden, generator=gen, dtype=torch.float64)
    args = tuple(a.requires_grad_() for a in (w, u, b, x))
    return Problem(
        name, f"{desc}, hidden {hidden}, batch {batch}", rnn_step, args, ("W", "U", "b", "x"),
        torch.zeros(batch, hidden, dtype=torch.float64), target, 0, 3,
    )


def make_gru(hidden: int, batch: int, inputs: int, seed: int, hh_scale: float = 2.5) -> Problem:
    """(b) ``h = GRUCell(x, h)`` with PyTorch's default init and ``weight_hh`` scaled by
    ``hh_scale`` (slower convergence); checked against ``torch.nn.GRUCell``."""
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(inputs, hidden, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_hh.mul_(hh_scale)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, inputs, generator=gen, dtype=torch.float64)
    h_test = torch.randn(batch, hidden, generator=gen, dtype=torch.float64)
    target = 0.5 * torch.randn(batch, hidden, generator=gen, dtype=torch.float64)
    params = [p.detach().clone() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                           cell.bias_hh)]
    with torch.no_grad():
        if not torch.allclose(gru_step(h_test, x, *params), cell(x, h_test), atol=1e-12):
            raise RuntimeError("gru_step does not match torch.nn.GRUCell")
    args = tuple(a.requires_grad_() for a in (x, *params))
    return Problem(
        "gru", f"GRUCell equilibrium, weight_hh x{hh_scale:g}, hidden {hidden}, batch {batch}",
        gru_step, args, ("x", "W_ih", "W", "b_ih", "b_hh"),
        torch.zeros(batch, hidden, dtype=torch.float64), target, 2, 0,
    )


@dataclass
class Exact:
    """Exact implicit gradients at a converged state, and the Jacobian's spectrum."""

    grad_w: Tensor
    grad_x: Tensor
    steps: int
    residual: float
    rho: float  # max over rows of the spectral radius of J_i
    norm: float  # max over rows of ||J_i||_2


def exact_gradients(p: Problem, max_steps: int = 20000, tol: float = 1e-14) -> Exact:
    """Run F to ``||F(h) - h|| <= tol ||h||``, then solve ``(I - J_i^T) z_i = g_i`` densely per
    row (``J_i`` by ``vmap(jacrev)``) and return ``z^T dF/d(W, x)``."""
    h = p.h0
    residual, steps = math.inf, 0
    with torch.no_grad():
        while steps < max_steps:
            h_next = p.f(h)
            residual = (h_next - h).norm().item() / max(h_next.norm().item(), 1e-300)
            h, steps = h_next, steps + 1
            if residual <= tol:
                break
    if residual > 1e-12:
        raise RuntimeError(f"{p.name}: forward did not converge ({residual:.2e} after {steps})")
    xi = p.input_index
    detached = [a.detach() for a in p.args]

    def row_step(h_row: Tensor, x_row: Tensor) -> Tensor:
        args = list(detached)
        args[xi] = x_row[None]
        return p.step(h_row[None], *args)[0]

    jac = torch.func.vmap(torch.func.jacrev(row_step))(h, detached[xi])  # (B, H, H)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    g = (h - p.target).unsqueeze(-1)
    z = torch.linalg.solve(eye - jac.transpose(1, 2), g).squeeze(-1)
    out = p.step(h, *p.args)
    gw, gx = torch.autograd.grad(out, [p.args[p.weight_index], p.args[xi]], z)
    return Exact(
        grad_w=gw, grad_x=gx, steps=steps, residual=residual,
        rho=torch.linalg.eigvals(jac).abs().max().item(),
        norm=torch.linalg.matrix_norm(jac, ord=2).max().item(),
    )


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A gradient method: ``make(problem, T, K)`` returns a forward producing ``h_T``."""

    name: str
    family: str  # rbp | baseline | torchdeq | torchopt
    make: Callable[[Problem, int, int], Forward]
    uses_k: bool = True
    requires: str | None = None  # optional package
    note: str = ""


def _rbp_method(method: str) -> Method:
    def make(p: Problem, steps: int, k: int) -> Forward:
        truncate = 1 if method == "bptt" else k

        def forward() -> Tensor:
            return rbp.fixed_point(p.f, p.h0, steps, method=method, truncate=truncate)

        return forward

    notes = {"rbp": "init='zeros'", "cg": "K iterations = K vjp + K jvp (double vjp)"}
    return Method(f"rbp.{method}", "rbp", make, uses_k=method != "bptt", note=notes.get(method, ""))


def _rbp_per_sample(method: str) -> Method:
    """``batch_dim=0``: each row is its own system, solved with its own Krylov space / stop."""

    def make(p: Problem, steps: int, k: int) -> Forward:
        f, x = p.with_input()

        def forward() -> Tensor:
            return rbp.fixed_point(
                f, p.h0, steps, method=method, truncate=k, batch_dim=0, inputs=(x,)
            )

        return forward

    return Method(f"rbp.{method}/ps", "rbp", make, note="batch_dim=0: one system per sample")


def _rbp_value(name: str, value: Callable[[int], Any], uses_k: bool, note: str) -> Method:
    def make(p: Problem, steps: int, k: int) -> Forward:
        method = value(k)
        return lambda: rbp.fixed_point(p.f, p.h0, steps, method=method)

    return Method(f"rbp.{name}", "rbp", make, uses_k=uses_k, note=note)


def _hand_neumann(p: Problem, steps: int, k: int) -> Forward:
    """The overhead baseline: Neumann-RBP written directly with autograd.

    ``T-1`` steps under no_grad, one step with a graph, and a hook on its output replacing the
    incoming ``g`` by ``z = sum_{t=0}^{K} (J^T)^t g`` (K calls of ``torch.autograd.grad``); the
    hook removes itself first, since those products flow through ``h_out`` again."""

    def forward() -> Tensor:
        with torch.no_grad():
            h = p.h0
            for _ in range(steps - 1):
                h = p.f(h)
        h_in = h.detach().requires_grad_()
        h_out = p.f(h_in)

        def neumann_hook(g: Tensor) -> Tensor:
            handle.remove()  # the products below pass through h_out again
            v, z = g, g.clone()
            for _ in range(k):
                (v,) = torch.autograd.grad(h_out, h_in, v, retain_graph=True)
                z.add_(v)
            return z

        handle = h_out.register_hook(neumann_hook)
        return h_out

    return forward


def _torchdeq_method(b_solver: str, f_solver: str = "fixed_point_iter") -> Method:
    def make(p: Problem, steps: int, k: int) -> Forward:
        from torchdeq import get_deq

        # Equal budgets: T-1 solver steps + the one graph step torchdeq appends = T updates;
        # tol=0 so that neither solve stops early; broyden spends max_iter + 1 products.
        deq = get_deq(
            core="sliced", ift=True, f_solver=f_solver, f_max_iter=steps - 1,
            f_tol=0.0, b_solver=b_solver, b_max_iter=k - 1 if b_solver == "broyden" else k,
            b_tol=0.0,
        )

        def forward() -> Tensor:
            z_out, _ = deq(p.f, p.h0)
            return z_out[-1]

        return forward

    note = "b_max_iter=K-1 (K products)" if b_solver == "broyden" else ""
    name = f"torchdeq.{b_solver}"
    if f_solver != "fixed_point_iter":
        name = f"torchdeq.{b_solver}+{f_solver.removesuffix('_fixed_point_iter')}-fwd"
        note = f"f_solver='{f_solver}' (no per-step statistics)"
    return Method(name, "torchdeq", make, requires="torchdeq", note=note)


def _torchopt_method(solver: str) -> Method:
    def make(p: Problem, steps: int, k: int) -> Forward:
        from torchopt.diff.implicit import custom_root
        from torchopt.linear_solve import solve_cg, solve_inv, solve_normal_cg

        if solver == "normal_cg":
            solve = solve_normal_cg(maxiter=k, rtol=0.0)
        elif solver == "cg":
            solve = solve_cg(maxiter=k, rtol=0.0)
        else:  # Neumann series of A^{-1}, A = J^T - I: alpha = -1 gives sum_t (J^T)^t
            solve = solve_inv(ns=True, maxiter=k, alpha=-1.0)
        step = p.step

        def optimality(h: Tensor, *args: Tensor) -> Tensor:
            return step(h, *args) - h

        def solver_fn(h0: Tensor, *args: Tensor) -> Tensor:
            h = h0
            for _ in range(steps):
                h = step(h, *args)
            return h

        root = custom_root(optimality, argnums=tuple(range(1, len(p.args) + 1)), solve=solve)(
            solver_fn
        )
        return lambda: root(p.h0, *p.args)

    notes = {
        "normal_cg": "CG on normal equations: K iterations = K vjp + K double-vjp",
        "ns": "solve_inv(ns=True, alpha=-1): Neumann series",
        "cg": "solve_cg assumes a symmetric PD system; (I - J^T) is not: shown as a misuse",
    }
    return Method(f"torchopt.{solver}", "torchopt", make, requires="torchopt",
                  note=notes[solver])


METHODS: tuple[Method, ...] = (
    *(_rbp_method(m) for m in RBP_METHODS),
    *(_rbp_per_sample(m) for m in ("neumann", "cg", "gmres")),
    _rbp_value("jfb", lambda k: rbp.JFB(), False, "JFB: z = g (no Jacobian product), inexact"),
    _rbp_value("phantom", lambda k: rbp.Phantom(k, 0.5), True,
               "Phantom(K, damping=0.5): K-1 damped products, inexact"),
    Method("hand.neumann", "baseline", _hand_neumann),
    _torchdeq_method("fixed_point_iter"),
    _torchdeq_method("anderson"),
    _torchdeq_method("broyden"),
    _torchdeq_method("fixed_point_iter", f_solver="simple_fixed_point_iter"),
    _torchopt_method("normal_cg"),
    _torchopt_method("ns"),
    _torchopt_method("cg"),
)
HAND = "hand.neumann"


def available(method: Method) -> str | None:
    """None if the method can run, else why not (a missing optional package)."""
    if method.requires is None:
        return None
    try:
        importlib.import_module(method.requires)
    except ImportError as exc:
        return f"{method.requires} not installed ({exc})"
    return None


# --------------------------------------------------------------------------- measurements


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def host_clock(device: torch.device) -> bool:
    """Whether process CPU time measures the work: only when it runs on the CPU."""
    return device.type == "cpu"


def run_once(p: Problem, forward: Forward) -> tuple[float, float]:
    """Forward + loss + backward; returns (wall, process CPU) seconds."""
    p.zero_grad()
    synchronize(p.device)
    start, cpu = time.perf_counter(), time.process_time()
    p.loss(forward()).backward()
    synchronize(p.device)
    return time.perf_counter() - start, time.process_time() - cpu


class _StorageCounter:
    """Bytes of distinct storages packed by autograd, leaving out known leaf storages."""

    def __init__(self, exclude: tuple[Tensor, ...]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        s = t.untyped_storage()
        self.seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    def kib(self, extra_only: bool = True) -> float:
        return sum(n for ptr, n in self.seen.items()
                   if not (extra_only and ptr in self.exclude)) / KIB


def saved_memory(p: Problem, forward: Forward) -> dict[str, float]:
    """KiB saved for backward by the forward (extra and total) and by graphs built in backward."""
    p.zero_grad()
    fwd, bwd = _StorageCounter(p.leaves()), _StorageCounter(p.leaves())
    with torch.autograd.graph.saved_tensors_hooks(fwd.pack, lambda t: t):
        loss = p.loss(forward())
    bwd_kib: float | None
    try:
        with torch.autograd.graph.saved_tensors_hooks(bwd.pack, lambda t: t):
            loss.backward(retain_graph=True)
        bwd_kib = bwd.kib()
    except RuntimeError:  # torch.func transforms (torchopt's backward) refuse saved-tensor hooks
        p.zero_grad()
        loss.backward()
        bwd_kib = None
    return {"saved_kib": fwd.kib(), "saved_total_kib": fwd.kib(extra_only=False),
            "bwd_saved_kib": bwd_kib}


class _CountVJP(torch.autograd.Function):
    """Identity on h whose backward counts reverse products through F."""

    calls = 0

    @staticmethod
    def forward(h: Tensor) -> Tensor:
        return h.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        _CountVJP.calls += 1
        return g


def count_calls(p: Problem, method: Method, steps: int, k: int) -> tuple[int, int]:
    """(F evaluations, reverse products through F) of one forward + backward."""
    counts = {"f": 0}
    base = p.step

    def counted(h: Tensor, *args: Tensor) -> Tensor:
        counts["f"] += 1
        return base(_CountVJP.apply(h), *args)

    q = Problem(p.name, p.description, counted, p.args, p.arg_names, p.h0, p.target,
                p.weight_index, p.input_index)
    forward = method.make(q, steps, k)
    _CountVJP.calls = 0
    q.zero_grad()
    q.loss(forward()).backward()
    return counts["f"], _CountVJP.calls


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 where the reference ``b`` lives (the CPU)."""
    return ((a.to(device=b.device, dtype=torch.float64) - b).norm() / b.norm()).item()


@dataclass
class Config:
    method: Method
    k: int | None
    forward: Forward
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def bench_problem(
    p: Problem, exact: Exact, methods: list[Method], steps: int, ks: list[int], repeats: int,
    dtype: torch.dtype, counts: bool, device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """All rows of one problem in one dtype on ``device`` (default: where ``p`` is)."""
    q = p.on(dtype, p.device if device is None else device)
    cpu_clock = host_clock(q.device)
    configs: list[Config] = []
    for m in methods:
        for k in (ks if m.uses_k else [None]):
            configs.append(Config(m, k, m.make(q, steps, k or 1)))
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rbp.ConvergenceWarning)
        warnings.filterwarnings("ignore", ".*functorch.vjp. is deprecated", FutureWarning)
        for c in configs:  # warm-up, and the gradients for the error columns
            run_once(q, c.forward)
            gw, gx = q.grads()
            rows.append({
                "problem": p.name, "dtype": str(dtype).removeprefix("torch."),
                "method": c.method.name, "family": c.method.family, "K": c.k,
                "T": steps, "rel_err_W": relative_error(gw, exact.grad_w),
                "rel_err_x": relative_error(gx, exact.grad_x), "note": c.method.note,
            })
        for r in range(repeats):  # round-robin, rotating the start
            for i in range(len(configs)):
                c = configs[(i + r) % len(configs)]
                wall, cpu = run_once(q, c.forward)
                c.times.append(wall)
                c.cpu.append(cpu)
        for row, c in zip(rows, configs, strict=True):
            row["time_ms"] = 1e3 * statistics.median(c.times)
            row["times_ms"] = [round(1e3 * t, 3) for t in c.times]
            row["cpu_ms"] = 1e3 * statistics.median(c.cpu) if cpu_clock else None
            row.update(saved_memory(q, c.forward))
            if counts:
                row["n_f"], row["n_vjp"] = count_calls(q, c.method, steps, c.k or 1)
    hand = {row["K"]: row for row in rows if row["method"] == HAND}
    for row in rows:
        ref = hand.get(row["K"])
        row["ratio_vs_hand"] = row["time_ms"] / ref["time_ms"] if ref else None
        row["cpu_ratio_vs_hand"] = (row["cpu_ms"] / ref["cpu_ms"]
                                    if ref and row["cpu_ms"] is not None else None)
    return rows


def _timed_phases(p: Problem, forward: Forward) -> tuple[float, float, float, float]:
    """(forward, loss + backward) seconds of one call: wall, then process CPU."""
    p.zero_grad()
    synchronize(p.device)
    t0, c0 = time.perf_counter(), time.process_time()
    h = forward()
    synchronize(p.device)
    t1, c1 = time.perf_counter(), time.process_time()
    p.loss(h).backward()
    synchronize(p.device)
    return t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1


def paired_overhead(
    p: Problem, steps: int, k: int, pairs: int, **rbp_kwargs: Any
) -> dict[str, Any]:
    """rbp.neumann against the hand-written loop, alternating call by call (``pairs`` each).

    Alternation puts both under the same background load; the paired ratio is the median of
    the per-pair ratios of total time. Forward and backward are timed separately, in wall and
    in process CPU time (which leaves out the time the process waits for a core).
    ``rbp_kwargs``: options of the call's :class:`rbp.Checks` (e.g. ``max_backward_error=None``)."""
    if rbp_kwargs:
        def ours() -> Tensor:
            return rbp.fixed_point(p.f, p.h0, steps, "neumann", k,
                                   checks=rbp.Checks(**rbp_kwargs))
    else:
        ours = next(m for m in METHODS if m.name == "rbp.neumann").make(p, steps, k)
    hand = _hand_neumann(p, steps, k)
    samples: dict[str, list[tuple[float, float, float, float]]] = {"rbp": [], "hand": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rbp.ConvergenceWarning)
        for fn in (ours, hand):
            _timed_phases(p, fn)
        for i in range(pairs):
            order = (("rbp", ours), ("hand", hand)) if i % 2 == 0 else (("hand", hand),
                                                                        ("rbp", ours))
            for name, fn in order:
                samples[name].append(_timed_phases(p, fn))
    out: dict[str, Any] = {"problem": p.name, "dtype": str(p.h0.dtype).removeprefix("torch."),
                           "T": steps, "K": k, "pairs": pairs,
                           "rbp_kwargs": {key: repr(v) for key, v in rbp_kwargs.items()}}
    cpu_clock = host_clock(p.device)  # off the CPU, process time misses the device's work
    for name, xs in samples.items():
        for clock, i in (("", 0), ("cpu_", 2)):
            measured = clock == "" or cpu_clock
            out[f"{name}_{clock}fwd_ms"] = (1e3 * statistics.median(x[i] for x in xs)
                                            if measured else None)
            out[f"{name}_{clock}bwd_ms"] = (1e3 * statistics.median(x[i + 1] for x in xs)
                                            if measured else None)
            out[f"{name}_{clock}total_ms"] = (1e3 * statistics.median(x[i] + x[i + 1] for x in xs)
                                              if measured else None)
    pairs_ = list(zip(samples["rbp"], samples["hand"], strict=True))
    out["paired_ratio"] = statistics.median((a[0] + a[1]) / (b[0] + b[1]) for a, b in pairs_)
    out["paired_cpu_ratio"] = (
        statistics.median((a[2] + a[3]) / (b[2] + b[3]) for a, b in pairs_) if cpu_clock
        else None
    )
    out["extra_cpu_us_per_call"] = (
        1e6 * statistics.median((a[2] + a[3]) - (b[2] + b[3]) for a, b in pairs_) if cpu_clock
        else None
    )
    out["extra_us_per_call"] = 1e6 * statistics.median(  # the same in wall time
        (a[0] + a[1]) - (b[0] + b[1]) for a, b in pairs_
    )
    return out


# --------------------------------------------------------------------------- driver


SIZES = {
    # name: (hidden, batch, inputs)
    "full": {"rnn": (256, 64, 64), "gru": (128, 64, 32), "rnn-nonnormal": (256, 64, 64)},
    "quick": {"rnn": (16, 4, 8), "gru": (12, 4, 6), "rnn-nonnormal": (16, 4, 8)},
}


def default_dtypes(quick: bool) -> list[str]:
    return ["float64"] if quick else ["float64", "float32"]


def check_dtypes(device: torch.device, dtype_names: list[str]) -> None:
    """Refuse, before any work, a dtype the device cannot hold (MPS has no float64)."""
    if device.type == "mps" and "float64" in dtype_names:
        raise ValueError("device 'mps' has no float64; run with --dtypes float32 there")


def device_or_exit(script: str, name: str, dtype_names: list[str]) -> torch.device:
    """The device ``name`` after checking it holds ``dtype_names``; else one line
    ``<script>: error: ...`` on stderr and exit 2, before any work."""
    try:
        device = resolve_device(name)
        check_dtypes(device, dtype_names)
    except ValueError as exc:  # ConfigError: no such device here; no float64 on it
        print(f"{script}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return device


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None),
    so that a count of 0 or a negative one is a usage error, not a silent default or a
    traceback from inside the run."""

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


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a tolerance; ``nan``, ``inf`` and 0 refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def refuse_repeats(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   *names: str) -> None:
    """A usage error for a list option (``--k 5 5``) that names a value twice: the run would
    measure it twice and print duplicate rows."""
    for name in names:
        values = getattr(args, name) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} names {', '.join(twice)} more than once; give each value once")


#: The largest seed torch's generators and the ``rbp`` runner take (``rbp.runner.config``).
MAX_SEED = 2**32 - 1


def out_dir_or_exit(script: str, out: Path) -> Path:
    """``out`` created (with its parents) and writable; else one line ``<script>: error: ...``
    on stderr and exit 2, before any work (not a traceback when the results are written)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(out, os.W_OK) else "is not writable"
    except FileExistsError:
        problem = "is a file, not a folder"
    except OSError as exc:
        problem = f"cannot be created ({exc.strerror or exc})"
    if problem is not None:
        print(f"{script}: error: --out {out} {problem}; pass a folder that can be written",
              file=sys.stderr)
        raise SystemExit(2)
    return out


def build_problems(quick: bool, names: list[str], seed: int) -> list[Problem]:
    sizes = SIZES["quick" if quick else "full"]
    makers: dict[str, Callable[[], Problem]] = {
        "rnn": lambda: make_rnn(*sizes["rnn"], seed),
        "gru": lambda: make_gru(*sizes["gru"], seed),
        "rnn-nonnormal": lambda: make_rnn(*sizes["rnn-nonnormal"], seed, nonnormal=True),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown problems {unknown}; choose from {sorted(makers)}")
    return [makers[n]() for n in names]


def run(
    *, quick: bool = False, repeats: int | None = None, steps: int | None = None,
    ks: list[int] | None = None, problems: list[str] | None = None,
    dtypes: list[str] | None = None, seed: int = 0, counts: bool = True,
    pairs: int | None = None, device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The whole benchmark on ``device`` (a name is resolved with
    :func:`rbp.runner.device.resolve_device`, which raises ``ConfigError``, a ``ValueError``,
    for a device this machine lacks); returns the JSON-ready result dict."""
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    steps = steps or (80 if quick else 100)
    ks = ks or ([5, 25] if quick else [10, 20, 30])
    repeats = repeats or (2 if quick else 9)
    names = problems or ["rnn", "gru", "rnn-nonnormal"]
    dtype_names = dtypes or default_dtypes(quick)
    check_dtypes(device, dtype_names)
    if max(ks) > steps:
        raise ValueError("every K must be <= T (tbptt back-propagates K steps)")
    methods, skipped = [], []
    for m in METHODS:
        why = available(m)
        if why is None:
            methods.append(m)
        else:
            skipped.append({"method": m.name, "reason": why})
    result: dict[str, Any] = {
        "settings": {"T": steps, "K": ks, "repeats": repeats, "quick": quick, "seed": seed,
                     "dtypes": dtype_names, "threads": torch.get_num_threads(),
                     **device_settings(device)},
        "versions": _versions(), "machine": _machine(), "problems": {}, "rows": [],
        "skipped": skipped,
    }
    start = time.perf_counter()
    for p in build_problems(quick, names, seed):
        exact = exact_gradients(p)
        with torch.no_grad():
            h = p.h0
            for _ in range(steps):
                h_prev, h = h, p.f(h)
        result["problems"][p.name] = {
            "description": p.description, "rho_J": exact.rho, "norm_J": exact.norm,
            "exact_forward_steps": exact.steps, "exact_residual": exact.residual,
            "forward_rel_change_at_T": ((h - h_prev).norm() / h.norm()).item(),
        }
        for dname in dtype_names:
            result["rows"] += bench_problem(
                p, exact, methods, steps, ks, repeats, getattr(torch, dname),
                counts and dname == "float64", device,
            )
    result["overhead"] = {
        f"{r['problem']}/{r['dtype']}/K={r['K']}": {"wall": r["ratio_vs_hand"],
                                                    "cpu": r["cpu_ratio_vs_hand"]}
        for r in result["rows"] if r["method"] == "rbp.neumann"
    }
    pairs = 3 if quick and pairs is None else (40 if pairs is None else pairs)
    paired: list[dict[str, Any]] = []
    if pairs > 0:
        # The same problems, plus a tiny one where per-call Python work is all there is.
        studied = build_problems(quick, names, seed) + [make_rnn(16, 4, 8, seed)]
        studied[-1].name = "rnn-tiny"
        for p in studied:
            for dname in dtype_names:
                q = p.on(getattr(torch, dname), device)
                for k in ks:
                    paired.append(paired_overhead(q, steps, k, pairs))
    result["overhead_paired"] = paired
    # The issue's small problem: tanh RNN, 128 units, batch 16, T = 50, K = 20, float32 CPU;
    # with the default a-posteriori error check and without it.
    target = []
    if pairs > 0:
        small = make_rnn(*((16, 4, 8) if quick else (128, 16, 32)), seed).cast(torch.float32,
                                                                               device)
        small.name = "rnn-128x16" if not quick else "rnn-tiny"
        for kwargs in ({}, {"max_backward_error": None}):
            target.append(paired_overhead(small, 50, 20, max(pairs, 3 if quick else 200),
                                          **kwargs))
    result["overhead_target"] = target
    result["wall_time_s"] = time.perf_counter() - start
    return result


def device_settings(device: torch.device) -> dict[str, Any]:
    """What the JSON records of the device: ``device`` and, on a GPU, ``gpu`` (its model) and
    whether float32 matmuls / convolutions may use TF32 there."""
    out = describe_device(device)
    if device.type == "cuda":
        out["allow_tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                             "cudnn": torch.backends.cudnn.allow_tf32}
    return out


def device_line(settings: dict[str, Any], cpu_clock: bool = True) -> str:
    """The printed header: which device the numbers come from (and, off the CPU, if the
    benchmark also reads a process CPU clock, that it records wall time only)."""
    name = settings.get("device", "cpu")
    gpu = f" ({settings['gpu']})" if settings.get("gpu") else ""
    clock = ("" if name == "cpu" or not cpu_clock
             else "; wall time only (process CPU time misses GPU work)")
    return f"device: {name}{gpu}, torch threads {settings.get('threads')}{clock}"


def write_result(out: Path, name: str, result: dict[str, Any], table: str) -> None:
    """Write ``result`` as ``out/name`` (JSON) and print ``table`` and where it went."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1))
    print(table)
    print(f"\nwrote {out / name} ({result['wall_time_s']:.0f} s)")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "rbp": rbp.__version__}
    for name in ("torchdeq", "torchopt"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def _num(value: float | None, spec: str) -> str:
    """``value`` formatted, or ``-`` where it was not measured (CPU time off the CPU)."""
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The device line, then a Markdown table of all rows. Off the CPU the overhead tables
    compare wall time (process CPU time is not recorded there)."""
    head = ("| problem | dtype | method | K | rel. err dW | rel. err dx | time ms | cpu ms "
            "| saved KiB | bwd KiB | F / vjp | ratio vs hand (wall / cpu) |")
    lines = [device_line(result["settings"]), ""] if "settings" in result else []
    if result["rows"]:  # none with --overhead-only
        lines += [head, "|" + "---|" * 12]
    for r in result["rows"]:
        calls = f"{r['n_f']} / {r['n_vjp']}" if "n_f" in r else "-"
        ratio = (f"{r['ratio_vs_hand']:.2f} / {_num(r['cpu_ratio_vs_hand'], '.2f')}"
                 if r["ratio_vs_hand"] else "-")
        bwd = "n/a" if r["bwd_saved_kib"] is None else f"{r['bwd_saved_kib']:.0f}"
        lines.append(
            f"| {r['problem']} | {r['dtype']} | {r['method']} | {r['K'] or '-'} "
            f"| {r['rel_err_W']:.2e} | {r['rel_err_x']:.2e} | {r['time_ms']:.2f} "
            f"| {_num(r['cpu_ms'], '.2f')} "
            f"| {r['saved_kib']:.0f} | {bwd} | {calls} | {ratio} |"
        )
    for s in result["skipped"]:
        lines.append(f"\nskipped {s['method']}: {s['reason']}")
    if result.get("overhead_paired"):
        paired = result["overhead_paired"]
        cpu = all(o["paired_cpu_ratio"] is not None for o in paired)
        c, extra = ("cpu_", "extra_cpu_us_per_call") if cpu else ("", "extra_us_per_call")
        lines += ["", "rbp.neumann vs hand.neumann, alternating calls (medians; "
                  f"{'CPU' if cpu else 'wall'} ms):", "",
                  "| problem | dtype | K | rbp fwd | hand fwd | rbp bwd | hand bwd "
                  f"| paired ratio wall | paired ratio cpu | extra {'cpu' if cpu else 'wall'} "
                  "us/call |",
                  "|" + "---|" * 10]
        for o in paired:
            lines.append(
                f"| {o['problem']} | {o['dtype']} | {o['K']} | {o[f'rbp_{c}fwd_ms']:.2f} "
                f"| {o[f'hand_{c}fwd_ms']:.2f} | {o[f'rbp_{c}bwd_ms']:.2f} "
                f"| {o[f'hand_{c}bwd_ms']:.2f} | {o['paired_ratio']:.3f} "
                f"| {_num(o['paired_cpu_ratio'], '.3f')} | {o[extra]:.0f} |"
            )
    for o in result.get("overhead_target", []):
        cpu = o["paired_cpu_ratio"] is not None
        c, clock = ("cpu_", "CPU") if cpu else ("", "wall")
        ratio = o["paired_cpu_ratio"] if cpu else o["paired_ratio"]
        lines.append(
            f"\ntarget {o['problem']} {o['dtype']} T={o['T']} K={o['K']} {o['rbp_kwargs'] or ''}: "
            f"rbp fwd {o[f'rbp_{c}fwd_ms']:.3f} / bwd {o[f'rbp_{c}bwd_ms']:.3f} ms, hand fwd "
            f"{o[f'hand_{c}fwd_ms']:.3f} / bwd {o[f'hand_{c}bwd_ms']:.3f} ms, paired {clock} "
            f"ratio {ratio:.3f}"
        )
    return "\n".join(lines)


def _check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as a usage error, options that the run would ignore or fail on midway."""
    if args.overhead_only:
        ignored = [flag for flag, value in (("--steps", args.steps), ("--k", args.k),
                                            ("--repeats", args.repeats),
                                            ("--no-counts", args.no_counts or None))
                   if value is not None]
        if ignored:
            verb = "does" if len(ignored) == 1 else "do"
            parser.error(f"{', '.join(ignored)} {verb} not apply with --overhead-only (its "
                         "sizes are fixed: T=50 / 100, K=20); leave it out")
        if args.pairs == 0:
            parser.error("--pairs 0 with --overhead-only leaves nothing to measure; give "
                         "--pairs 1 or more, or leave --overhead-only out")
        return
    steps = args.steps or (80 if args.quick else 100)
    ks = args.k or ([5, 25] if args.quick else [10, 20, 30])
    if max(ks) > steps:
        given = "--k" if args.k else "the default K"
        parser.error(f"{given} {max(ks)} is larger than T = {steps} (tbptt back-propagates K "
                     "steps); give every K <= --steps")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None,
                        help="timed calls per config")
    parser.add_argument("--out", type=Path, default=Path("results/core_bench"))
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="forward steps T (default 100; --quick 80)")
    parser.add_argument("--k", type=int_at_least(1), nargs="+", default=None,
                        help="backward budgets K, each <= T")
    parser.add_argument("--problems", nargs="+", default=None, choices=list(SIZES["full"]),
                        help="rnn gru rnn-nonnormal (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float64", "float32"],
                        help="float64 float32")
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="torch.set_num_threads")
    parser.add_argument("--no-counts", action="store_true", help="skip the F / vjp count run")
    parser.add_argument("--pairs", type=int_at_least(0), default=None,
                        help="alternating rbp/hand calls in the overhead study (0: skip)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the paired overhead study: rbp.neumann against the "
                             "hand-written loop on the small problem (tanh RNN 128 x 16, T=50, "
                             "K=20, float32; --pairs, default 300) and on the full-size "
                             "problems (T=100, K=20, float32 and float64, 30 pairs; ~4 min)")
    parser.add_argument("--device", default="cpu",
                        help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    args = parser.parse_args(argv)
    refuse_repeats(parser, args, "k", "problems", "dtypes")
    _check_combination(parser, args)
    # the small overhead problem is float32; the full-size ones run in both by default
    dtypes = args.dtypes or (["float32", "float64"] if args.overhead_only
                             else default_dtypes(args.quick))
    device = device_or_exit("core_bench", args.device, dtypes)
    out_dir_or_exit("core_bench", args.out)
    torch.set_num_threads(args.threads)
    if args.overhead_only:
        pairs = 300 if args.pairs is None else args.pairs
        small = make_rnn(128, 16, 32, 0).cast(torch.float32, device)
        small.name = "rnn-128x16"
        start = time.perf_counter()
        target = [paired_overhead(small, 50, 20, pairs, **kw)
                  for kw in ({}, {"max_backward_error": None})]
        # the full-size problems, where F's cost dominates what rbp adds per call
        full_pairs = 3 if args.quick else 30
        full = [paired_overhead(p.on(getattr(torch, d), device), 100, 20, full_pairs)
                for p in build_problems(args.quick, args.problems or list(SIZES["full"]), 0)
                for d in (args.dtypes or ["float32", "float64"])]
        only: dict[str, Any] = {
            "settings": {"threads": torch.get_num_threads(), "pairs": pairs,
                         "full_size_pairs": full_pairs, **device_settings(device)},
            "versions": _versions(), "machine": _machine(), "overhead_target": target,
            "overhead_paired": full,
            "wall_time_s": time.perf_counter() - start,
            "command": " ".join(["python", "benchmarks/core_bench.py",
                                 *(argv or sys.argv[1:])]),
        }
        write_result(args.out, "overhead.json", only,
                     format_table({"rows": [], "skipped": [], **only}))
        return only
    result = run(quick=args.quick, repeats=args.repeats, steps=args.steps, ks=args.k,
                 problems=args.problems, dtypes=args.dtypes, counts=not args.no_counts,
                 pairs=args.pairs, device=device)
    result["command"] = " ".join(["python", "benchmarks/core_bench.py", *(argv or sys.argv[1:])])
    write_result(args.out, "bench.json", result, format_table(result))
    return result


if __name__ == "__main__":
    main()
