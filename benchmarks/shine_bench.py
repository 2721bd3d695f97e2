"""SHINE (the Broyden forward's inverse estimate reused in the backward) against GMRES and
TorchDEQ's Broyden backward, at equal numbers of backward products.

    OMP_NUM_THREADS=1 python benchmarks/shine_bench.py [--quick] [--repeats N]
        [--problems rnn gru rnn-nonnormal] [--k 5 10 20] [--threads 1]
        [--out results/shine_bench]

On the problems of ``benchmarks/core_bench.py`` (float64; the exact implicit gradient from a
dense solve per batch row at a fully converged state), every rbp configuration runs the same
forward, ``rbp.Broyden()`` (memory 50) to a relative residual ``--tol`` (default 1e-8) in at most
``--steps`` evaluations of F, per sample (``batch_dim=0``, rows leave as they converge) or on the
whole batch as one system (``batch_dim=None``), and then one of these backwards:

* ``jfb``: ``z = g`` (no product; the K = 0 baseline);
* ``shine``: ``z = -H^T g`` from the forward's estimate alone (one product, for its true
  residual, which is its reported error);
* ``shine+gmres``: GMRES(K) right-preconditioned by ``-H^T`` (``SHINE(refine=K)``);
* ``shine-init+gmres``: GMRES(K) from ``z0 = -H^T g`` (``SHINE(refine=K, use="init")``);
* ``gmres``: GMRES(K) from zero (``GMRES(max_iter=K)``);
* ``torchdeq.broyden``: TorchDEQ's own Broyden forward (to the same ``--tol``, whole batch) and its
  Broyden backward from scratch with ``b_max_iter = K - 1`` (K products), when ``torchdeq`` is
  importable (skipped with a note otherwise).

Reported per configuration: ``rel_err_W`` / ``rel_err_x`` (``||grad - exact|| / ||exact||``),
``est`` (rbp's reported backward error estimate, ``info.backward[0].error_estimate``, with the
default ``max_backward_error=1e-2`` and ``on_failure="ignore"``: a row with ``est > 1e-2`` is one
rbp would have reported),
``n_vjp`` (reverse products through F in the backward, counted in an untimed run, the one for
the parameter gradients included), ``fwd_ms`` / ``bwd_ms`` (median wall time of the forward and
of ``loss.backward()`` over ``--repeats`` calls after one warm-up, configurations interleaved).
Writes ``OUT/bench.json`` and prints the table. ``--quick``: the tiny sizes, one repeat.
"""

from __future__ import annotations

import argparse
import importlib.util
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
import core_bench as cb  # noqa: E402 (the problems and the exact gradients)

import rbp  # noqa: E402

Tensor = torch.Tensor
KS = (5, 10, 20)


@dataclass
class Config:
    name: str
    mode: str  # per-sample | whole (rbp); whole (torchdeq)
    k: int
    make: Callable[[cb.Problem], Callable[[], tuple[Tensor, Any]]]
    fwd: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)


def _rbp(solver: Callable[[int], Any], per_sample: bool, steps: int, tol: float,
         k: int) -> Callable[[cb.Problem], Callable[[], tuple[Tensor, Any]]]:
    def make(p: cb.Problem) -> Callable[[], tuple[Tensor, Any]]:
        method = solver(k)
        method = method if isinstance(method, rbp.methods.Method) else rbp.Implicit(method)
        if not per_sample:
            def whole() -> tuple[Tensor, Any]:
                return rbp.fixed_point(p.f, p.h0, steps, method=method, solver=rbp.Broyden(),
                                       tol=tol, checks=rbp.Checks(on_failure="ignore"),
                                       return_info=True)
            return whole
        f, x = p.with_input()

        def forward() -> tuple[Tensor, Any]:
            return rbp.fixed_point(f, p.h0, steps, method=method, solver=rbp.Broyden(), tol=tol,
                                   batch_dim=0, inputs=(x,),
                                   checks=rbp.Checks(on_failure="ignore"), return_info=True)

        return forward

    return make


