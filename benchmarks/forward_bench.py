"""Forward solves to a tolerance: rbp's solvers against TorchDEQ 0.1.0's, and per-sample stopping.

For each problem (the core benchmark's tanh RNN, GRU and non-normal RNN, a slow affine map with
spectral radius 0.98, and a convolutional DEQ cell ``tanh(conv(tanh(conv(h))) + inject(x))``
with 64 channels on 16x16 images whose evaluations dominate and which contracts at ~0.95 per
step), in float32 and float64, and each relative tolerance (1e-4, 1e-6), every solver runs
the forward (no graph) until each sample's residual ``||F(h) - h|| / ||F(h)||`` is below the
tolerance, and reports:

* ``evals``: evaluations of F in the solve, counted alike on both sides: the initial ``F(h0)``
  and one per iteration up to the one that met the tolerance (rbp: its slowest sample's);
* ``calls``: all batch calls of F (rbp's also include its 2-sample independence check);
* ``row_updates``: samples pushed through F in all (rbp drops converged samples; TorchDEQ
  evaluates the whole batch until the slowest sample has converged);
* ``time_ms``: median wall time of ``--repeats`` forwards, solvers timed round-robin;
* ``max_rel_res``: the largest per-sample relative residual of the returned state, measured
  afterwards with one more evaluation of F, the same way for every solver (``ok`` if <= tol);
* ``below_floor``: the tolerance is below the problem's round-off floor in that dtype (the
  relative residual that plain steps taken from the float64 fixed point settle at, JSON
  ``round_off_floor``): there any solver meets it, or not, by chance, and the row compares
  nothing.

rbp runs with ``batch_dim=0`` (per-sample stopping); TorchDEQ stops on the batch maximum of the
same relative residual. ``ratio`` columns divide by rbp's plain iteration in the same run.
A second table runs Broyden at rbp's default memory of 50 rank-one terms on every problem:
rbp's default (good Broyden over the last 25 secant pairs when the memory fills), rbp restarting
from ``-I``, rbp with a memory that never fills, and TorchDEQ with ``LBFGS_thres=50`` (within
``MEMORY_BUDGET`` iterations), evaluations only. A third takes a batch whose samples contract at
rates 0.1 ... 0.95 and reports row updates with per-sample stopping against batch-maximum
stopping.

Run ``python benchmarks/forward_bench.py [--quick] [--repeats N] [--device NAME] [--out DIR]``;
writes ``DIR/bench.json`` (default ``results/forward_bench``) and prints the tables.

``--device`` (auto, cpu, cuda, cuda:N, mps; default cpu) is where every problem and solver
runs: the problems are built on the CPU from the same seeds as always and then moved; on a GPU
the clock is read after ``torch.cuda.synchronize``. ``settings.device`` (and ``settings.gpu``)
in the JSON name it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import rbp
from rbp.runner.device import resolve_device

Tensor = torch.Tensor
sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_bench  # noqa: E402  (the core benchmark's dynamics)

CPU = torch.device("cpu")

MAX_ITERS = 3000


@dataclass
class Problem:
    """``F(h, *inputs)``, row-independent, with per-sample ``inputs`` (sliced by rbp)."""

    name: str
    f: Callable[..., Tensor]
    h0: Tensor
    inputs: tuple[Tensor, ...]

    def closed(self) -> Callable[[Tensor], Tensor]:
        return lambda h: self.f(h, *self.inputs)


def _from_core(p: core_bench.Problem, dtype: torch.dtype, device: torch.device = CPU) -> Problem:
    args = [a.detach().to(device=device, dtype=dtype) for a in p.args]
    xi = p.input_index
    x = args[xi]

    def f(h: Tensor, x_rows: Tensor) -> Tensor:
        full = list(args)
        full[xi] = x_rows
        return p.step(h, *full)

    return Problem(p.name, f, p.h0.to(device=device, dtype=dtype), (x,))


def slow_affine(batch: int, n: int, dtype: torch.dtype, seed: int = 3,
                device: torch.device = CPU) -> Problem:
    """``h W^T + x`` with W symmetric, eigenvalues in [-0.5, 0.98]: plain iteration is slow."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    w = (q @ torch.diag(torch.linspace(-0.5, 0.98, n, dtype=torch.float64)) @ q.T).to(
        device=device, dtype=dtype)
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return Problem("slow", lambda h, x: h @ w.T + x,
                   torch.zeros(batch, n, dtype=dtype, device=device), (x,))


