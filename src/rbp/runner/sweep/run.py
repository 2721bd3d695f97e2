"""``rbp sweep``: plan every point, launch those not done, keep ``sweep.json`` current."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rbp.runner.aggregate import SWEEP_FILE, aggregate, read_results
from rbp.runner.config import ConfigError, build_config, parse_override
from rbp.runner.lock import LOCK_FILE, RunLock
from rbp.runner.progress import get_logger, progress, setup_logging
from rbp.runner.registry import (
    IMPORTS_ENV,
    Experiment,
    check_experiment_data,
    experiments,
    import_app,
    summary_of,
)
from rbp.runner.results import write_json
from rbp.runner.signals import interrupt_on_sigterm

from .launch import Job, Launcher, LocalLauncher, RayLauncher
from .plan import plan_point, resolve_point, setting_defaults
from .spec import Point, SweepSpec, check_spec, expand_grid, load_spec, parse_grid_option

__all__ = ["POINT_LOG", "add_arguments", "launcher_for", "plan", "run_command", "run_sweep",
           "spec_from_args"]

#: Log of each point's subprocess (stdout and stderr), inside the point's run directory.
POINT_LOG = "run.log"

log = get_logger("sweep")


def _experiment(spec: SweepSpec) -> Experiment:
    for module in spec.imports:
        import_app(module)
    exps = experiments()
    if spec.experiment not in exps:
        raise ConfigError(f"unknown experiment '{spec.experiment}' "
                          f"(installed: {', '.join(exps) or 'none'})")
    return exps[spec.experiment]


def plan(spec: SweepSpec, force: bool = False) -> list[tuple[Point, dict[str, Any]]]:
    """Every point of ``spec`` with its record for ``sweep.json``: ``action`` (``run``,
    ``resume``, ``skip``, ``conflict`` or ``invalid``), status and error; starts nothing."""
    exp = _experiment(spec)
    fields = getattr(exp.config_cls, "__dataclass_fields__", {})
    defaults = setting_defaults(exp.config_cls)
    out = spec.out_dir
    planned = []
    for point in expand_grid(spec, settings=set(fields)):
        run_dir = out / point.name
        rec: dict[str, Any] = {
            "name": point.name, "values": point.values, "path": point.name, "action": "run",
            "status": "pending", "wall_time_s": None, "returncode": None, "error": None,
            "command": shlex.join(["rbp", spec.experiment, *point.argv, "--out", str(run_dir)]),
        }
        try:
            settings = resolve_point(exp, point, spec.quick)
        except (ValueError, FileNotFoundError) as exc:
            rec.update(action="invalid", status="failed", error=str(exc))
        else:
            action, why = plan_point(run_dir, settings, force, spec.experiment, defaults)
            rec["action"] = action
            if action == "skip":
                rec.update(status="finished",
                           wall_time_s=(read_results(run_dir) or {}).get("wall_time_s"))
            elif action == "conflict":
                rec.update(status="failed", error=why)
        planned.append((point, rec))
    return planned


def _data_problem(spec: SweepSpec, point: Point) -> str | None:
    """Why the data ``point`` would read is not in place (``--dry-run``), or None."""
    exp = _experiment(spec)
    if exp.check_data is None:
        return None
    quick = spec.quick or "--quick" in point.flags
    try:
        check_experiment_data(exp, build_config(exp, point.overrides, quick=quick))
    except (ValueError, FileNotFoundError) as exc:
        return f"data: {exc}"
    return None


def launcher_for(spec: SweepSpec) -> Launcher:
    """The launcher of ``spec.backend``."""
    if spec.backend == "ray":
        return RayLauncher(address=spec.address, cpus_per_run=spec.cpus_per_run)
    return LocalLauncher(workers=spec.workers)


def _outcome(run_dir: Path, returncode: int) -> tuple[str, str | None]:
    res = read_results(run_dir) or {}
    status, error = res.get("status"), res.get("error")
    if returncode == 0 and status == "finished":
        return "finished", None
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return "killed", f"killed by signal {-returncode} {sig}".strip()
    if returncode == 130 or status == "interrupted":
        return "interrupted", error or "interrupted"
    return "failed", error or _last_line(run_dir / POINT_LOG) or f"exit status {returncode}"


def _last_line(log_path: Path) -> str | None:
    """The last error-looking line of a point's log (else its last line)."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln and not ln.startswith("===")]
    errors = [ln for ln in lines if "error:" in ln or "Error" in ln]
    return (errors or lines or [None])[-1]


