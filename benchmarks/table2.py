"""Table 2 of the paper: run time and memory of one meta step, BPTT vs Neumann-RBP.

Hyperparameter optimisation through 1000 steps of SGD with momentum (``rbp hyperopt``'s inner
problem). Every configuration runs in its own subprocess, so peak memory is measured cleanly:

* ``rss_peak_mb``: peak resident set size of the process during the meta step minus its
  resident size just before (after loading the data and a small warm-up); the peak is reset
  through ``/proc/self/clear_refs`` (Linux), else ``ru_maxrss`` minus the baseline;
* ``saved_mb``: bytes of the distinct tensor storages autograd saves for backward during the
  meta step (``torch.autograd.graph.saved_tensors_hooks``); ``saved_extra_mb`` leaves out the
  training data itself (the full-batch last step saves a reference to it, no copy);
* on CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the meta step;
* ``time_s``: median wall time of ``--repeats`` meta steps after one warm-up step; the
  configurations of one table are timed round-robin in one process, so that load from other
  jobs on a shared machine falls on them alike.

Run ``python benchmarks/table2.py [--quick] [--out results/table2]``; it prints the ratio
table "BPTT cost / Neumann-RBP cost" and writes ``results.json``, ``table2.md`` and
``scaling.png`` (memory and time vs training steps T for BPTT, TBPTT(50), Neumann-RBP(50)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

MB = 1024.0**2
PAPER = {"time": {10: 3.02, 50: 2.87, 100: 2.68}, "memory": {10: 4.35, 50: 4.25, 100: 4.11},
         "bptt_time_s": 310.4, "bptt_memory_mb": 4061}
VARIANTS = {
    # name: (inner_grad, last_step)
    "release": ("manual", "full"),
    "autograd-inner-grad": ("autograd", "full"),
    "minibatch-last-step": ("manual", "minibatch"),
}


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc), so RSS growth reflects new allocations."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Held:
    """What a saved tensor is packed into: its lifetime is that of the saved variable."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor


class _SavedTracker:
    """Peak bytes of the distinct storages autograd holds for backward at any one time."""

    def __init__(self, data_ptrs: set[int]) -> None:
        self.data_ptrs = data_ptrs
        self.live: dict[int, list[int]] = {}
        self.current = self.current_extra = self.peak = self.peak_extra = 0

    def pack(self, tensor: Any) -> _Held:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, nbytes]
            self.current += nbytes
            if ptr not in self.data_ptrs:
                self.current_extra += nbytes
            self.peak = max(self.peak, self.current)
            self.peak_extra = max(self.peak_extra, self.current_extra)
        else:
            entry[0] += 1
        held = _Held(tensor)
        weakref.finalize(held, self._release, ptr)
        return held

    def unpack(self, held: _Held) -> Any:
        return held.tensor

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[ptr]
            self.current -= entry[1]
            if ptr not in self.data_ptrs:
                self.current_extra -= entry[1]


def timing_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Time several configurations in ONE process, interleaved round-robin, so that load from
    other jobs on a shared machine hits them alike; median over ``repeats`` rounds."""
    import torch

    from rbp.apps.hyperopt.experiment import load_problem, meta_step

    torch.set_num_threads(1)
    device = torch.device(spec["device"])
    problem = load_problem(spec["data_dir"], "t10k", spec["num_examples"],
                           [784, 50, 50, 50, 10], 200, spec["seed"])
    problem.x, problem.y = problem.x.to(device), problem.y.to(device)
    problem.y_onehot = problem.y_onehot.to(device)
    log_lr = torch.full((8,), -1.0, device=device, requires_grad=True)
    logit = torch.zeros(8, device=device, requires_grad=True)
    configs = spec["configs"]
    times: list[list[float]] = [[] for _ in configs]

    def one(c: dict[str, Any]) -> float:
        log_lr.grad, logit.grad = None, None
        start = time.perf_counter()
        meta_step(problem, log_lr, logit, c["steps"], c["truncate"], c["method"],
                  inner_grad=c["inner_grad"], last_step=c["last_step"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for c in configs:  # warm-up
        one(c)
    for _ in range(spec["repeats"]):
        for i, c in enumerate(configs):
            times[i].append(one(c))
    return [dict(c, times_s=t, time_s=statistics.median(t)) for c, t in zip(configs, times,
                                                                          strict=True)]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import torch

    from rbp.apps.hyperopt.experiment import Problem, load_problem, meta_step

    torch.set_num_threads(1)
    device = torch.device(spec["device"])
    problem = load_problem(spec["data_dir"], "t10k", spec["num_examples"],
                           [784, 50, 50, 50, 10], 200, spec["seed"])
    if device.type == "cuda":
        problem.x, problem.y = problem.x.to(device), problem.y.to(device)
        problem.y_onehot = problem.y_onehot.to(device)
    data_ptrs = {problem.x.untyped_storage().data_ptr(),
                 problem.y_onehot.untyped_storage().data_ptr()}
    n_tensors = 8
    log_lr = torch.full((n_tensors,), -1.0, device=device, requires_grad=True)
    logit = torch.zeros(n_tensors, device=device, requires_grad=True)
    kwargs = {"inner_grad": spec["inner_grad"], "last_step": spec["last_step"]}
    steps, truncate, method = spec["steps"], spec["truncate"], spec["method"]

    def one(**extra: Any) -> float:
        log_lr.grad, logit.grad = None, None
        loss, _ = meta_step(problem, log_lr, logit, steps, truncate, method, **kwargs, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    # warm-up on a 400-example copy (loads code paths without growing the heap), give freed
    # memory back to the OS, then a clean peak-memory measurement
    small = Problem(problem.x[:400].clone(), problem.y[:400].clone(),
                    problem.y_onehot[:400].clone(), problem.sizes, problem.batch_size,
                    problem.seed)
    meta_step(small, log_lr, logit, 2, 1, method if method != "tbptt" else "bptt", **kwargs)
    del small
    _malloc_trim()
    tracker = _SavedTracker(data_ptrs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    reset_ok = _reset_peak()
    base_rss_kb = _proc_status_kb("VmRSS") or 0
    base_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = one()
    if reset_ok:
        peak_kb = (_proc_status_kb("VmHWM") or 0) - base_rss_kb
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss_kb
    out: dict[str, Any] = dict(spec)
    out.update({
        "meta_loss": loss,
        "grad_log_lr": log_lr.grad.tolist(),
        "rss_peak_mb": peak_kb / 1024.0,
        "rss_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss delta",
        "saved_mb": tracker.peak / MB,
        "saved_extra_mb": tracker.peak_extra / MB,
    })
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / MB
    return out


class WorkerError(RuntimeError):
    """A measuring subprocess failed; the message is the last line of its stderr."""


def _measure(spec: dict[str, Any], flag: str = "--worker") -> Any:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise WorkerError(last)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The variants asked for; a bad option is a usage error before any work."""
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        p.error(f"--variants {args.variants!r} names no variant; choose from "
                f"{', '.join(VARIANTS)}")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return variants


def _check_data(p: argparse.ArgumentParser, data_dir: str | None) -> None:
    """The MNIST test split that every worker loads is there (one line if not)."""
    from rbp.data import DataError, load_mnist

    try:
        load_mnist(data_dir, "t10k")
    except DataError as exc:
        p.error(str(exc))


def _label(r: dict[str, Any]) -> str:
    k = "" if r["method"] == "bptt" else f"(K={r['truncate']})"
    return f"{r['method']}{k} T={r['steps']} [{r['variant']}]"