CONV_SCALE = 1.8  # with 64 channels plain iteration then contracts at ~0.95 per step (measured)


def conv_deq(batch: int, channels: int, size: int, dtype: torch.dtype, seed: int = 5,
             scale: float = CONV_SCALE, device: torch.device = CPU) -> Problem:
    """``tanh(conv2(tanh(conv1(h))) + inject(x))``, two 3x3 convs over ``channels`` channels.

    Each conv's weight, reshaped to ``(channels, 9 channels)``, is scaled to spectral norm
    ``scale``; at 1.8 (64 channels) plain iteration contracts at ~0.95 per step, the slow regime
    of DEQ cells (0.9-0.97); the rate is measured and reported (``plain_rate``). Weights and
    the injection ``inject(x)`` are computed on the CPU, then moved to ``device``.
    """
    torch.manual_seed(seed)
    c1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype)
    c2 = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
    inject = torch.nn.Conv2d(3, channels, 3, padding=1).to(dtype)
    with torch.no_grad():
        for conv in (c1, c2):
            w = conv.weight
            w.mul_(scale / torch.linalg.matrix_norm(w.reshape(channels, -1), 2))
    for m in (c1, c2, inject):
        m.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)
    u = inject(x).to(device)
    c1, c2 = c1.to(device), c2.to(device)

    def f(h: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(c2(torch.tanh(c1(h))) + u)

    return Problem("conv-deq", f,
                   torch.zeros(batch, channels, size, size, dtype=dtype, device=device), (u,))


def problems(dtype: torch.dtype, quick: bool, device: torch.device = CPU) -> list[Problem]:
    b = 8 if quick else 16
    hidden = 32 if quick else 64
    out = [
        _from_core(core_bench.make_rnn(hidden, b, 16, 0), dtype, device),
        _from_core(core_bench.make_gru(hidden, b, 16, 1), dtype, device),
        _from_core(core_bench.make_rnn(hidden, b, 16, 2, nonnormal=True), dtype, device),
        slow_affine(b, hidden, dtype, device=device),
        conv_deq(4 if quick else 8, 64, 8 if quick else 16, dtype, device=device),
    ]
    return out


# ------------------------------------------------------------------------------ solvers


class Counter:
    """Wraps F to count batch calls and samples pushed through it."""

    def __init__(self, f: Callable[..., Tensor]) -> None:
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, h: Tensor, *args: Tensor) -> Tensor:
        self.calls += 1
        self.rows += h.shape[0]
        return self.f(h, *args)


Runner = Callable[[Problem, float, Counter], tuple[Tensor, int]]


def run_rbp(solver: Any, batch_dim: int | None) -> Runner:
    """rbp's forward; also returns the slowest sample's evaluations of F in the solve (the
    initial ``F(h0)`` included, the 2-sample independence check not)."""

    def run(p: Problem, tol: float, counter: Counter) -> tuple[Tensor, int]:
        h, info = rbp.fixed_point(
            counter, p.h0, MAX_ITERS, tol=tol, solver=solver, batch_dim=batch_dim, inputs=p.inputs,
            checks=rbp.Checks(on_failure="ignore", settle_tol=None), return_info=True,
        )
        steps = info.forward_steps
        return h, max(steps) if isinstance(steps, list) else steps

    return run


def run_torchdeq(name: str, max_iter: int = MAX_ITERS, **options: Any) -> Runner:
    """TorchDEQ's solver; every call of F is a solve evaluation (the initial ``F(h0)`` too)."""

    def run(p: Problem, tol: float, counter: Counter) -> tuple[Tensor, int]:
        from torchdeq.solver import get_solver

        solve = get_solver(name)
        start = counter.calls
        out, _, _ = solve(lambda h: counter(h, *p.inputs), p.h0, max_iter=max_iter, tol=tol,
                          stop_mode="rel", **options)
        return out, counter.calls - start

    return run


SOLVERS: dict[str, Runner] = {
    "rbp iterate": run_rbp("iterate", 0),
    "rbp anderson": run_rbp("anderson", 0),
    "rbp broyden": run_rbp("broyden", 0),
    "rbp anderson m=25": run_rbp(rbp.Anderson(m=25), 0),
    "torchdeq fixed_point_iter": run_torchdeq("fixed_point_iter"),
    "torchdeq anderson": run_torchdeq("anderson"),
    "torchdeq broyden": run_torchdeq("broyden"),
}


