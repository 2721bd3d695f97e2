"""Where a sweep's points run: one :class:`Launcher` interface, local processes or Ray tasks.

Every point is ``python -m rbp.runner ARGS`` in its own subprocess (a crash, an out-of-memory
kill or ``kill -9`` of one point loses nothing of the others), with its output appended to a
log file. A launcher only starts jobs and reports their exit status; what a point means is the
sweep's business. On ``KeyboardInterrupt`` a launcher stops its running jobs (SIGINT: the run
records ``interrupted`` and saves the step under way; SIGKILL after a grace period) and
re-raises.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rbp.runner.config import ConfigError
from rbp.runner.progress import get_logger

__all__ = ["Job", "Launcher", "LocalLauncher", "RayLauncher", "execute", "stop_processes"]

log = get_logger("sweep")


@dataclass
class Job:
    """One point to run: ``argv`` after ``python -m rbp.runner``, its ``log`` file and extra
    environment variables."""

    index: int
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


Started = Callable[[Job], None]
Finished = Callable[[Job, dict[str, Any]], None]


class Launcher(Protocol):
    """Runs jobs; calls ``started(job)`` when one begins and ``finished(job, result)`` (result:
    ``{"returncode", "wall_time_s"}``) when it ends, one callback at a time (possibly from a
    worker thread)."""

    def run(self, jobs: Sequence[Job], started: Started, finished: Finished) -> None: ...


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float = 60.0) -> None:
    """SIGINT every process (a run ends the training step under way, saves it and exits 130);
    SIGKILL those still alive after ``grace`` seconds, or at once on a second interrupt."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    if procs:
        get_logger("sweep").info("stopping %d run(s): each saves the step under way (killed "
                                 "after %.0f s; interrupt again to kill them now)",
                                 len(procs), grace)
    deadline = time.monotonic() + grace
    try:
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def execute(argv: Sequence[str], log_path: str,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m rbp.runner ARGV`` with this interpreter, output appended to
    ``log_path``; return ``{"returncode", "wall_time_s"}``.

    The run gets ``OMP_NUM_THREADS`` = ``$RBP_SWEEP_THREADS`` (default 1), so that the number
    of workers is the number of cores used. A Ray task calls this on its node.
    """
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    threads = full_env.get("RBP_SWEEP_THREADS", "1")
    full_env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start = time.monotonic()
    with open(path, "ab") as out:
        out.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} "
                  f"rbp {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "rbp.runner", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            returncode = proc.wait()
        except BaseException:  # interrupted or cancelled: let the run record it, then stop it
            stop_processes([proc])
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    return {"returncode": returncode, "wall_time_s": round(time.monotonic() - start, 3)}


@dataclass
class LocalLauncher:
    """Up to ``workers`` jobs at a time, each in a subprocess of this machine."""

    workers: int = 1

    def run(self, jobs: Sequence[Job], started: Started, finished: Finished) -> None:
        lock = threading.Lock()

        def job(j: Job) -> None:
            # both callbacks in the worker, in order: a point's end is reported before the
            # next point of this worker is reported as starting
            with lock:
                started(j)
            result = execute(j.argv, str(j.log), j.env)
            with lock:
                finished(j, result)

        pool = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sweep")
        pending = {pool.submit(job, j) for j in jobs}
        try:
            while pending:
                done, pending = futures.wait(pending, timeout=0.5,
                                             return_when=futures.FIRST_COMPLETED)
                for fut in done:
                    fut.result()  # a callback's exception surfaces here
        except KeyboardInterrupt:
            for fut in pending:
                fut.cancel()
            with _LIVE_LOCK:
                live = list(_LIVE)
            stop_processes(live)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


@dataclass
class RayLauncher:
    """One Ray task of ``cpus_per_run`` CPUs per job, on the cluster at ``address`` (or the
    Ray instance already initialised in this process, else a new local one)."""

    address: str | None = None
    cpus_per_run: float = 1.0
    #: ``started`` is called when a task is submitted (Ray says nothing when one starts)
    reports_start: bool = False

    def run(self, jobs: Sequence[Job], started: Started, finished: Finished) -> None:
        try:
            import ray
        except ModuleNotFoundError as exc:
            raise ConfigError("--backend ray needs Ray: pip install 'torch-rbp[ray]'") from exc
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(include_dashboard=False)
        remote = ray.remote(num_cpus=self.cpus_per_run, max_retries=0)(execute)
        refs: dict[Any, Job] = {}
        for j in jobs:  # paths resolved: the node may run elsewhere on a shared file system
            refs[remote.remote(j.argv, str(j.log.resolve()), j.env)] = j
            started(j)
        try:
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the task itself died (node lost...)
                        result = {"returncode": 1, "wall_time_s": 0.0}
                        log.warning("the Ray task of point %d failed: %s", refs[ref].index, exc)
                    finished(refs[ref], result)
        except KeyboardInterrupt:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise
