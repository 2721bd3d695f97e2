"""``rbp sweep``: a grid of independent runs of one experiment, locally or on a Ray cluster.

A sweep is the Cartesian product of the ``grid`` values; each point is one ordinary run,
``rbp <experiment> <point's flags> --out <sweep_out>/<point-name>``, executed in its own Python
subprocess (so a crash, a kill or an out-of-memory of one point loses nothing of the others).
Grid and ``fixed`` keys map to command-line flags:

* ``method`` -> ``--method`` (a list becomes ``a,b``); ``seed`` -> ``--seed``;
* ``--some-flag`` -> ``--some-flag VALUE`` (``true``: the bare flag; ``false``/``null``: omitted);
* any other key is a setting -> ``--set key=VALUE`` (VALUE written as YAML).

Re-running a sweep skips the points whose ``results.json`` says ``finished``, resumes (with
``--resume``) those with checkpoints, and starts the others afresh. ``<sweep_out>/sweep.json``
records every point (values, status, path, wall time, error); :func:`aggregate` merges the points'
results for an experiment's own table code.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import importlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from rbp.runner.cli import interrupt_on_sigterm
from rbp.runner.config import ConfigError, parse_override
from rbp.runner.progress import get_logger, progress, setup_logging
from rbp.runner.results import CHECKPOINT_DIR, RESULTS_FILE, read_json, write_json

__all__ = [
    "SWEEP_FILE",
    "Point",
    "SweepSpec",
    "add_arguments",
    "aggregate",
    "expand_grid",
    "load_spec",
    "main",
    "point_name",
    "register_summary",
    "run_sweep",
    "runs_matching",
    "summarize",
    "write_merged_run",
]

#: Summary file written at the top of a sweep directory.
SWEEP_FILE = "sweep.json"
#: Log of each point's subprocess (stdout and stderr), inside the point's run directory.
POINT_LOG = "run.log"
#: Grid keys that name methods; :func:`aggregate` merges the ``methods`` entries across them.
METHOD_KEYS = ("method", "methods")

_SPEC_KEYS = {"experiment", "grid", "points", "fixed", "out", "quick", "args", "workers",
              "backend", "address", "cpus_per_run", "imports"}
_SUMMARIES: dict[str, Callable[[dict[str, Any], Path], Any]] = {}

log = get_logger("sweep")


# ---------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """What to run: ``experiment`` over the product of ``grid`` (times the explicit value sets
    in ``points``, for grids that are not a full product) with ``fixed`` settings."""

    experiment: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    quick: bool = False
    args: list[str] = field(default_factory=list)  # extra flags passed verbatim to every run
    workers: int = 1
    backend: str = "local"
    address: str | None = None
    cpus_per_run: float = 1.0
    imports: list[str] = field(default_factory=list)  # modules that register extra experiments

    @property
    def out_dir(self) -> Path:
        """The sweep directory (default ``runs/sweeps/<experiment>``)."""
        return Path(self.out) if self.out is not None else Path("runs/sweeps") / self.experiment


@dataclass
class Point:
    """One grid point: its ``values``, directory ``name`` and the run's flags ``argv``."""

    name: str
    values: dict[str, Any]
    argv: list[str]


def load_spec(path: Path) -> SweepSpec:
    """Read a sweep spec YAML file (keys: experiment, grid, points, fixed, out, quick, args,
    workers, backend, address, cpus_per_run, imports). A relative ``out`` is taken from the
    current directory, like ``--out`` of any run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse sweep spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {path} must be a mapping")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in sweep spec {path} "
                          f"(valid: {', '.join(sorted(_SPEC_KEYS))})")
    if "experiment" not in data:
        raise ConfigError(f"sweep spec {path} needs 'experiment:'")
    grid = data.get("grid") or {}
    fixed = data.get("fixed") or {}
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise ConfigError(f"'grid:' and 'fixed:' in {path} must be mappings")
    args = data.get("args") or []
    imports = data.get("imports") or []
    extra = data.get("points") or []
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"'points:' in {path} must be a list of mappings")
    if isinstance(args, str) or isinstance(imports, str):
        raise ConfigError(f"'args:' and 'imports:' in {path} must be lists")
    spec = SweepSpec(
        experiment=str(data["experiment"]),
        grid={str(k): _as_list(v) for k, v in grid.items()},
        points=[{str(k): v for k, v in e.items()} for e in extra],
        fixed={str(k): v for k, v in fixed.items()},
        out=Path(data["out"]) if data.get("out") is not None else None,
        quick=bool(data.get("quick", False)),
        args=[str(a) for a in args],
        workers=int(data.get("workers", 1)),
        backend=str(data.get("backend", "local")),
        address=data.get("address"),
        cpus_per_run=float(data.get("cpus_per_run", 1.0)),
        imports=[str(m) for m in imports],
    )
    _check_spec(spec)
    return spec


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_spec(spec: SweepSpec) -> None:
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"grid key '{key}' has no values")
    point_keys = {k for e in spec.points for k in e}
    both = sorted((set(spec.grid) | point_keys) & set(spec.fixed))
    if both:
        raise ConfigError(f"key(s) {both} are both in the grid and fixed")
    both = sorted(set(spec.grid) & point_keys)
    if both:
        raise ConfigError(f"key(s) {both} are both in the grid and in points")
    if spec.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {spec.workers}")
    if spec.backend not in ("local", "ray"):
        raise ConfigError(f"backend must be 'local' or 'ray', got '{spec.backend}'")


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``--grid key=a,b,c`` -> ``(key, [a, b, c])`` with each value parsed as YAML
    (``--grid lr=[0.1,0.01]`` is a YAML list as well)."""
    key, value = parse_override(text)
    if isinstance(value, list):
        return key, value
    raw = text.partition("=")[2]
    return key, [yaml.safe_load(p) for p in raw.split(",") if p.strip()]


def _yaml_scalar(value: Any) -> str:
    """``value`` written so that YAML reads it back unchanged (JSON is valid YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "," not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _flags(key: str, value: Any) -> list[str]:
    if key in ("method", "--method"):
        names = value if isinstance(value, (list, tuple)) else [value]
        return ["--method", ",".join(str(n) for n in names)]
    if key in ("seed", "--seed"):
        return ["--seed", str(value)]
    if key == "quick":
        return ["--quick"] if value else []
    if key.startswith("--"):
        if value is True:
            return [key]
        if value is False or value is None:
            return []
        return [key, str(value)]
    return ["--set", f"{key}={_yaml_scalar(value)}"]


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = "+".join(_name_part(v) for v in value)
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "_" for c in text) or "_"


def point_name(values: Mapping[str, Any]) -> str:
    """Directory name of a grid point, e.g. ``method-rbp__seed-0``."""
    if not values:
        return "run"
    return "__".join(f"{_name_part(k.lstrip('-'))}-{_name_part(v)}" for k, v in values.items())


def expand_grid(spec: SweepSpec) -> list[Point]:
    """The points of ``spec``: the product of the grid values (last key varying fastest), each
    combined with every entry of ``spec.points`` (when there are any)."""
    keys = list(spec.grid)
    base: list[str] = []
    for key, value in spec.fixed.items():
        base += _flags(key, value)
    if spec.quick:
        base.append("--quick")
    base += spec.args
    points: list[Point] = []
    seen: dict[str, int] = {}
    combos = itertools.product(itertools.product(*(spec.grid[k] for k in keys)),
                               spec.points or [{}])
    for combo, extra in combos:
        values = {**dict(zip(keys, combo, strict=True)), **extra}
        argv = list(base)
        for key, value in values.items():
            argv += _flags(key, value)
        name = point_name(values)
        if name in seen:  # two values that print alike: keep both runs apart
            seen[name] += 1
            name = f"{name}__{seen[name]}"
        else:
            seen[name] = 0
        points.append(Point(name=name, values=values, argv=argv))
    return points


# ---------------------------------------------------------------- one point


def _strip_run_flags(argv: Sequence[str]) -> list[str]:
    """A run's flags without those that do not change its result."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        if arg.startswith("--out="):
            continue
        if arg in ("--resume", "--force", "--no-progress", "-v", "--verbose"):
            continue
        out.append(arg)
    return out


