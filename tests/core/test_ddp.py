"""``rbp.fixed_point`` under DistributedDataParallel (2 CPU processes, gloo) and torch.compile.

DDP: every method gives the parameter gradients of one process on the concatenated batch; each
backward reduces every parameter exactly once (the implicit methods' inner
``torch.autograd.grad`` calls do not trigger DDP's hooks); and the forward graph DDP keeps is
the plain module's (O(1) in the number of steps for the implicit methods).

torch.compile: see docs/scale_out.md for the behaviour asserted here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import rbp

H, D, B, STEPS, K = 5, 3, 4, 60, 60  # state size, input size, batch per rank, T, K
WORLD = 2


class FixedPointNet(nn.Module):
    """``h* = tanh(W h* + U x)``, output ``V h* + c``; W's spectral norm is about 0.3."""

    def __init__(self, method: str, steps: int = STEPS, truncate: int = K,
                 jvp: str = "double_vjp") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(0.3 * torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5)
        self.U = nn.Linear(D, H, dtype=torch.float64)
        self.out = nn.Linear(H, 2, dtype=torch.float64)
        with torch.no_grad():
            for p in (*self.U.parameters(), *self.out.parameters()):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.method, self.steps, self.truncate, self.jvp = method, steps, truncate, jvp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ux = self.U(x)
        k = min(self.truncate, 20) if self.method == "tbptt" else self.truncate
        how = rbp.linear.CGNormal(max_iter=k, jvp=self.jvp) if self.method == "cg" else self.method
        h = rbp.fixed_point(lambda h: torch.tanh(h @ self.W.T + ux),
                            torch.zeros(x.shape[0], H, dtype=torch.float64), self.steps,
                            how, k, checks=rbp.Checks(settle_tol=None))
        return self.out(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * B, D, generator=g, dtype=torch.float64),
            torch.randn(WORLD * B, 2, generator=g, dtype=torch.float64))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def _counting_hook(state, bucket):  # noqa: ANN001 (DDP checks the annotations, as objects)
    """Count the gradient elements reduced, then do DDP's default averaging allreduce."""
    state["numel"] += bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    x, y = _data()
    xs, ys = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    result: dict[str, Any] = {}
    for method in rbp.METHODS:
        for unused in (False, True):
            net = FixedPointNet(method)
            n_params = sum(p.numel() for p in net.parameters())
            model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=unused)
            counter = {"numel": 0}
            model.register_comm_hook(counter, _counting_hook)
            reduced = []
            for _ in range(2):  # a second step fails if DDP missed a gradient in the first
                model.zero_grad(set_to_none=True)
                counter["numel"] = 0
                _loss(model, xs, ys).backward()
                reduced.append(counter["numel"] / n_params)
            entry = {"grads": _grads(net), "reduced": reduced}
            if not unused:
                local = FixedPointNet(method)
                _loss(local, xs, ys).backward()
                entry["local"] = _grads(local)
                entry["saved"] = _saved_bytes(model, xs)
                entry["saved_plain"] = _saved_bytes(local, xs)
                net.steps = 2 * STEPS
                entry["saved_2T"] = _saved_bytes(model, xs)
            result[f"{method}/{unused}"] = entry
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("ddp")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("method", rbp.METHODS)
def test_ddp_matches_one_process_on_the_whole_batch(
    ddp_results: list[dict[str, Any]], method: str
) -> None:
    x, y = _data()
    ref_net = FixedPointNet(method)
    _loss(ref_net, x, y).backward()
    ref = _grads(ref_net)
    for unused in (False, True):
        ranks = [r[f"{method}/{unused}"] for r in ddp_results]
        for name, g in ref.items():
            assert g.abs().max() > 1e-3, name  # no vanishing gradient
            for entry in ranks:
                torch.testing.assert_close(entry["grads"][name], g, rtol=1e-10, atol=1e-12)
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
        # Every parameter's gradient went through the reducer exactly once per backward.
        assert all(r["reduced"] == [1.0, 1.0] for r in ranks)
    # Without the allreduce, each rank's gradient is its own half's (the test can fail).
    local = ddp_results[0][f"{method}/False"]["local"]
    assert any((local[n] - g).abs().max() > 1e-3 for n, g in ref.items())