def plain_residuals(p: Problem, h: Tensor, steps: int, stop: float | None = None,
                    window: int = 0) -> list[float]:
    """The batch-maximum relative residual ``max ||F(h) - h|| / ||F(h)||`` at ``h`` and then
    after each plain step ``h <- F(h)``, ``steps`` values in all (fewer once one is below
    ``stop`` and more than ``window`` are taken)."""
    res: list[float] = []
    with torch.no_grad():
        for _ in range(steps):
            fh = p.f(h, *p.inputs)
            diff = (fh - h).reshape(h.shape[0], -1).norm(dim=1)
            res.append((diff / fh.reshape(h.shape[0], -1).norm(dim=1).clamp_min(1e-30)).max()
                       .item())
            h = fh
            if stop is not None and res[-1] < stop and len(res) > window:
                break
    return res


def max_relative_residual(p: Problem, h: Tensor) -> float:
    return plain_residuals(p, h, 1)[0]


def bench(p: Problem, tol: float, names: list[str], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        counter = Counter(p.f)
        with torch.no_grad():
            h, evals = SOLVERS[name](p, tol, counter)
        res = max_relative_residual(p, h)
        rows.append({"problem": p.name, "dtype": str(p.h0.dtype).replace("torch.", ""),
                     "tol": tol, "solver": name, "evals": evals, "calls": counter.calls,
                     "row_updates": counter.rows, "max_rel_res": res, "ok": res <= tol,
                     "times": []})
    device = p.h0.device
    for _ in range(repeats):  # round-robin so that load falls on every solver alike
        for row in rows:
            counter = Counter(p.f)
            core_bench.synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                SOLVERS[row["solver"]](p, tol, counter)
            core_bench.synchronize(device)  # a GPU's queued work belongs to this solve
            row["times"].append(time.perf_counter() - start)
    for row in rows:
        row["time_ms"] = 1e3 * statistics.median(row.pop("times"))
    base = next(r for r in rows if r["solver"] == "rbp iterate")
    for row in rows:
        row["evals_ratio"] = row["evals"] / base["evals"]
        row["time_ratio"] = row["time_ms"] / base["time_ms"]
    return rows


def plain_rate(p: Problem, window: int = 20, stop: float = 1e-8) -> float:
    """Plain iteration's contraction per step, ``(r_k / r_{k-window})^(1/window)`` where the
    batch-maximum relative residual ``r_k`` first falls below ``stop`` (or at ``MAX_ITERS``)."""
    res = plain_residuals(p, p.h0, MAX_ITERS, stop, window)
    if len(res) <= window or res[-1 - window] == 0.0:
        return float("nan")
    return (res[-1] / res[-1 - window]) ** (1.0 / window)


def round_off_floor(p: Problem, twin: Problem, steps: int = 20) -> float:
    """How low a relative residual ``p``'s own round-off lets any solver certify: the fixed point
    of ``twin`` (the same problem in float64, solved to 1e-13) cast to ``p``'s dtype, then
    ``steps`` plain steps of ``p``; the median over them of the batch-maximum relative residual.
    A tolerance below it is met, or not, by chance."""
    with torch.no_grad():
        h, _ = rbp.fixed_point(
            twin.f, twin.h0, MAX_ITERS, tol=1e-13, solver="broyden", batch_dim=0,
            inputs=twin.inputs, checks=rbp.Checks(on_failure="ignore", settle_tol=None),
            return_info=True,
        )
    return statistics.median(plain_residuals(p, h.to(p.h0.dtype), steps))


MEMORY_BUDGET = 500  # iterations for the fixed-memory comparison (TorchDEQ's can diverge)


def broyden_memory_rows(rows: list[dict[str, Any]], probs: dict[tuple[str, str], Problem],
                        ) -> list[dict[str, Any]]:
    """Broyden at rbp's default memory (50 rank-one terms) side by side, one untimed run each:

    * ``evals``: rbp's default (at a full memory, good Broyden over the last 25 pairs);
    * ``evals_restart``: ``rbp.Broyden(replay=1)``, the restart from ``-I`` (the newest pair only);
    * ``evals_no_restart``: rbp with a memory that never fills (the unbounded reference);
    * ``torchdeq_50``: TorchDEQ's Broyden with ``LBFGS_thres=50`` (at a full memory it overwrites
      the oldest term), within ``MEMORY_BUDGET`` iterations; ``torchdeq_50_ok`` whether its
      returned state meets the tolerance.
    """
    have_deq = importlib.util.find_spec("torchdeq") is not None
    out = []
    default = rbp.Broyden().memory
    for r in rows:
        if r["solver"] != "rbp broyden":
            continue
        p = probs[(r["problem"], r["dtype"])]
        row = {"problem": r["problem"], "dtype": r["dtype"], "tol": r["tol"], "memory": default,
               "evals": r["evals"], "ok": r["ok"]}
        for key, solver in (("evals_restart", rbp.Broyden(replay=1)),
                            ("evals_no_restart", rbp.Broyden(memory=max(default, r["evals"] + 1)))):
            if r["evals"] <= default:  # the memory never filled: the same solve
                row[key] = r["evals"]
                continue
            with torch.no_grad():
                _, row[key] = run_rbp(solver, 0)(p, r["tol"], Counter(p.f))
        if have_deq:
            counter = Counter(p.f)
            with torch.no_grad():
                h, evals = run_torchdeq("broyden", LBFGS_thres=default,
                                        max_iter=MEMORY_BUDGET)(p, r["tol"], counter)
            res = max_relative_residual(p, h)
            row["torchdeq_50"], row["torchdeq_50_ok"] = evals, bool(res <= r["tol"])
        out.append(row)
    return out


def per_sample_table(dtype: torch.dtype, quick: bool,
                     device: torch.device = CPU) -> list[dict[str, Any]]:
    """A batch whose samples contract at 0.1 ... 0.95: per-sample vs batch-maximum stopping."""
    batch, n = (8, 32) if quick else (32, 64)
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    w = q.to(device=device, dtype=dtype)
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    s = torch.linspace(0.1, 0.95, batch, dtype=torch.float64)[:, None].to(device=device,
                                                                          dtype=dtype)
    p = Problem("rates 0.1..0.95", lambda h, x, s: torch.tanh(s * (h @ w.T) + x),
                torch.zeros(batch, n, dtype=dtype, device=device), (x, s))
    out = []
    for tol in (1e-4, 1e-6):
        for label, runner in (
            ("rbp iterate, batch_dim=0", run_rbp("iterate", 0)),
            ("rbp iterate, batch_dim=None", run_rbp("iterate", None)),
            ("rbp anderson, batch_dim=0", run_rbp("anderson", 0)),
            ("torchdeq fixed_point_iter", run_torchdeq("fixed_point_iter")),
            ("torchdeq anderson", run_torchdeq("anderson")),
        ):
            if label.startswith("torchdeq") and importlib.util.find_spec("torchdeq") is None:
                continue
            counter = Counter(p.f)
            with torch.no_grad():
                h, evals = runner(p, tol, counter)
            out.append({"dtype": str(dtype).replace("torch.", ""), "tol": tol, "solver": label,
                        "evals": evals, "calls": counter.calls, "row_updates": counter.rows,
                        "max_rel_res": max_relative_residual(p, h)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 1 repeat (unless --repeats is given)")
    parser.add_argument("--repeats", type=core_bench.int_at_least(1), default=None,
                        help="timed solves per setting (default 5; --quick 1)")
    parser.add_argument("--out", default="results/forward_bench")
    parser.add_argument("--device", default="cpu",
                        help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if device.type == "mps":
            raise ValueError("device 'mps' has no float64, which every problem here also "
                             "runs in (and the round-off floors need); use cpu or cuda")
    except ValueError as exc:  # ConfigError: no such device here; no float64 on it
        print(f"forward_bench: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = core_bench.out_dir_or_exit("forward_bench", Path(args.out))
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(1)
    have_deq = importlib.util.find_spec("torchdeq") is not None
    names = [n for n in SOLVERS if have_deq or not n.startswith("torchdeq")]
    rows: list[dict[str, Any]] = []
    probs: dict[tuple[str, str], Problem] = {}
    rates: dict[str, float] = {}
    floors: dict[str, float] = {}
    by_dtype = {dtype: problems(dtype, args.quick, device)
                for dtype in (torch.float32, torch.float64)}
    twins = {p.name: p for p in by_dtype[torch.float64]}  # the float64 problems
    for dtype, probs_of_dtype in by_dtype.items():
        for p in probs_of_dtype:
            dname = str(dtype).replace("torch.", "")
            probs[(p.name, dname)] = p
            if dtype == torch.float64:
                rates[p.name] = plain_rate(p)
            floor = floors[f"{p.name}/{dname}"] = round_off_floor(p, twins[p.name])
            for tol in (1e-4, 1e-6):
                for row in bench(p, tol, names, repeats):
                    row["below_floor"] = tol < floor
                    rows.append(row)
    per_sample = [r for d in (torch.float32, torch.float64)
                  for r in per_sample_table(d, args.quick, device)]
    result = {
        "command": "python benchmarks/forward_bench.py"
                   + (" --quick" if args.quick else "")
                   + ("" if args.quick and args.repeats is None else f" --repeats {repeats}")
                   + ("" if args.device == "cpu" else f" --device {args.device}"),
        "settings": core_bench.device_settings(device),
        "torch": torch.__version__,
        "torchdeq": _version("torchdeq") if have_deq else None,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "max_iters": MAX_ITERS,
        "plain_rate": rates,
        "round_off_floor": floors,
        "rows": rows,
        "broyden_memory": broyden_memory_rows(rows, probs),
        "per_sample": per_sample,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(core_bench.device_line({**result["settings"], "threads": result["threads"]},
                                 cpu_clock=False))  # its times are wall times anyway
    print()
    print(format_tables(result))
    print()
    print(format_summary(result))
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def format_summary(result: dict[str, Any]) -> str:
    """The README table: ``iterations / wall ms`` per solver, one row per problem, dtype, tol."""
    solvers = list(dict.fromkeys(r["solver"] for r in result["rows"]))
    short = [s.replace("torchdeq ", "TorchDEQ ").replace("fixed_point_iter", "iterate")
             for s in solvers]
    lines = ["| problem | dtype | tol | " + " | ".join(short) + " |",
             "|---|---|---|" + "---|" * len(solvers)]
    keys = list(dict.fromkeys((r["problem"], r["dtype"], r["tol"]) for r in result["rows"]))
    for key in keys:
        cells = []
        below = ""  # the floor belongs to the problem, dtype and tol: every solver's row agrees
        for name in solvers:
            r = next(r for r in result["rows"]
                     if (r["problem"], r["dtype"], r["tol"]) == key and r["solver"] == name)
            cells.append(f"{r['evals']} / {r['time_ms']:.1f}" + ("" if r["ok"] else " *"))
            below = " (below floor)" if r["below_floor"] else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g}{below} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_memory(result: dict[str, Any]) -> str:
    """Broyden with 50 terms: rbp (replay), rbp (restart from -I), unbounded, TorchDEQ (ring)."""
    lines = ["| Broyden, memory 50 | dtype | tol | rbp (replay 25) | rbp (restart from -I) "
             "| rbp (memory never fills) | TorchDEQ LBFGS_thres=50 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["broyden_memory"]:
        deq = r.get("torchdeq_50")
        cell = "-" if deq is None else f"{deq}" + ("" if r["torchdeq_50_ok"] else " (not reached)")
        lines.append(f"| {r['problem']} | {r['dtype']} | {r['tol']:g} | {r['evals']}"
                     f"{'' if r['ok'] else ' *'} | {r['evals_restart']} | "
                     f"{r['evals_no_restart']} | {cell} |")
    return "\n".join(lines)


def format_tables(result: dict[str, Any]) -> str:
    lines = ["| problem | dtype | tol | solver | evals | calls | row updates | time ms "
             "| evals / plain | time / plain | max rel res |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flag = ("" if r["ok"] else " (not reached)") + (" (below floor)" if r["below_floor"]
                                                         else "")
        lines.append(
            f"| {r['problem']} | {r['dtype']} | {r['tol']:g} | {r['solver']} | {r['evals']} | "
            f"{r['calls']} | {r['row_updates']} | {r['time_ms']:.1f} | {r['evals_ratio']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['max_rel_res']:.1e}{flag} |"
        )
    lines += ["", "plain iteration's contraction per step (float64): " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["plain_rate"].items())]
    lines += ["", "round-off floor (relative residual of plain steps from the float64 fixed "
              "point, median of 20): " + ", ".join(
                  f"{k} {v:.1e}" for k, v in result["round_off_floor"].items())]
    if result["broyden_memory"]:
        lines += ["", format_memory(result)]
    lines += ["", "| batch (rates 0.1..0.95) | tol | solver | evals | calls | row updates "
              "| max rel res |", "|---|---|---|---|---|---|---|"]
    for r in result["per_sample"]:
        lines.append(f"| {r['dtype']} | {r['tol']:g} | {r['solver']} | {r['evals']} | "
                     f"{r['calls']} | {r['row_updates']} | {r['max_rel_res']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
