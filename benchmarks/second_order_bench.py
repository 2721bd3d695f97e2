"""Second derivatives through a fixed point: ``Implicit(solver, second_order=True)`` against
BPTT's double backward, in error, time and saved memory, as the forward length T grows.

    OMP_NUM_THREADS=1 python benchmarks/second_order_bench.py [--quick] [--repeats N]
        [--problems rnn gru] [--steps 25 100 400] [--k 10 30 100] [--ref-steps N]
        [--threads 1] [--out results/second_order_bench]

On the ``rnn`` and ``gru`` problems of ``benchmarks/core_bench.py`` (float64), every method
computes a Hessian-vector product through ``h_T = F^T(h_0)``: with ``L = 0.5 ||h_T - target||^2``
and ``g = dL/dtheta`` taken with ``create_graph=True`` (theta: every tensor F uses, weights and
input), ``hvp = d<g, v>/dtheta`` for a fixed random direction ``v``. Methods: ``bptt`` (double
backward through the T steps: O(T) graphs), and ``rbp.Implicit(solver, second_order=True)``
with ``GMRES(max_iter=K, tol=1e-12)``, ``Neumann(max_iter=K)`` and ``CGNormal(max_iter=K,
tol=1e-12)`` (two graphs of one step, whatever T; the adjoint solve differentiated by one more
solve of ``(I - J) u = v``). Reported per row:

* ``rel_err``: ``||hvp - ref|| / ||ref||`` over all parameters, against the same HVP by BPTT at
  ``--ref-steps`` (default 2 x the largest T) from the same ``h_0``; ``ref_check`` in
  ``problems`` is that reference against BPTT at half its length (how converged it is).
  ``rel_err_grad``: the same for the first derivative ``g``;
* ``time_ms``: median wall time of forward + ``create_graph`` backward + second backward over
  ``--repeats`` calls after one warm-up, all configurations of a problem interleaved;
* ``fwd_kib``, ``bwd1_kib``, ``bwd2_kib``: distinct storages autograd saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``, core_bench's ``_StorageCounter``, the problem's
  leaves and ``v`` left out) during the forward (``fixed_point`` + loss), the ``create_graph``
  backward (+ ``<g, v>``), and the second backward; ``held_kib``: the distinct storages of the
  first two together (what is held when the second backward starts). The second-order node's
  backward builds its graphs inside the autograd engine; ``hooks_in_node`` records that the
  hooks saw packs made there (frames of ``rbp.higher_order._differentiable_gradient``).

Writes ``OUT/bench.json`` and prints a Markdown table. ``--quick``: tiny sizes, T in (10, 40),
one repeat (seconds).
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_bench as cb  # noqa: E402 (the problems and the storage counter)

import rbp  # noqa: E402

Tensor = torch.Tensor
SIZES = {mode: {n: cb.SIZES[mode][n] for n in ("rnn", "gru")} for mode in ("full", "quick")}
STEPS = {"full": (25, 100, 400), "quick": (10, 40)}
KS = (10, 30, 100)
TOL = 1e-12
IGNORE = rbp.Checks(on_failure="ignore")
NOTES = [
    "memory is what saved_tensors_hooks see: tensors autograd saves for backward, including "
    "those saved while the second-order node's backward builds its graphs (hooks_in_node)",
    "not seen by the hooks (constant in T): tensors rbp keeps as autograd.Function context "
    "attributes rather than save_for_backward (the second-order plan's h_{T-1} and F(h_{T-1}), "
    "the adjoint z of the inner node: about 3 state-sized tensors) and the solvers' transient "
    "workspace (the Krylov basis of GMRES(K): K + 1 state-sized vectors during a solve)",
    "errors at small T are dominated by the unconverged forward (the implicit formula is taken "
    "at h_T, the reference at a converged state); bptt's are the truncation of the unroll",
]


@dataclass
class Config:
    name: str
    k: int | None
    method: Callable[[], Any]
    times: list[float] = field(default_factory=list)


def configs(ks: list[int]) -> list[Config]:
    out = [Config("bptt", None, lambda: "bptt")]
    for k in ks:
        out += [
            Config("gmres", k, lambda k=k: rbp.Implicit(rbp.linear.GMRES(max_iter=k, tol=TOL),
                                                        second_order=True)),
            Config("neumann", k, lambda k=k: rbp.Implicit(rbp.linear.Neumann(max_iter=k),
                                                          second_order=True)),
            Config("cg", k, lambda k=k: rbp.Implicit(rbp.linear.CGNormal(max_iter=k, tol=TOL),
                                                     second_order=True)),
        ]
    return out


def direction(p: cb.Problem, seed: int = 5) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same v on every device
    return [torch.randn(a.shape, dtype=a.dtype, generator=gen).to(a.device) for a in p.args]


def hvp(p: cb.Problem, method: Any, steps: int, v: list[Tensor]
        ) -> tuple[list[Tensor], list[Tensor]]:
    """(g, d<g, v>/dtheta) with ``g = dL/dtheta`` through ``steps`` forward steps."""
    h = rbp.fixed_point(p.f, p.h0, steps, method, checks=IGNORE)
    grads = torch.autograd.grad(p.loss(h), p.args, create_graph=True)
    inner = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
    second = torch.autograd.grad(inner, p.args, allow_unused=True, materialize_grads=True)
    return [g.detach() for g in grads], list(second)


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum((x - y).pow(2).sum() for x, y in zip(a, b, strict=True))
    den = sum(y.pow(2).sum() for y in b)
    return (num / den).sqrt().item()


class _Counter(cb._StorageCounter):
    """core_bench's counter, also noting packs made inside the second-order node's backward."""

    def __init__(self, exclude: tuple[Tensor, ...]) -> None:
        super().__init__(exclude)
        self.in_node = 0

    def pack(self, t: Tensor) -> Tensor:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_differentiable_gradient":
                self.in_node += 1
                break
            frame = frame.f_back
        return super().pack(t)


def saved_memory(p: cb.Problem, method: Any, steps: int, v: list[Tensor]) -> dict[str, Any]:
    exclude = (*p.leaves(), *v)
    fwd, bwd1, bwd2, held = (_Counter(exclude) for _ in range(4))

    def both(*counters: _Counter) -> Callable[[Tensor], Tensor]:
        def pack(t: Tensor) -> Tensor:
            for c in counters:
                c.pack(t)
            return t
        return pack

    with torch.autograd.graph.saved_tensors_hooks(both(fwd, held), lambda t: t):
        loss = p.loss(rbp.fixed_point(p.f, p.h0, steps, method, checks=IGNORE))
    with torch.autograd.graph.saved_tensors_hooks(both(bwd1, held), lambda t: t):
        grads = torch.autograd.grad(loss, p.args, create_graph=True)
        inner = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
    with torch.autograd.graph.saved_tensors_hooks(bwd2.pack, lambda t: t):
        torch.autograd.grad(inner, p.args, allow_unused=True)
    return {"fwd_kib": fwd.kib(), "bwd1_kib": bwd1.kib(), "bwd2_kib": bwd2.kib(),
            "held_kib": held.kib(), "hooks_in_node": bwd1.in_node + bwd2.in_node}


def _timed(p: cb.Problem, method: Any, steps: int, v: list[Tensor]) -> float:
    cb.synchronize(p.device)
    start = time.perf_counter()
    hvp(p, method, steps, v)
    cb.synchronize(p.device)
    return time.perf_counter() - start


def bench_problem(p: cb.Problem, steps_list: list[int], ks: list[int], ref_steps: int,
                  repeats: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    v = direction(p)
    ref_g, ref = hvp(p, "bptt", ref_steps, v)
    half_g, half = hvp(p, "bptt", ref_steps // 2, v)
    info = {"description": p.description, "ref_steps": ref_steps,
            "ref_check": rel_err(half, ref), "ref_check_grad": rel_err(half_g, ref_g)}
    rows, timed = [], []
    for steps in steps_list:
        for cfg in configs(ks):
            method = cfg.method()
            g, got = hvp(p, method, steps, v)  # also the warm-up
            row = {"problem": p.name, "T": steps, "method": cfg.name, "K": cfg.k,
                   "rel_err": rel_err(got, ref), "rel_err_grad": rel_err(g, ref_g)}
            row.update(saved_memory(p, method, steps, v))
            rows.append(row)
            timed.append((cfg, method, steps))
    for _ in range(repeats):  # interleaved, so that outside load falls on all alike
        for cfg, method, steps in timed:
            cfg.times.append(_timed(p, method, steps, v))
    for row, (cfg, _, _) in zip(rows, timed, strict=True):
        row["time_ms"] = 1e3 * statistics.median(cfg.times)
        row["times_ms"] = [1e3 * t for t in cfg.times]
    return info, rows


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for name, problem in result["problems"].items():
        lines += ["", f"### {name}: {problem['description']} (reference: bptt, T = "
                  f"{problem['ref_steps']}; vs T/2: {problem['ref_check']:.1e})", "",
                  "| T | method | K | rel. err HVP | rel. err grad | time ms | fwd KiB "
                  "| bwd1 KiB | held KiB | bwd2 KiB |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            if r["problem"] != name:
                continue
            lines.append(
                f"| {r['T']} | {r['method']} | {r['K'] or '-'} | {r['rel_err']:.2e} "
                f"| {r['rel_err_grad']:.2e} | {r['time_ms']:.1f} | {r['fwd_kib']:.0f} "
                f"| {r['bwd1_kib']:.0f} | {r['held_kib']:.0f} | {r['bwd2_kib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--repeats", type=cb.int_at_least(1), default=None,
                        help="timed calls per config")
    parser.add_argument("--problems", nargs="+", default=["rnn", "gru"], help="rnn gru")
    parser.add_argument("--steps", type=cb.int_at_least(1), nargs="+", default=None,
                        help="forward lengths T")
    parser.add_argument("--k", type=cb.int_at_least(1), nargs="+", default=list(KS),
                        help="solver iterations")
    parser.add_argument("--ref-steps", type=cb.int_at_least(1), default=None,
                        help="T of the BPTT reference (default: 2 x the largest T; quick: 400)")
    parser.add_argument("--threads", type=cb.int_at_least(1), default=1,
                        help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("results/second_order_bench"))
    parser.add_argument("--device", default="cpu",
                        help="auto, cpu, cuda, cuda:N (default: cpu; float64 throughout)")
    args = parser.parse_args(argv)
    cb.refuse_repeats(parser, args, "problems", "steps", "k")
    device = cb.device_or_exit("second_order_bench", args.device, ["float64"])
    mode = "quick" if args.quick else "full"
    steps_list = args.steps or list(STEPS[mode])
    ref_steps = args.ref_steps or (400 if args.quick else 2 * max(steps_list))
    repeats = args.repeats or (1 if args.quick else 3)
    unknown = set(args.problems) - set(SIZES[mode])
    if unknown:
        parser.error(f"unknown problems {sorted(unknown)}; choose from rnn gru")
    cb.out_dir_or_exit("second_order_bench", args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        makers = {"rnn": cb.make_rnn, "gru": cb.make_gru}
        problems, rows = {}, []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rbp.ConvergenceWarning)
            for name in args.problems:
                p = makers[name](*SIZES[mode][name], 0).on(torch.float64, device)
                problems[name], got = bench_problem(p, steps_list, args.k, ref_steps, repeats)
                rows += got
        result = {
            "settings": {"quick": args.quick, "repeats": repeats, "threads": args.threads,
                         "steps": steps_list, "k": args.k, "ref_steps": ref_steps, "tol": TOL,
                         "dtype": "float64", "sizes": {n: SIZES[mode][n] for n in args.problems},
                         **cb.device_settings(device),
                         "hvp": "d<dL/dtheta, v>/dtheta, theta = all tensors F uses, "
                                "v ~ N(0, 1) (seed 5)"},
            "versions": {"torch": torch.__version__, "rbp": rbp.__version__,
                         "python": platform.python_version()},
            "machine": {"processor": platform.processor() or platform.machine()},
            "notes": NOTES, "problems": problems, "rows": rows,
            "wall_time_s": time.perf_counter() - start,
            "command": " ".join(["python", "benchmarks/second_order_bench.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
        }
    finally:
        torch.set_num_threads(threads)
    cb.write_result(args.out, "bench.json", result, format_table(result))
    return result


if __name__ == "__main__":
    main()