@pytest.mark.parametrize("method", rbp.METHODS)
def test_ddp_keeps_the_plain_forward_graph(ddp_results: list[dict[str, Any]],
                                           method: str) -> None:
    entry = ddp_results[0][f"{method}/False"]
    assert entry["saved"] == entry["saved_plain"] > 0
    if method in rbp.IMPLICIT_METHODS or method == "tbptt":
        assert entry["saved_2T"] == entry["saved"]  # O(1) (O(K)) in the number of steps
    else:
        assert entry["saved_2T"] > 1.5 * entry["saved"]  # bptt stores every step


def test_sharding_changes_truncated_krylov_gradients_only() -> None:
    """DDP averages the gradients of the ranks' sub-batches. Per-sample recurrences make
    bptt, tbptt, neumann and rbp (zero start) separable over the batch at any truncation;
    cg and gmres minimise over the whole (sub-)batch's Krylov space, so with a truncated
    solve their gradient depends on how the batch is split."""
    x, y = _data()
    for method in rbp.METHODS:
        full = FixedPointNet(method, truncate=3)
        _loss(full, x, y).backward()
        halves = FixedPointNet(method, truncate=3)
        for r in range(WORLD):
            (_loss(halves, x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]) / WORLD).backward()
        err = max((p.grad - q.grad).abs().max().item()
                  for p, q in zip(full.parameters(), halves.parameters(), strict=True))
        if method in ("cg", "gmres"):
            assert err > 1e-6, method
        else:
            assert err < 1e-12, method


# ---------------------------------------------------------------- torch.compile


def _compiled_vs_eager(method: str, backend: str, jvp: str = "double_vjp",
                       fullgraph: bool = False) -> float:
    torch._dynamo.reset()
    x, y = _data()
    eager = FixedPointNet(method, steps=6, truncate=4, jvp=jvp)
    loss = _loss(eager, x, y)
    loss.backward()
    net = FixedPointNet(method, steps=6, truncate=4, jvp=jvp)
    compiled = torch.compile(net, backend=backend, fullgraph=fullgraph)
    closs = _loss(compiled, x, y)
    closs.backward()
    assert torch.allclose(closs, loss, rtol=1e-12, atol=0)
    return max((p.grad - q.grad).abs().max().item()
               for p, q in zip(eager.parameters(), net.parameters(), strict=True))


def _compile_behaviour(backend: str) -> None:
    for method in rbp.METHODS:
        if method == "cg":
            # cg's default J v is a double vjp through the last step, which AOTAutograd
            # refuses; forward-mode J v (jvp="func") works.
            with pytest.raises(RuntimeError, match="does not currently support double backward"):
                _compiled_vs_eager(method, backend)
            assert _compiled_vs_eager(method, backend, jvp="func") < 1e-12
        else:
            assert _compiled_vs_eager(method, backend) < 1e-12, method
    # fixed_point reads values on the host (finiteness check, norms): no single graph.
    with pytest.raises(Exception, match="data-dependent|Unsupported|graph break"):
        _compiled_vs_eager("neumann", backend, fullgraph=True)


def test_torch_compile_aot_eager() -> None:
    _compile_behaviour("aot_eager")


def test_torch_compile_of_the_step() -> None:
    """Compiling only the update ``f`` and handing it to fixed_point. (cg with jvp="func" calls
    torch.func.jvp on the compiled step, which Dynamo runs eagerly: fullgraph=True refuses it.)"""
    g = torch.Generator().manual_seed(2)
    w = (0.3 * torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5).requires_grad_()
    x = torch.randn(B, H, generator=g, dtype=torch.float64)

    def step(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ w.T + x)

    for method in rbp.METHODS:
        for jvp in ("double_vjp", "func") if method == "cg" else ("double_vjp",):
            grads = []
            for f in (step, torch.compile(step, backend="aot_eager")):
                torch._dynamo.reset()
                w.grad = None
                how = rbp.linear.CGNormal(max_iter=8, jvp=jvp) if method == "cg" else method
                h = rbp.fixed_point(f, torch.zeros_like(x), 20, how, 8,
                                    checks=rbp.Checks(settle_tol=None))
                if method == "cg" and jvp == "double_vjp" and f is not step:
                    with pytest.raises(RuntimeError, match="double backward"):
                        h.square().sum().backward()
                    break
                h.square().sum().backward()
                grads.append(w.grad.clone())
            if len(grads) == 2:
                torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RBP_SLOW_TESTS"),
                    reason="compiles C++ kernels (~30 s); set RBP_SLOW_TESTS=1 to run")
def test_torch_compile_inductor() -> None:
    _compile_behaviour("inductor")
