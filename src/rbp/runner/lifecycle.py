"""One run lifecycle shared by every experiment.

:func:`run_experiment` owns everything around an experiment's science: the output directory
and its lock, "finished, pass --force", resuming only with the same settings, checkpoints
(atomic, checksummed), the RNG seed, SIGINT/SIGTERM, accumulated wall time and the run's status
(``running`` -> ``finished`` / ``interrupted`` / ``failed``) in ``results.json``. The
experiment's ``run(cfg, ctx)`` gets a :class:`RunContext` and only trains and reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from rbp.data.atomic import atomic_write, remove_stale_tmp
from rbp.runner.checkpoint import (
    CheckpointError,
    load_checkpoint,
    parse_checkpoint,
    save_checkpoint,
    seed_everything,
)
from rbp.runner.config import config_to_dict
from rbp.runner.lock import RunLock, describe_holder
from rbp.runner.progress import get_logger
from rbp.runner.results import (
    CHECKPOINT_DIR,
    RESULTS_FILE,
    RunExistsError,
    current_torch_threads,
    machine_info,
    prepare_run_dir,
    to_jsonable,
    write_json,
)
from rbp.runner.resume import (
    DATA_KEY,
    LOCATION_KEYS,
    SettingsMismatchError,
    check_resume,
    data_fingerprint,
    describe_differences,
    moved_data,
    previous_results,
    settings_differences,
    with_new_defaults,
)
from rbp.runner.signals import deferred_interrupts, interrupt_on_sigterm

__all__ = ["RESERVED_RESULT_KEYS", "RunContext", "reuse_problems", "run_experiment"]

#: Key of a checkpoint's state holding the settings of the run that wrote it (JSON text).
SETTINGS_KEY = "_rbp_settings"

#: Keys the runner adds to ``results.json``; an app's results must not use them.
RESERVED_RESULT_KEYS = frozenset(
    {"experiment", "status", "error", "wall_time_s", "started_at", "resumed", "quick",
     "command", "rbp_version", "config", "machine"}
)


# ---------------------------------------------------------------- context


def _safe_tag(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag) or "_"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-rbp")
    except PackageNotFoundError:
        import rbp

        return str(getattr(rbp, "__version__", "unknown"))


@dataclass
class RunContext:
    """What an experiment's ``run(cfg, ctx)`` gets besides its settings.

    Units of work are saved under a tag: :meth:`save` mid-way (when :meth:`should_checkpoint`),
    :meth:`finish` once done; :meth:`load` / :meth:`finished` read them back on ``--resume``.
    :meth:`finished` also takes a unit finished by another run in ``reuse_from`` (workers over
    other seeds, say), copied into this run. A training loop runs each step in :meth:`step`
    within :meth:`saving_on_interrupt`, and calls :meth:`tick` after each step (the
    ``interrupt_after`` test hook).
    """

    out_dir: Path
    resume: bool = False
    progress: bool = True
    log: logging.Logger = field(default_factory=lambda: get_logger("run"))
    checkpoint_every: int = 0
    name: str = "run"
    config: Any = None
    quick: bool = False
    command: list[str] = field(default_factory=list)
    interrupt_after: int | None = None
    prior_wall_time_s: float = 0.0
    reuse_from: list[Path] = field(default_factory=list)
    _start: float = field(default_factory=time.monotonic, init=False, repr=False)
    _started_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        init=False, repr=False,
    )
    _last: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _machine: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _ticks: int = field(default=0, init=False, repr=False)
    _announced: set[str] = field(default_factory=set, init=False, repr=False)
    _data: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _mid_step: bool = field(default=False, init=False, repr=False)

    @property
    def results_path(self) -> Path:
        """``<out_dir>/results.json``."""
        return self.out_dir / RESULTS_FILE

    @property
    def wall_time_s(self) -> float:
        """Seconds spent on this run, over all its sessions (resumes add up)."""
        return self.prior_wall_time_s + time.monotonic() - self._start

    def checkpoint_path(self, tag: str) -> Path:
        """``<out_dir>/checkpoints/<tag>.pt`` (unsafe characters in ``tag`` become ``_``)."""
        return self.out_dir / CHECKPOINT_DIR / f"{_safe_tag(tag)}.pt"

    def should_checkpoint(self, step: int) -> bool:
        """True when ``checkpoint_every > 0`` and ``step`` (1-based, steps done) is a multiple."""
        return self.checkpoint_every > 0 and step > 0 and step % self.checkpoint_every == 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step: SIGINT/SIGTERM within it wait for its end, so that an interrupt
        finds the state between two steps, where :meth:`saving_on_interrupt` saves it."""
        self._mid_step = True
        with deferred_interrupts(f"[rbp.{self.name}] interrupt received; saving once the "
                                 "training step under way ends"):
            yield
            self._mid_step = False

    @contextlib.contextmanager
    def saving_on_interrupt(self, tag: str, state: Callable[[], dict[str, Any]]
                            ) -> Iterator[None]:
        """Around a training loop of :meth:`step` blocks: an interrupt that ends it saves
        checkpoint ``tag`` from ``state()`` before it goes on, so that ``--resume`` loses no
        finished step. An interrupt raised inside a step (the state half updated) saves
        nothing; the last periodic checkpoint stands."""
        self._mid_step = False
        try:
            yield
        except KeyboardInterrupt:
            if not self._mid_step:
                self.save(tag, state())
                self.log.info("%s: interrupted; saved where it stopped", tag)
            raise

    def tick(self) -> None:
        """Count one training step; raise KeyboardInterrupt once ``interrupt_after`` are done
        in this process (a test hook that interrupts as Ctrl-C would)."""
        self._ticks += 1
        if self.interrupt_after is not None and self._ticks >= self.interrupt_after:
            raise KeyboardInterrupt(f"interrupt_after={self.interrupt_after} reached")

    def record_data(self, name: str, *arrays: Any) -> str:
        """Note the data ``name`` that this run read (tensors or NumPy arrays): their SHA-256
        goes into every checkpoint saved from now on, and a checkpoint that recorded other
        data under ``name`` is refused. Call it before loading checkpoints. Returns the hex
        digest."""
        digest = data_fingerprint(*arrays)
        self._data[name] = digest
        return digest

    def _settings_json(self) -> str | None:
        cfg = self.config
        if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
            return None
        return json.dumps(to_jsonable(config_to_dict(cfg)), sort_keys=True)

    def save(self, tag: str, state: dict[str, Any]) -> Path:
        """Atomically save checkpoint ``tag`` (a signal during the write waits for its end),
        with the run's settings, which :meth:`load` compares."""
        path = self.checkpoint_path(tag)
        settings = self._settings_json()
        if settings is not None:
            state = {**state, SETTINGS_KEY: settings}
        if self._data:
            state = {**state, DATA_KEY: dict(self._data)}
        with deferred_interrupts():
            save_checkpoint(path, state)
        self.log.debug("checkpoint %s saved", path)
        return path

    def load(self, tag: str) -> dict[str, Any] | None:
        """Checkpoint ``tag`` when resuming and it exists, else ``None``.

        Raises :class:`~rbp.runner.checkpoint.CheckpointError` for a damaged file.
        """
        if not self.resume:
            return None
        path = self.checkpoint_path(tag)
        state = load_checkpoint(path)
        if state is not None:
            state = dict(state)
            settings, data = state.pop(SETTINGS_KEY, None), state.pop(DATA_KEY, None)
            self._check_settings(path, settings, data)
            if data is None and self._data:  # written before runs recorded their data: the
                self.save(tag, state)        # same data_dir read the same data; note them
        if state is not None and tag not in self._announced:
            self._announced.add(tag)
            if state.get("done"):
                self.log.info("%s: finished earlier; reusing its result", tag)
            else:
                self.log.info("%s: resuming from its checkpoint", tag)
        return state

    def _check_settings(self, path: Path, saved: Any, data: Any = None,
                        remedy: str = "pass --force to start over, or choose a fresh --out"
                        ) -> None:
        """Refuse a checkpoint written with other settings (e.g. copied from another run) or
        from other data. Where it holds the fingerprints of its data, ``data_dir`` may differ."""
        ignore = getattr(type(self.config), "UNIT_SELECTORS", frozenset())
        if isinstance(data, dict) and self._data:
            other = sorted(k for k in set(data) & set(self._data) if data[k] != self._data[k])
            if other:
                raise SettingsMismatchError(
                    f"checkpoint {path} was written from other data than this run read "
                    f"({', '.join(other)}: SHA-256 {str(data[other[0]])[:12]}... -> "
                    f"{self._data[other[0]][:12]}...); point --data-dir at the data that run "
                    f"used, or {remedy}")
            if set(data) & set(self._data):
                ignore = ignore | LOCATION_KEYS
        now = self._settings_json()
        if not isinstance(saved, str) or now is None:
            return  # written before checkpoints recorded their settings
        try:
            old = json.loads(saved)
        except ValueError:
            return
        new = json.loads(now)
        # settings that only choose which units run (seeds, methods, ...) do not change a
        # unit's numbers: a finished unit of a run over other seeds is the same unit
        diff = settings_differences(with_new_defaults(old, self.config), new, ignore=ignore)
        if diff:
            raise SettingsMismatchError(
                f"checkpoint {path} was written by a run with other settings "
                f"({describe_differences(old, new, diff)}); it cannot be resumed with these: "
                f"{remedy}")

    def finish(self, tag: str, result: dict[str, Any]) -> None:
        """Record unit ``tag`` as done with ``result`` (replaces its mid-way checkpoint)."""
        self.save(tag, {"done": True, "result": result})

    def finished(self, tag: str) -> dict[str, Any] | None:
        """The result of unit ``tag`` if it finished in an earlier session, or in a run of
        ``reuse_from`` (then copied here), else ``None``."""
        state = self.load(tag)
        if state is not None and state.get("done"):
            return state["result"]
        return self._reuse(tag) if self.reuse_from else None

    def _reuse(self, tag: str) -> dict[str, Any] | None:
        """Unit ``tag`` finished by a run in ``reuse_from`` (same settings but for those that
        only choose units): copied into this run's checkpoints, its result returned."""
        name = self.checkpoint_path(tag).name
        for other in self.reuse_from:
            path = Path(other) / CHECKPOINT_DIR / name
            try:
                data = path.read_bytes()
            except OSError:  # not there (yet)
                continue
            try:
                state = parse_checkpoint(data, path)
            except CheckpointError as exc:  # a damaged file there is that run's to redo
                self.log.warning("%s; not reused", exc)
                continue
            if not state.get("done"):
                continue
            state = dict(state)
            self._check_settings(path, state.pop(SETTINGS_KEY, None), state.pop(DATA_KEY, None),
                                 remedy=f"drop --reuse-from {other}")
            with deferred_interrupts(), atomic_write(self.checkpoint_path(tag)) as f:
                f.write(data)
            self.log.info("%s: finished by the run in %s; reusing its result", tag, other)
            return state["result"]
        return None

    def write_results(
        self, results: dict[str, Any], status: str = "running", error: str | None = None
    ) -> Path:
        """Atomically write ``results`` plus run metadata to ``results.json``."""
        clash = RESERVED_RESULT_KEYS.intersection(results)
        if clash:
            raise ValueError(f"results use reserved key(s): {', '.join(sorted(clash))}")
        self._last = dict(results)
        if self._machine is None:
            self._machine = machine_info()
        else:  # the run may set its thread count after the first write: record the real one
            self._machine["torch_threads"] = current_torch_threads()
        cfg = self.config
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            cfg = config_to_dict(cfg)
        doc: dict[str, Any] = {
            "experiment": self.name,
            "status": status,
            "wall_time_s": round(self.wall_time_s, 3),
            "started_at": self._started_at,
            "resumed": self.resume,
            "quick": self.quick,
        }
        if error is not None:
            doc["error"] = error
        doc.update(results)
        doc.update({"config": cfg, "command": self.command, "rbp_version": _version(),
                    "machine": self._machine})
        with deferred_interrupts():
            write_json(self.results_path, doc)
        return self.results_path