def _read_results(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = read_json(run_dir / RESULTS_FILE)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_point(experiment: str, point: Point, run_dir: Path, force: bool) -> tuple[str, str]:
    """``(action, why)``: ``skip`` a finished run, ``resume`` one with checkpoints, ``run``
    afresh, or ``conflict`` when a finished run there was made with other settings."""
    if force:
        return "run", "--force"
    prev = _read_results(run_dir)
    if prev is not None and prev.get("status") == "finished":
        old = _strip_run_flags(prev.get("command", [])[1:])
        new = _strip_run_flags([experiment, *point.argv])
        if old and old != new:
            return "conflict", (f"{run_dir} holds a finished run made with other flags "
                                f"({' '.join(old)}); pass --force to redo it")
        return "skip", "finished"
    ckpt = run_dir / CHECKPOINT_DIR
    if ckpt.is_dir() and any(ckpt.glob("*.pt")):
        return "resume", "checkpoints"
    return "run", "new"


def worker_argv(spec: SweepSpec, point: Point, run_dir: Path, action: str) -> list[str]:
    """Arguments after ``python -m rbp.runner.sweep`` for the subprocess running ``point``."""
    argv: list[str] = []
    for module in spec.imports:
        argv += ["--import", module]
    argv += [spec.experiment, *point.argv, "--out", str(run_dir), "--no-progress"]
    if action == "resume":
        argv.append("--resume")
    elif action == "run":
        argv.append("--force")  # an unfinished run without checkpoints: start it over
    return argv


def execute(argv: Sequence[str], log_path: str) -> dict[str, Any]:
    """Run ``python -m rbp.runner.sweep ARGV`` with this interpreter; output to ``log_path``.

    Returns ``{"returncode", "wall_time_s"}``. Used by both backends (a Ray task calls it on
    its node, so ``sys.executable`` is that node's interpreter).
    """
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    with open(path, "ab") as out:
        out.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} "
                  f"rbp {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "rbp.runner.sweep", *argv],
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        _RUNNING.add(proc)
        try:
            returncode = proc.wait()
        except BaseException:  # interrupted or cancelled: let the run record it, then stop it
            _stop(proc)
            raise
        finally:
            _RUNNING.discard(proc)
    return {"returncode": returncode, "wall_time_s": round(time.monotonic() - start, 3)}


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGINT ``proc`` (it saves its state and exits 130); SIGKILL it after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _ProcSet:
    """Thread-safe set of live subprocesses, so that an interrupted sweep can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.add(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def interrupt_all(self, grace: float = 10.0) -> None:
        """SIGINT every live run (it records 'interrupted' and exits 130); SIGKILL those
        still alive after ``grace`` seconds."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


_RUNNING = _ProcSet()


def _last_error(log_path: Path) -> str | None:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln and not ln.startswith("===")]
    for line in reversed(lines):
        if "error:" in line or "Error" in line:
            return line
    return lines[-1] if lines else None


def _outcome(run_dir: Path, returncode: int) -> tuple[str, str | None]:
    res = _read_results(run_dir)
    status = res.get("status") if res else None
    error = res.get("error") if res else None
    if returncode == 0 and status == "finished":
        return "finished", None
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return "killed", f"killed by signal {-returncode} {sig}".strip()
    if returncode == 130 or status == "interrupted":
        return "interrupted", error or "interrupted"
    return "failed", error or _last_error(run_dir / POINT_LOG) or f"exit status {returncode}"


# ---------------------------------------------------------------- the sweep