def _progress_line(records: list[dict[str, Any]], times: list[float], workers: int) -> str:
    """Counts and an ETA: mean wall time of the points finished here x points left / workers."""
    count = {k: sum(r["status"] == k for r in records)
             for k in ("finished", "running", "interrupted")}
    skipped = sum(r["action"] == "skip" for r in records)
    left = sum(r["status"] in ("pending", "running") for r in records)
    failed = len(records) - count["finished"] - count["interrupted"] - left
    eta = "0s" if left == 0 else "?"
    if times and left:
        secs = sum(times) / len(times) * left / workers
        eta = f"{secs / 60:.1f} min" if secs >= 90 else f"{secs:.0f}s"
    stopped = f", {count['interrupted']} interrupted" if count["interrupted"] else ""
    return (f"{count['finished']}/{len(records)} done ({skipped} skipped), {count['running']} "
            f"running, {failed} failed{stopped}, ETA {eta}")


def run_sweep(spec: SweepSpec, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run every point of ``spec`` that is not finished yet; return (and write) ``sweep.json``.

    ``KeyboardInterrupt`` stops the running points (they record ``interrupted`` and keep their
    checkpoints) and is re-raised after ``sweep.json`` is written.
    """
    check_spec(spec)
    _experiment(spec)  # an unknown experiment: nothing created
    out = spec.out_dir
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the sweep directory {out}: {exc}") from None
    lock = RunLock(out, ["rbp", "sweep", spec.experiment])  # one sweep per directory
    wrote = False
    try:
        doc = _run_locked(spec, out, force, show_progress)
        wrote = True
        return doc
    except KeyboardInterrupt:
        wrote = True  # sweep.json records it
        raise
    finally:
        lock.release()
        if not wrote and not (out / SWEEP_FILE).exists():
            _remove_empty(out, created)


def _remove_empty(out: Path, created: list[Path]) -> None:
    """Remove the lock file and the folders this sweep created when it wrote nothing."""
    with contextlib.suppress(OSError):
        (out / LOCK_FILE).unlink()
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _run_locked(spec: SweepSpec, out: Path, force: bool, show_progress: bool) -> dict[str, Any]:
    planned = plan(spec, force)
    records = [rec for _, rec in planned]
    base = out.resolve() if spec.backend == "ray" else out
    env = {IMPORTS_ENV: ",".join(spec.imports)} if spec.imports else {}
    jobs = []
    for i, (point, rec) in enumerate(planned):
        if rec["action"] in ("run", "resume"):
            extra = ["--resume"] if rec["action"] == "resume" else ["--force"]
            argv = [spec.experiment, *point.argv, "--out", str(base / point.name),
                    "--no-progress", *extra]
            jobs.append(Job(index=i, argv=argv, log=out / point.name / POINT_LOG, env=env))
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    times: list[float] = []
    workers = spec.workers if spec.backend == "local" else max(1, len(jobs))

    def save(status: str = "running") -> dict[str, Any]:
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        doc = {"experiment": spec.experiment, "status": status, "backend": spec.backend,
               "workers": spec.workers, "grid": spec.grid, "points_spec": spec.points,
               "fixed": spec.fixed, "quick": spec.quick, "args": spec.args,
               "started_at": started_at, "wall_time_s": round(time.monotonic() - t0, 3),
               "counts": counts, "points": records}
        write_json(out / SWEEP_FILE, doc)
        return doc

    skipped = sum(rec["action"] == "skip" for rec in records)
    log.info("sweep of %d %s run(s) in %s: %d to run, %d finished already%s", len(records),
             spec.experiment, out, len(jobs), skipped,
             f", {len(records) - len(jobs) - skipped} refused (below)"
             if len(records) - len(jobs) - skipped else "")
    for rec in records:
        if rec["error"]:
            log.warning("%s: %s", rec["name"], rec["error"])
    save()
    with progress(len(records), desc=f"sweep {spec.experiment}", enabled=show_progress,
                  initial=len(records) - len(jobs)) as bar:

        launcher = launcher_for(spec)
        queued_only = not getattr(launcher, "reports_start", True)

        def started(job: Job) -> None:  # when its process starts (Ray: when submitted)
            rec = records[job.index]
            rec["status"] = "running"
            verb = "resuming" if rec["action"] == "resume" else "starting"
            log.info("%s: %s", rec["name"], f"queued ({verb} when Ray runs it)" if queued_only
                     else verb)

        def finished(job: Job, result: dict[str, Any]) -> None:
            rec = records[job.index]
            status, error = _outcome(out / rec["path"], result["returncode"])
            rec.update(status=status, error=error, returncode=result["returncode"],
                       wall_time_s=result["wall_time_s"])
            if status == "finished":
                times.append(result["wall_time_s"])
            save()
            line = _progress_line(records, times, workers)
            (log.info if status == "finished" else log.warning)(
                "%s: %s in %.1fs%s; %s", rec["name"], status, result["wall_time_s"],
                f" ({error})" if error else "", line)
            bar.update()
            bar.set_postfix_str(line.partition(", ")[2].rpartition(", ETA")[0])

        try:
            launcher.run(jobs, started, finished)
        except KeyboardInterrupt:
            for rec in records:
                if rec["status"] == "running":
                    rec["status"] = "interrupted"
            save("interrupted")
            log.warning("sweep interrupted; run the same command again to resume it")
            raise
    status = "finished" if all(r["status"] == "finished" for r in records) else "incomplete"
    doc = save(status)
    log.info("sweep %s: %s; summary in %s", status, _progress_line(records, times, workers),
             out / SWEEP_FILE)
    summary = summary_of(spec.experiment)
    if summary is not None and any(r["status"] == "finished" for r in records):
        summary(aggregate(out), out)
    return doc


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
    spec.quick = spec.quick or bool(args.quick)
    spec.out = args.out if args.out is not None else spec.out
    spec.workers = args.workers if args.workers is not None else spec.workers
    spec.backend = args.backend or spec.backend
    if args.address is not None:
        spec.address, spec.backend = args.address, "ray"
    spec.cpus_per_run = args.cpus_per_run if args.cpus_per_run is not None else spec.cpus_per_run
    spec.imports += [m for m in args.imports if m not in spec.imports]
    check_spec(spec)
    return spec


def _dry_run(spec: SweepSpec, force: bool) -> int:
    """``rbp sweep --dry-run``: each point's action and command; each distinct error once
    (numbered, with the points it concerns), then the totals. 0 when no point has an error."""
    errors: dict[str, list[str]] = {}  # error -> the points it concerns
    actions: dict[str, int] = {}
    planned = plan(spec, force=force)
    for point, rec in planned:
        error = rec["error"] if rec["action"] in ("invalid", "conflict") else None
        if error is None and rec["action"] != "skip":
            error = _data_problem(spec, point)
        actions[rec["action"]] = actions.get(rec["action"], 0) + 1
        ref = ""
        if error is not None:
            errors.setdefault(error, []).append(point.name)
            ref = f"  [error {list(errors).index(error) + 1}]"
        print(f"{point.name}: {rec['action']}: rbp {spec.experiment} "
              f"{shlex.join(point.argv)}{ref}")
    for i, (error, names) in enumerate(errors.items(), 1):
        which = names[0] if len(names) == 1 else f"{len(names)} points, {names[0]} ..."
        print(f"error {i} ({which}): {error}")
    n_bad = sum(len(names) for names in errors.values())
    order = ["run", "resume", "skip", "conflict", "invalid"]
    counts = ", ".join(f"{actions[a]} {a}" for a in sorted(
        actions, key=lambda a: order.index(a) if a in order else len(order)))
    print(f"{len(planned)} point(s): {counts or 'none'}; "
          + (f"{n_bad} with an error ({len(errors)} distinct)" if errors else "no errors")
          + f"; sweep directory {spec.out_dir}")
    return 2 if errors else 0


def run_command(args: argparse.Namespace) -> int:
    """``rbp sweep``: exit 0 when every point finished, 1 when some did not, 2 on a bad spec,
    130 when interrupted."""
    setup_logging(args.verbose)
    prog = "rbp sweep"
    try:
        spec = spec_from_args(args)
        if args.dry_run:
            return _dry_run(spec, args.force)
        with interrupt_on_sigterm():
            doc = run_sweep(spec, force=args.force, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0 if doc["status"] == "finished" else 1