def _restore(path: Path, data: bytes) -> None:
    """Put ``path``'s earlier bytes back (atomically; a failure to do so is only logged)."""
    try:
        with deferred_interrupts(), atomic_write(path) as f:
            f.write(data)
    except OSError as exc:
        get_logger("run").warning("could not restore %s: %s", path, exc)


# ---------------------------------------------------------------- the lifecycle


# torch.OutOfMemoryError (recent torch) is torch.cuda.OutOfMemoryError, which older torch has
_OOM: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _out_of_memory(exc: BaseException) -> str | None:
    """What to say of a failed allocation (CUDA/MPS's OutOfMemoryError or the CPU allocator's
    refusal, e.g. ``--set n_hidden=1000000000``), or None for another error."""
    text = str(exc)
    if not (isinstance(exc, _OOM) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    return (f"out of memory: {text.strip().splitlines()[-1]}; these settings need more memory "
            "than this machine has: lower the model or batch sizes, or run on a larger device")


def _failed(ctx: RunContext, prog: str, message: str, verbose: bool) -> int:
    """A run that raised: recorded as failed, told in one line (the traceback with -v), 1."""
    _finish_quietly(ctx, "failed", error=message)
    if verbose:
        traceback.print_exc()
    _error(prog, message + ("" if verbose else " (run with -v for the traceback)"))
    return 1


def _error(prog: str, message: object) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _finish_quietly(ctx: RunContext, status: str, error: str | None = None) -> None:
    try:
        ctx.write_results(ctx._last, status=status, error=error)
    except (Exception, KeyboardInterrupt) as exc:  # never mask the original problem (nor
        ctx.log.debug("could not record status %s: %r", status, exc)  # a 2nd Ctrl-C)


def _prepare(out: Path, resume: bool, force: bool, command: list[str],
             log: logging.Logger) -> tuple[RunLock, Path]:
    """Create ``out``, take its lock, then protect an existing run in it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"--out {out} exists and is not a directory; choose another --out")
    for name, folder in ((CHECKPOINT_DIR, True), (RESULTS_FILE, False)):
        path = out / name
        if path.exists() and path.is_dir() != folder:
            raise RunExistsError(
                f"{path} is a {'file' if folder else 'folder'} where the run keeps its "
                f"{'checkpoints (a folder)' if folder else 'results (a file)'}; move it away "
                "or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunExistsError(f"cannot create --out {out}: {exc.strerror or exc}; choose a "
                             "writable directory") from None
    lock = RunLock(out, command)
    try:
        if lock.stale:
            log.warning("%s was locked by a run that ended without releasing it (%s); taking "
                        "it over", out, describe_holder(lock.stale))
        stale = remove_stale_tmp(out / CHECKPOINT_DIR) + remove_stale_tmp(out)
        if stale:
            log.info("removed %d unfinished temporary file(s) of an earlier run", len(stale))
        prepare_run_dir(out, resume, force)
    except BaseException:
        lock.release()
        raise
    return lock, out


def reuse_problems(out: Path, reuse_from: Sequence[Path]) -> list[str]:
    """What is wrong with the ``--reuse-from`` folders, a line each: the run's own ``--out``,
    or not a folder (a folder not there yet is fine: a worker may start later)."""
    problems = []
    for other in reuse_from:
        if Path(other).resolve() == Path(out).resolve():
            problems.append(f"--reuse-from {other} is this run's own --out; name another run's "
                            "folder")
        elif Path(other).exists() and not Path(other).is_dir():
            problems.append(f"--reuse-from {other} is not a folder; name another run's --out")
    return problems


def run_experiment(
    name: str,
    run: Callable[[Any, RunContext], dict[str, Any] | None],
    cfg: Any,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    quick: bool = False,
    show_progress: bool = True,
    verbose: bool = False,
    command: Sequence[str] = (),
    log: logging.Logger | None = None,
    reuse_from: Sequence[Path] = (),
) -> int:
    """Run ``run(cfg, ctx)`` in ``out`` with the whole lifecycle; return the exit status.

    ``reuse_from``: other runs' folders whose finished units this run takes instead of
    training them (:meth:`RunContext.finished`).

    0: finished (or already finished with these settings on ``--resume``); 2: a problem with
    the settings, the directory, the data or a file (ValueError, OSError: a damaged checkpoint,
    a full disk), reported as one line; 130: interrupted (SIGINT or SIGTERM), with the command
    that resumes it. Other exceptions mark the run failed and propagate.
    """
    log = log or get_logger(name)
    prog = f"rbp {name}"
    command = list(command)
    argv = command[1:] if command[:1] == ["rbp"] else command
    for problem in reuse_problems(out, reuse_from):
        _error(prog, problem)
        return 2
    for other in reuse_from:
        if not (Path(other) / CHECKPOINT_DIR).is_dir():
            log.warning("--reuse-from %s has no %s/ (yet); its units are reused as they finish",
                        other, CHECKPOINT_DIR)
    try:
        lock, out = _prepare(out, resume, force, command, log)
    except (ValueError, OSError) as exc:
        _error(prog, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    try:
        return _run_locked(name, run, cfg, out, lock, resume=resume, quick=quick,
                           show_progress=show_progress, verbose=verbose, command=command,
                           argv=argv, log=log, prog=prog, reuse_from=list(reuse_from))
    finally:
        lock.release()


def _run_locked(name: str, run: Callable[[Any, RunContext], dict[str, Any] | None], cfg: Any,
                out: Path, lock: RunLock, *, resume: bool, quick: bool, show_progress: bool,
                verbose: bool, command: list[str], argv: list[str], log: logging.Logger,
                prog: str, reuse_from: list[Path]) -> int:
    prior_wall = 0.0
    last: dict[str, Any] = {}
    if resume:
        try:
            prev = previous_results(out)
            check_resume(out, prev, cfg, name)
        except ValueError as exc:
            _error(prog, exc)
            return 2
        if prev is not None:
            moved = moved_data(prev, cfg)
            if prev.get("status") == "finished" and not moved:
                log.info("%s holds a finished run with these settings; nothing to do "
                         "(pass --force to run it again)", out)
                return 0
            if prev.get("status") == "finished":
                if not any((out / CHECKPOINT_DIR).glob("*.pt")):
                    old = to_jsonable(prev.get("config") or {})
                    _error(prog, f"{out} holds a finished run that read its data from "
                           f"{', '.join(f'{k}={old.get(k)!r}' for k in moved)}, and no "
                           "checkpoints to compare the data here with; resume it with that "
                           f"{moved[0]}, or run into a fresh --out")
                    return 2
                log.info("%s holds a finished run that read its data from elsewhere (%s); "
                         "checking the data here against its checkpoints", out,
                         ", ".join(moved))
            if prev.get("status") == "running" and lock.stale is None:
                log.warning("the previous run in %s stopped without recording why (killed?)",
                            out)
            wall = prev.get("wall_time_s")
            prior_wall = float(wall) if isinstance(wall, (int, float)) else 0.0
            last = {k: v for k, v in prev.items() if k not in RESERVED_RESULT_KEYS}
        if not any((out / CHECKPOINT_DIR).glob("*.pt")):
            log.info("no checkpoints in %s; starting from the beginning", out)
    interrupt_after = getattr(cfg, "interrupt_after", None)
    ctx = RunContext(
        out_dir=out, resume=resume, progress=show_progress, log=log,
        checkpoint_every=int(getattr(cfg, "checkpoint_every", 0) or 0), name=name,
        config=cfg, quick=quick, command=command,
        interrupt_after=interrupt_after if isinstance(interrupt_after, int) else None,
        prior_wall_time_s=prior_wall, reuse_from=reuse_from,
    )
    ctx._last = last
    try:  # what a resume refused mid-way (its checkpoints' settings or data) puts back
        before = ctx.results_path.read_bytes() if resume and ctx.results_path.is_file() else None
    except OSError:
        before = None
    try:
        ctx.write_results(last, status="running")
    except OSError as exc:
        _error(prog, f"cannot write {ctx.results_path}: {exc.strerror or exc}")
        return 2
    log.debug("settings: %s", config_to_dict(cfg))
    seed = getattr(cfg, "seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed)

    try:
        with interrupt_on_sigterm():  # `kill` (e.g. by a job scheduler) saves like Ctrl-C
            results = run(cfg, ctx)
            path = ctx.write_results(ctx._last if results is None else results,
                                     status="finished")
    except KeyboardInterrupt:
        _finish_quietly(ctx, "interrupted")
        again = [a for a in argv if a != "--force"]
        again = again if "--resume" in again else [*again, "--resume"]
        print(f"\n{prog}: interrupted; continue the run with: rbp {shlex.join(again)}",
              file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "loading state_dict" not in str(exc) or not resume:
            return _failed(ctx, prog, _out_of_memory(exc) or f"{type(exc).__name__}: {exc}",
                           verbose)
        # a checkpoint from a run with other settings (older checkpoints do not record them)
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        message = (f"a checkpoint in {out / CHECKPOINT_DIR} does not fit the model these "
                   f"settings build ({detail}); it was written by a run with other settings: "
                   "pass --force to start over, or choose a fresh --out")
        _finish_quietly(ctx, "failed", error=message)
        if verbose:
            traceback.print_exc()
        _error(prog, message)
        return 2
    except (ValueError, OSError) as exc:  # bad settings or data, damaged files, disk full...
        if isinstance(exc, SettingsMismatchError) and before is not None:
            _restore(ctx.results_path, before)  # refused, not failed: the run is as it was
        else:
            _finish_quietly(ctx, "failed", error=str(exc))
        if verbose:
            traceback.print_exc()
        _error(prog, exc if verbose else f"{exc} (run with -v for the traceback)")
        return 2
    except Exception as exc:  # anything else: one line, the traceback with -v
        return _failed(ctx, prog, f"{type(exc).__name__}: {exc}", verbose)
    except BaseException as exc:
        _finish_quietly(ctx, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    log.info("results written to %s (%.1f s)", path, ctx.wall_time_s)
    return 0