@dataclass
class _Tracker:
    total: int
    workers: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0
    times: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def eta(self) -> str:
        left = self.total - self.done - self.failed - self.skipped
        if not self.times or left <= 0:
            return "?" if left > 0 else "0s"
        secs = sum(self.times) / len(self.times) * left / self.workers
        return f"{secs / 60:.1f} min" if secs >= 90 else f"{secs:.0f}s"

    def line(self) -> str:
        return (f"{self.done + self.skipped}/{self.total} done ({self.skipped} skipped), "
                f"{self.running} running, {self.failed} failed, ETA {self.eta()}")


def _sweep_doc(spec: SweepSpec, records: list[dict[str, Any]], started: str, wall: float,
               status: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    return {
        "experiment": spec.experiment, "status": status, "backend": spec.backend,
        "workers": spec.workers, "grid": spec.grid, "points_spec": spec.points,
        "fixed": spec.fixed, "quick": spec.quick,
        "args": spec.args, "started_at": started, "wall_time_s": round(wall, 3),
        "counts": counts, "points": records,
    }


def run_sweep(spec: SweepSpec, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run every point of ``spec`` that is not finished yet; return (and write) ``sweep.json``.

    Points run in up to ``spec.workers`` subprocesses at a time (``backend="local"``), or as
    Ray tasks of ``spec.cpus_per_run`` CPUs each (``backend="ray"``; joins ``spec.address`` or
    the running Ray instance, else starts a local one). ``KeyboardInterrupt`` stops the running
    points (they record ``interrupted`` and keep their checkpoints) and is re-raised after
    ``sweep.json`` is written.
    """
    _check_spec(spec)
    for module in spec.imports:
        importlib.import_module(module)
    points = expand_grid(spec)
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    records: list[dict[str, Any]] = []
    todo: list[tuple[int, Point, list[str], str]] = []
    for point in points:
        run_dir = out / point.name
        action, why = plan_point(spec.experiment, point, run_dir, force)
        rec: dict[str, Any] = {
            "name": point.name, "values": point.values, "path": point.name, "action": action,
            "status": "pending", "wall_time_s": None, "returncode": None, "error": None,
            "command": shlex.join(["rbp", spec.experiment, *point.argv, "--out", str(run_dir)]),
        }
        if action == "skip":
            prev = _read_results(run_dir) or {}
            rec.update(status="finished", wall_time_s=prev.get("wall_time_s"))
        elif action == "conflict":
            rec.update(status="failed", error=why)
        else:
            todo.append((len(records), point, worker_argv(spec, point, run_dir, action), action))
        records.append(rec)

    tracker = _Tracker(total=len(points), workers=spec.workers)
    tracker.skipped = sum(r["action"] == "skip" for r in records)
    tracker.failed = sum(r["action"] == "conflict" for r in records)
    lock = threading.Lock()
    sweep_path = out / SWEEP_FILE
    log.info("sweep of %d %s run(s) in %s: %d to run, %d finished already", len(points),
             spec.experiment, out, len(todo), tracker.skipped)
    for rec in records:
        if rec["action"] == "conflict":
            log.warning("%s: %s", rec["name"], rec["error"])

    def save(status: str = "running") -> None:
        write_json(sweep_path, _sweep_doc(spec, records, started, time.monotonic() - t0, status))

    def finish(i: int, result: dict[str, Any], bar: Any) -> None:
        rec = records[i]
        status, error = _outcome(out / rec["path"], result["returncode"])
        with lock:
            rec.update(status=status, error=error, returncode=result["returncode"],
                       wall_time_s=result["wall_time_s"])
            tracker.running -= 1
            if status == "finished":
                tracker.done += 1
                tracker.times.append(result["wall_time_s"])
            else:
                tracker.failed += 1
            save()
        msg = f"{rec['name']}: {status} in {result['wall_time_s']:.1f}s"
        if error:
            msg += f" ({error})"
        (log.info if status == "finished" else log.warning)("%s; %s", msg, tracker.line())
        bar.update()
        bar.set_postfix_str(f"running {tracker.running}, failed {tracker.failed}")

    def started_one(i: int) -> None:
        with lock:
            records[i]["status"] = "running"
            tracker.running += 1
        log.info("%s: %s", records[i]["name"], "resuming" if records[i]["action"] == "resume"
                 else "starting")

    save()
    status = "finished"
    with progress(len(points), desc=f"sweep {spec.experiment}", enabled=show_progress,
                  initial=len(points) - len(todo)) as bar:
        try:
            if spec.backend == "ray":
                _run_ray(spec, todo, out, started_one, lambda i, r: finish(i, r, bar))
            else:
                _run_local(spec, todo, out, started_one, lambda i, r: finish(i, r, bar))
        except KeyboardInterrupt:
            status = "interrupted"
            for rec in records:
                if rec["status"] in ("pending", "running"):
                    rec["status"] = "interrupted" if rec["status"] == "running" else "pending"
            save(status)
            log.warning("sweep interrupted; run the same command again to resume it")
            raise
    if any(r["status"] != "finished" for r in records):
        status = "incomplete"
    doc = _sweep_doc(spec, records, started, time.monotonic() - t0, status)
    write_json(sweep_path, doc)
    log.info("sweep %s: %s; summary in %s", status, tracker.line(), sweep_path)
    summary = _SUMMARIES.get(spec.experiment)
    if summary is not None and any(r["status"] == "finished" for r in records):
        summary(aggregate(out), out)
    return doc


def _run_local(spec: SweepSpec, todo: list[tuple[int, Point, list[str], str]], out: Path,
               started: Callable[[int], None],
               finish: Callable[[int, dict[str, Any]], None]) -> None:
    def job(i: int, point: Point, argv: list[str]) -> tuple[int, dict[str, Any]]:
        started(i)
        return i, execute(argv, str(out / point.name / POINT_LOG))

    pool = futures.ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix="sweep")
    try:
        pending = {pool.submit(job, i, p, argv) for i, p, argv, _ in todo}
        while pending:
            done, pending = futures.wait(pending, timeout=0.5,
                                         return_when=futures.FIRST_COMPLETED)
            for fut in done:
                i, result = fut.result()
                finish(i, result)
    except KeyboardInterrupt:
        for fut in pending:
            fut.cancel()
        _RUNNING.interrupt_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(spec: SweepSpec, todo: list[tuple[int, Point, list[str], str]], out: Path,
             started: Callable[[int], None],
             finish: Callable[[int, dict[str, Any]], None]) -> None:
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ConfigError("--backend ray needs Ray: pip install 'rbp[ray]' (or ray)") from exc
    if not ray.is_initialized():
        if spec.address:
            ray.init(address=spec.address)
        else:
            ray.init(include_dashboard=False)
    remote = ray.remote(num_cpus=spec.cpus_per_run, max_retries=0)(execute)
    refs: dict[Any, int] = {}
    for i, point, argv, _ in todo:
        refs[remote.remote(argv, str((out / point.name / POINT_LOG).resolve()))] = i
        started(i)
    try:
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task itself died (node lost...)
                    result = {"returncode": 1, "wall_time_s": 0.0}
                    log.warning("the Ray task of point %d failed: %s", refs[ref], exc)
                finish(refs[ref], result)
    except KeyboardInterrupt:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise


# ---------------------------------------------------------------- aggregation


def _method_key(values: Mapping[str, Any]) -> str | None:
    for key in values:
        if key.lstrip("-") in METHOD_KEYS:
            return key
    return None


def _group_label(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k.lstrip('-')}={_name_part(v)}" for k, v in values.items()) or "all"


def aggregate(sweep_dir: Path) -> dict[str, Any]:
    """Collect the finished points of a sweep into one structure.

    Returns ``{"experiment", "grid", "keys", "results", "points", "incomplete"}`` where

    * ``points[name]`` = ``{"values", "status", "path", "results"}`` (``results`` = the point's
      whole ``results.json``, ``None`` when it has none);
    * ``results[label]`` = ``{"values": v, "methods": {...}, "points": [names]}``, one entry per
      combination ``v`` of the grid values other than ``method``: the ``methods`` mappings of
      the finished points sharing ``v`` merged into one, so it reads like the ``results.json``
      of a single run over all those methods (``label`` is e.g. ``"dataset=cora,seed=0"``);
    * ``keys`` = the grid keys of ``values``; ``incomplete`` = names of unfinished points.

    Raises ValueError when two points of one group report the same method.
    """
    sweep_dir = Path(sweep_dir)
    doc = read_json(sweep_dir / SWEEP_FILE)
    agg: dict[str, Any] = {"experiment": doc["experiment"], "grid": doc.get("grid", {}),
                           "keys": [], "results": {}, "points": {}, "incomplete": []}
    for rec in doc["points"]:
        res = _read_results(sweep_dir / rec["path"])
        status = res.get("status") if res else rec.get("status")
        values = rec.get("values") or {}
        agg["points"][rec["name"]] = {"values": values, "status": status,
                                      "path": str(sweep_dir / rec["path"]), "results": res}
        if status != "finished" or res is None:
            agg["incomplete"].append(rec["name"])
            continue
        mkey = _method_key(values)
        others = {k: v for k, v in values.items() if k != mkey}
        agg["keys"] = list(others)
        label = _group_label(others)
        group = agg["results"].setdefault(label, {"values": others, "methods": {},
                                                  "points": []})
        group["points"].append(rec["name"])
        for method, value in (res.get("methods") or {}).items():
            if method in group["methods"]:
                raise ValueError(f"method '{method}' of group {label} is reported by two "
                                 f"points ({', '.join(group['points'])})")
            group["methods"][method] = value
    return agg


def runs_matching(agg: Mapping[str, Any], **values: Any) -> list[dict[str, Any]]:
    """The merged results of the groups whose grid values include ``values`` (e.g. all seeds
    of ``dataset="cora"``), in sweep order: ``[{"values", "methods", "points"}, ...]``."""
    return [g for g in agg["results"].values()
            if all(g["values"].get(k) == v for k, v in values.items())]


def summarize(agg: Mapping[str, Any], over: str = "seed") -> dict[str, dict[str, Any]]:
    """Mean, standard deviation (ddof 1; 0 for one run) and count of every numeric scalar
    metric of every method, across the values of grid key ``over`` (e.g. the seeds).

    Returns ``{label of the other grid values: {method: {metric: {"mean", "std", "n"}}}}``.
    """
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for group in agg["results"].values():
        rest = {k: v for k, v in group["values"].items() if k.lstrip("-") != over}
        label = _group_label(rest)
        for method, result in group["methods"].items():
            if not isinstance(result, Mapping):
                continue
            for metric, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    (samples.setdefault(label, {}).setdefault(method, {})
                     .setdefault(metric, []).append(float(value)))
    out: dict[str, dict[str, Any]] = {}
    for label, methods in samples.items():
        for method, metrics in methods.items():
            for metric, xs in metrics.items():
                n = len(xs)
                mean = sum(xs) / n
                std = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
                out.setdefault(label, {}).setdefault(method, {})[metric] = {
                    "mean": mean, "std": std, "n": n}
    return out


def write_merged_run(directory: Path, experiment: str, results: Mapping[str, Any],
                     points: Sequence[str]) -> Path:
    """Write ``results`` merged from the finished ``points`` of a sweep as ``results.json`` of a
    run directory, so that figures, tables and ``rbp report`` treat it like a single run."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {**results, "experiment": experiment, "status": "finished",
           "merged_from": list(points)}
    write_json(directory / RESULTS_FILE, doc)
    return directory


def register_summary(experiment: str, fn: Callable[[dict[str, Any], Path], Any]) -> None:
    """Have ``rbp sweep`` call ``fn(aggregate(sweep_dir), sweep_dir)`` at the end of a sweep
    of ``experiment`` (e.g. to write ``table1.md`` over all the points)."""
    _SUMMARIES[experiment] = fn


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``rbp sweep``."""
    p.add_argument("target", metavar="SPEC_OR_EXPERIMENT",
                   help="a sweep spec YAML file, or the name of an experiment")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=A,B",
                   help="a grid axis (repeatable): method, seed, a setting or a --flag")
    p.add_argument("--set", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting shared by every point (repeatable)")
    p.add_argument("--quick", action="store_true", default=None,
                   help="pass --quick to every run")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="sweep directory (default: the spec's out, or runs/sweeps/<experiment>)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="points run at once by the local backend (default 1)")
    p.add_argument("--backend", choices=("local", "ray"), help="where the points run")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join (e.g. 'auto')")
    p.add_argument("--cpus-per-run", type=float, metavar="C",
                   help="CPUs reserved by each Ray task (default 1)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE (registering more experiments) in the sweep and each run")
    p.add_argument("--force", action="store_true", help="redo finished points too")
    p.add_argument("--dry-run", action="store_true",
                   help="list the points and check their settings; run nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Build the :class:`SweepSpec` of ``rbp sweep`` from its parsed flags."""
    target = str(args.target)
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        spec = load_spec(Path(target))
    else:
        spec = SweepSpec(experiment=target)
    for text in args.grid:
        key, values = parse_grid_option(text)
        spec.grid[key] = values
        spec.fixed.pop(key, None)
    for text in args.fixed:
        key, value = parse_override(text)
        spec.fixed[key] = value
        spec.grid.pop(key, None)
    if args.quick:
        spec.quick = True
    if args.out is not None:
        spec.out = args.out
    if args.workers is not None:
        spec.workers = args.workers
    if args.backend is not None:
        spec.backend = args.backend
    if args.address is not None:
        spec.address = args.address
        spec.backend = "ray"
    if args.cpus_per_run is not None:
        spec.cpus_per_run = args.cpus_per_run
    spec.imports += [m for m in args.imports if m not in spec.imports]
    _check_spec(spec)
    return spec


def check_points(spec: SweepSpec, points: Iterable[Point]) -> list[tuple[Point, str | None]]:
    """Build each point's settings in-process as the run would: ``[(point, error or None)]``."""
    from rbp.runner import cli

    exps = cli.experiments()
    exp = exps[spec.experiment]
    parser = cli.build_parser({spec.experiment: exp})
    checked: list[tuple[Point, str | None]] = []
    for point in points:
        try:
            args = parser.parse_args([spec.experiment, *point.argv])
            cli._build_config(exp, args)
            checked.append((point, None))
        except SystemExit:
            checked.append((point, "invalid command-line flags"))
        except (ValueError, FileNotFoundError) as exc:
            checked.append((point, str(exc)))
    return checked


def run_command(args: argparse.Namespace) -> int:
    """``rbp sweep``: exit 0 when every point finished, 1 when some did not, 2 on a bad spec,
    130 when interrupted."""
    setup_logging(args.verbose)
    prog = "rbp sweep"
    try:
        spec = spec_from_args(args)
        for module in spec.imports:
            importlib.import_module(module)
        from rbp.runner import cli

        exps = cli.experiments()
        if spec.experiment not in exps:
            raise ConfigError(f"unknown experiment '{spec.experiment}' "
                              f"(installed: {', '.join(exps) or 'none'})")
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        bad = 0
        for point, error in check_points(spec, expand_grid(spec)):
            print(f"{point.name}: rbp {spec.experiment} {' '.join(point.argv)}"
                  + (f"\n    error: {error}" if error else ""))
            bad += error is not None
        return 2 if bad else 0
    try:
        with interrupt_on_sigterm():
            doc = run_sweep(spec, force=args.force, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0 if doc["status"] == "finished" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: ``python -m rbp.runner.sweep [--import M]... EXPERIMENT ARGS``.

    Imports the named modules (to register experiments defined outside ``rbp.apps``), then
    runs ``rbp EXPERIMENT ARGS`` in this process and returns its exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with interrupt_on_sigterm():
        while len(argv) >= 2 and argv[0] == "--import":
            importlib.import_module(argv[1])
            argv = argv[2:]
        import torch

        torch.set_num_threads(int(os.environ.get("RBP_SWEEP_THREADS", "1")))
        from rbp.runner import cli

        return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