def _ratio_rows(rows: list[dict[str, Any]], variant: str, ks: list[int]) -> dict[str, Any]:
    bptt = next(r for r in rows if r["variant"] == variant and r["method"] == "bptt")
    out: dict[str, Any] = {"bptt_time_s": bptt["time_s"], "bptt_rss_peak_mb": bptt["rss_peak_mb"],
                           "bptt_saved_mb": bptt["saved_mb"], "per_truncation": {}}
    if "cuda_peak_mb" in bptt:
        out["bptt_cuda_peak_mb"] = bptt["cuda_peak_mb"]
    for k in ks:
        neu = next(r for r in rows if r["variant"] == variant and r["method"] == "neumann"
                   and r["truncate"] == k)
        entry = {
            "neumann_time_s": neu["time_s"],
            "time_ratio": bptt["time_s"] / neu["time_s"],
            "neumann_rss_peak_mb": neu["rss_peak_mb"],
            "rss_ratio": bptt["rss_peak_mb"] / max(neu["rss_peak_mb"], 1e-9),
            "neumann_saved_mb": neu["saved_mb"],
            "saved_ratio": bptt["saved_mb"] / max(neu["saved_mb"], 1e-9),
            "saved_extra_ratio": bptt["saved_extra_mb"] / max(neu["saved_extra_mb"], 1e-9),
        }
        if "cuda_peak_mb" in neu:
            entry["cuda_ratio"] = bptt["cuda_peak_mb"] / max(neu["cuda_peak_mb"], 1e-9)
        out["per_truncation"][str(k)] = entry
    return out


def _markdown(table: dict[str, Any], ks: list[int], steps: int) -> str:
    lines = [f"# Table 2: BPTT cost / Neumann-RBP cost, T = {steps} training steps", ""]
    head = "| variant | measure | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines += [head, "|" + "---|" * (len(ks) + 2)]
    paper_t = " | ".join(f"×{PAPER['time'][k]:.2f}" if k in PAPER["time"] else "-" for k in ks)
    paper_m = " | ".join(f"×{PAPER['memory'][k]:.2f}" if k in PAPER["memory"] else "-"
                         for k in ks)
    lines.append(f"| paper (GPU) | run time | {paper_t} |")
    lines.append(f"| paper (GPU) | memory | {paper_m} |")
    for variant, res in table.items():
        per = res["per_truncation"]
        for name, key in (("run time", "time_ratio"), ("peak RSS", "rss_ratio"),
                          ("saved for backward", "saved_ratio"),
                          ("saved, excl. data", "saved_extra_ratio"),
                          ("CUDA peak", "cuda_ratio")):
            if key not in per[str(ks[0])]:
                continue
            vals = " | ".join(f"×{per[str(k)][key]:.2f}" for k in ks)
            lines.append(f"| {variant} | {name} | {vals} |")
    lines.append("")
    for variant, res in table.items():
        lines.append(f"- {variant}: BPTT {res['bptt_time_s']:.2f} s, peak RSS "
                     f"{res['bptt_rss_peak_mb']:.0f} MB, saved {res['bptt_saved_mb']:.0f} MB "
                     f"per meta step (paper: {PAPER['bptt_time_s']} s, "
                     f"{PAPER['bptt_memory_mb']} MB on their GPU)")
    return "\n".join(lines) + "\n"