def _torchdeq(steps: int, tol: float, k: int) -> Callable[[cb.Problem],
                                                          Callable[[], tuple[Tensor, Any]]]:
    def make(p: cb.Problem) -> Callable[[], tuple[Tensor, Any]]:
        from torchdeq import get_deq

        deq = get_deq(core="sliced", ift=True, f_solver="broyden", f_max_iter=steps,
                      f_tol=tol, f_stop_mode="rel", b_solver="broyden", b_max_iter=k - 1,
                      b_tol=0.0)

        def forward() -> tuple[Tensor, Any]:
            z_out, info = deq(p.f, p.h0)
            return z_out[-1], None

        return forward

    return make


def configs(ks: list[int], steps: int, tol: float, torchdeq: bool) -> list[Config]:
    out = []
    for per_sample in (True, False):
        mode = "per-sample" if per_sample else "whole"
        out.append(Config("jfb", mode, 0, _rbp(lambda k: rbp.JFB(), per_sample, steps, tol, 0)))
        out.append(Config("shine", mode, 0,
                          _rbp(lambda k: rbp.linear.SHINE(), per_sample, steps, tol, 0)))
        for k in ks:
            out.append(Config("shine+gmres", mode, k, _rbp(
                lambda k: rbp.linear.SHINE(refine=k), per_sample, steps, tol, k)))
            out.append(Config("shine-init+gmres", mode, k, _rbp(
                lambda k: rbp.linear.SHINE(refine=k, use="init"), per_sample, steps, tol, k)))
            out.append(Config("gmres", mode, k, _rbp(
                lambda k: rbp.linear.GMRES(max_iter=k), per_sample, steps, tol, k)))
    if torchdeq:
        out += [Config("torchdeq.broyden", "whole", k, _torchdeq(steps, tol, k)) for k in ks]
    return out


def _timed(p: cb.Problem, forward: Callable[[], tuple[Tensor, Any]]) -> tuple[float, float, Any]:
    p.zero_grad()
    cb.synchronize(p.device)
    start = time.perf_counter()
    h, info = forward()
    loss = p.loss(h)
    cb.synchronize(p.device)
    mid = time.perf_counter()
    loss.backward()
    cb.synchronize(p.device)
    return mid - start, time.perf_counter() - mid, info


def _counted(p: cb.Problem, cfg: Config) -> tuple[int, dict[str, Any]]:
    """Reverse products through F in one backward, and what the untimed run measured."""
    base = p.step

    def counted(h: Tensor, *args: Tensor) -> Tensor:
        return base(cb._CountVJP.apply(h), *args)

    q = cb.Problem(p.name, p.description, counted, p.args, p.arg_names, p.h0, p.target,
                   p.weight_index, p.input_index)
    forward = cfg.make(q)
    q.zero_grad()
    h, info = forward()
    loss = q.loss(h)
    cb._CountVJP.calls = 0
    loss.backward()
    extra: dict[str, Any] = {}
    if info is not None:
        steps = info.forward_steps
        extra["forward_steps"] = max(steps) if isinstance(steps, list) else steps
        extra["est"] = info.backward[0].error_estimate
    return cb._CountVJP.calls, extra


def bench_problem(p: cb.Problem, exact: cb.Exact, cfgs: list[Config],
                  repeats: int) -> list[dict[str, Any]]:
    rows = []
    counts = {}
    for cfg in cfgs:
        counts[id(cfg)] = _counted(p, cfg)
        forward = cfg.make(p)
        _timed(p, forward)  # warm-up
        w, x = p.grads()
        rows.append({"problem": p.name, "method": cfg.name, "mode": cfg.mode, "K": cfg.k,
                     "rel_err_W": cb.relative_error(w, exact.grad_w),
                     "rel_err_x": cb.relative_error(x, exact.grad_x)})
    forwards = [cfg.make(p) for cfg in cfgs]
    for _ in range(repeats):  # interleaved, so that outside load falls on all alike
        for cfg, forward in zip(cfgs, forwards, strict=True):
            fwd, bwd, _ = _timed(p, forward)
            cfg.fwd.append(fwd)
            cfg.bwd.append(bwd)
    for row, cfg in zip(rows, cfgs, strict=True):
        n_vjp, extra = counts[id(cfg)]
        row.update(n_vjp=n_vjp, est=extra.get("est"), forward_steps=extra.get("forward_steps"),
                   fwd_ms=1e3 * statistics.median(cfg.fwd), bwd_ms=1e3 * statistics.median(cfg.bwd))
        cfg.fwd.clear()
        cfg.bwd.clear()
    return rows


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for name, problem in result["problems"].items():
        lines += ["", f"### {name}: {problem['description']} (rho(J) = {problem['rho']:.3f}, "
                  f"||J|| = {problem['norm']:.3f})", "",
                  "| method | batch | K | n_vjp | rel_err_W | rel_err_x | est | fwd_ms | bwd_ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            if r["problem"] != name:
                continue
            lines.append(
                f"| {r['method']} | {r['mode']} | {r['K']} | {r['n_vjp']} | "
                f"{r['rel_err_W']:.2e} | {r['rel_err_x']:.2e} | {_num(r['est'], '.2e')} | "
                f"{r['fwd_ms']:.1f} | {r['bwd_ms']:.2f} |")
    if result["skipped"]:
        lines += ["", *(f"skipped: {s}" for s in result["skipped"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--repeats", type=cb.int_at_least(1), default=None,
                        help="timed calls per config")
    parser.add_argument("--problems", nargs="+", default=["rnn", "gru", "rnn-nonnormal"],
                        choices=list(cb.SIZES["full"]),
                        help="rnn gru rnn-nonnormal (default: all)")
    parser.add_argument("--k", type=cb.int_at_least(1), nargs="+", default=list(KS),
                        help="backward budgets K (GMRES iterations)")
    parser.add_argument("--steps", type=cb.int_at_least(1), default=300,
                        help="most forward evaluations")
    parser.add_argument("--tol", type=cb.positive_float, default=1e-8,
                        help="forward relative tolerance")
    parser.add_argument("--threads", type=cb.int_at_least(1), default=1,
                        help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("results/shine_bench"))
    parser.add_argument("--device", default="cpu",
                        help="auto, cpu, cuda, cuda:N (default: cpu; float64 throughout)")
    args = parser.parse_args(argv)
    cb.refuse_repeats(parser, args, "problems", "k")
    device = cb.device_or_exit("shine_bench", args.device, ["float64"])
    cb.out_dir_or_exit("shine_bench", args.out)
    repeats = args.repeats or (1 if args.quick else 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        has_torchdeq = importlib.util.find_spec("torchdeq") is not None
        skipped = [] if has_torchdeq else ["torchdeq.broyden: torchdeq is not importable"]
        cfgs = configs(args.k, args.steps, args.tol, has_torchdeq)
        rows: list[dict[str, Any]] = []
        problems: dict[str, Any] = {}
        for p in cb.build_problems(args.quick, args.problems, 0):
            exact = cb.exact_gradients(p)  # on the CPU, float64; the problem then on device
            problems[p.name] = {"description": p.description, "rho": exact.rho,
                                "norm": exact.norm}
            p = p.on(torch.float64, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rbp.ConvergenceWarning)
                rows += bench_problem(p, exact, cfgs, repeats)
        result = {
            "settings": {"quick": args.quick, "repeats": repeats, "threads": args.threads,
                         "k": args.k, "steps": args.steps, "tol": args.tol,
                         "forward": "rbp.Broyden() (memory 50)", "dtype": "float64",
                         **cb.device_settings(device)},
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "torchdeq": _version("torchdeq")},
            "machine": {"processor": platform.processor() or platform.machine()},
            "problems": problems, "rows": rows, "skipped": skipped,
            "wall_time_s": time.perf_counter() - start,
            "command": " ".join(["python", "benchmarks/shine_bench.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
        }
    finally:
        torch.set_num_threads(threads)
    cb.write_result(args.out, "bench.json", result, format_table(result))
    return result


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


if __name__ == "__main__":
    main()