def _scaling_plot(rows: list[dict[str, Any]], path: Path) -> None:
    from rbp.runner import multi_panel

    series_mem: dict[str, tuple[list[float], list[float]]] = {}
    series_time: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["steps"]):
        name = r["method"] if r["method"] == "bptt" else f"{r['method']}"
        for series, key in ((series_mem, "rss_peak_mb"), (series_time, "time_s")):
            xs, ys = series.setdefault(name, ([], []))
            xs.append(r["steps"])
            ys.append(r[key])
    multi_panel(path, [
        {"series": series_mem, "title": "peak RSS of one meta step (K=50)",
         "xlabel": "training steps T", "ylabel": "MB", "logy": True},
        {"series": series_time, "title": "time of one meta step (K=50)",
         "xlabel": "training steps T", "ylabel": "s", "logy": True},
    ], ncols=2)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration in its own subprocess; print and save the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--out", default="results/table2",
                   help="folder for results.json, table2.md, scaling.png")
    p.add_argument("--data-dir", default=None,
                   help="MNIST IDX directory (default: ../shared/data/mnist if present, "
                        "else the embedded digits)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed meta steps per configuration (default 3; --quick 1)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-scaling", action="store_true", help="skip the T-scaling runs")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.timing_worker is not None:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return 0

    from rbp.runner.device import resolve_device

    variants = _check_options(p, args)
    try:
        device = str(resolve_device(args.device))
    except ValueError as exc:
        p.error(str(exc))
    data_dir = args.data_dir
    if data_dir is None:
        local = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
        data_dir = str(local) if local.is_dir() else None
    _check_data(p, data_dir)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import core_bench  # the --out check (not in the workers, whose memory is measured)

    out = core_bench.out_dir_or_exit("table2", Path(args.out))
    try:
        return _run(args, device, data_dir, variants, out)
    except WorkerError as exc:
        print(f"table2: error: a measurement failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, device: str, data_dir: str | None, variants: list[str],
         out: Path) -> int:
    """Measure every configuration, then write and print the tables."""
    quick = args.quick
    steps = 40 if quick else 1000
    ks = [5, 10] if quick else [10, 50, 100]
    scaling_t = [10, 20, 40] if quick else [100, 250, 500, 1000, 2000]
    scaling_k = 5 if quick else 50
    repeats = args.repeats or (1 if quick else 3)
    base = {"data_dir": data_dir, "num_examples": 1000 if quick else 10000, "seed": 0,
            "repeats": repeats, "device": device}

    def run_group(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Memory: one subprocess per configuration; time: one interleaved subprocess."""
        timed = _measure(dict(base, configs=specs), "--timing-worker")
        rows = []
        for spec, t in zip(specs, timed, strict=True):
            r = _measure(dict(base, **spec))
            r.update(times_s=t["times_s"], time_s=t["time_s"])
            rows.append(r)
            print(f"{_label(r):55s} {r['time_s']:7.2f} s  RSS {r['rss_peak_mb']:8.1f} MB  "
                  f"saved {r['saved_mb']:8.1f} MB", flush=True)
        return rows

    rows: list[dict[str, Any]] = []
    for variant in variants:
        inner_grad, last_step = VARIANTS[variant]
        todo = [("bptt", ks[-1])] + [("neumann", k) for k in ks]
        rows += run_group([dict(variant=variant, inner_grad=inner_grad, last_step=last_step,
                                method=method, steps=steps, truncate=k) for method, k in todo])
    table = {v: _ratio_rows(rows, v, ks) for v in variants}

    scaling: list[dict[str, Any]] = []
    if not args.no_scaling:
        scaling = run_group([
            dict(variant="release", inner_grad="manual", last_step="full", method=method,
                 steps=t, truncate=min(scaling_k, t))
            for t in scaling_t for method in ("bptt", "tbptt", "neumann")])

    import torch

    from rbp.runner import machine_info, write_json

    doc = {"quick": quick, "steps": steps, "truncations": ks, "paper": PAPER,
           "ratios": table, "measurements": rows, "scaling": scaling,
           "torch_threads": 1, "torch_version": torch.__version__, "machine": machine_info(),
           "note": "each configuration ran in its own subprocess, single-threaded; the "
                   "machine was shared with other jobs, so absolute times are noisy"}
    write_json(out / "results.json", doc)
    md = _markdown(table, ks, steps)
    (out / "table2.md").write_text(md)
    print()
    print(md)
    if scaling:
        _scaling_plot(scaling, out / "scaling.png")
        print("scaling (K=50):")
        for r in scaling:
            print(f"  {_label(r):55s} {r['time_s']:7.2f} s  RSS {r['rss_peak_mb']:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
