"""The ``rbp`` command: one sub-command per registered experiment.

An application registers itself at import time (in its package ``__init__``)::

    register(Experiment(name="hopfield", help="...", config_cls=HopfieldConfig, run=run))

``rbp <name> [options]`` then loads and checks the settings, prepares the run directory,
calls ``run(cfg, ctx)`` with a :class:`RunContext`, and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import logging
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rbp.runner.checkpoint import load_checkpoint, save_checkpoint, seed_everything
from rbp.runner.config import (
    ConfigError,
    config_fields,
    config_to_dict,
    default_config_path,
    load_config,
)
from rbp.runner.progress import get_logger, setup_logging
from rbp.runner.results import (
    CHECKPOINT_DIR,
    RESULTS_FILE,
    machine_info,
    prepare_run_dir,
    read_json,
    write_json,
)

__all__ = [
    "APP_MODULES",
    "RESERVED_RESULT_KEYS",
    "Experiment",
    "RunContext",
    "build_parser",
    "experiments",
    "main",
    "register",
    "unregister",
]

#: Application modules imported (when present) to fill the registry.
APP_MODULES = ("rbp.apps.hopfield", "rbp.apps.citation", "rbp.apps.hyperopt")

#: Keys the runner adds to ``results.json``; an app's results must not use them.
RESERVED_RESULT_KEYS = frozenset(
    {"experiment", "status", "error", "wall_time_s", "started_at", "resumed", "quick",
     "command", "rbp_version", "config", "machine"}
)


@dataclass
class Experiment:
    """A runnable experiment.

    ``config_cls`` is a dataclass of settings (defaults read from ``default_config`` or the
    packaged ``rbp/configs/<name>.yaml``). ``run(cfg, ctx)`` does the work and returns the
    results dict. ``add_arguments`` may add app-specific flags (use ``default=None``);
    ``flag_to_key`` maps their argparse dests to config keys. ``methods`` lists the valid
    method names: ``--method`` is checked against it and ``--method all`` expands to it.
    """

    name: str
    help: str
    config_cls: type
    run: Callable[[Any, RunContext], dict[str, Any] | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    flag_to_key: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    default_config: Path | None = None


_REGISTRY: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry (re-registering an equal experiment is a no-op)."""
    if exp.name in ("list", "sweep", "report"):
        raise ValueError(f"'{exp.name}' is a reserved command name")
    old = _REGISTRY.get(exp.name)
    if old is not None and old != exp:
        raise ValueError(f"an experiment named '{exp.name}' is already registered")
    _REGISTRY[exp.name] = exp
    return exp


def unregister(name: str) -> None:
    """Remove an experiment from the registry (mainly for tests)."""
    _REGISTRY.pop(name, None)


def _load_apps() -> None:
    for module in APP_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.rpartition(".")[0]):
                raise


def experiments() -> dict[str, Experiment]:
    """All registered experiments, after importing the application modules that exist."""
    _load_apps()
    return dict(sorted(_REGISTRY.items()))


def _safe_tag(tag: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag) or "_"


@dataclass
class RunContext:
    """What an experiment's ``run(cfg, ctx)`` gets besides its settings."""

    out_dir: Path
    resume: bool = False
    progress: bool = True
    log: logging.Logger = field(default_factory=lambda: get_logger("run"))
    checkpoint_every: int = 0
    name: str = "run"
    config: Any = None
    quick: bool = False
    command: list[str] = field(default_factory=list)
    _start: float = field(default_factory=time.monotonic, init=False, repr=False)
    _started_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        init=False, repr=False,
    )
    _last: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _machine: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def results_path(self) -> Path:
        """``<out_dir>/results.json``."""
        return self.out_dir / RESULTS_FILE

    def checkpoint_path(self, tag: str) -> Path:
        """``<out_dir>/checkpoints/<tag>.pt`` (unsafe characters in ``tag`` become ``_``)."""
        return self.out_dir / CHECKPOINT_DIR / f"{_safe_tag(tag)}.pt"

    def should_checkpoint(self, step: int) -> bool:
        """True when ``checkpoint_every > 0`` and ``step`` (1-based, steps done) is a multiple."""
        return self.checkpoint_every > 0 and step > 0 and step % self.checkpoint_every == 0

    def save(self, tag: str, state: dict[str, Any]) -> Path:
        """Atomically save checkpoint ``tag``."""
        path = self.checkpoint_path(tag)
        save_checkpoint(path, state)
        self.log.debug("checkpoint %s saved", path)
        return path

    def load(self, tag: str) -> dict[str, Any] | None:
        """Checkpoint ``tag`` when resuming and it exists, else ``None``."""
        if not self.resume:
            return None
        state = load_checkpoint(self.checkpoint_path(tag))
        if state is not None:
            self.log.info("resuming '%s' from its checkpoint", tag)
        return state

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
        cfg = self.config
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            cfg = config_to_dict(cfg)
        doc: dict[str, Any] = {
            "experiment": self.name,
            "status": status,
            "wall_time_s": round(time.monotonic() - self._start, 3),
            "started_at": self._started_at,
            "resumed": self.resume,
            "quick": self.quick,
        }
        if error is not None:
            doc["error"] = error
        doc.update(results)
        doc.update(
            {"config": cfg, "command": self.command, "rbp_version": _version(),
             "machine": self._machine}
        )
        write_json(self.results_path, doc)
        return self.results_path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rbp")
    except PackageNotFoundError:
        return str(getattr(importlib.import_module("rbp"), "__version__", "unknown"))


def _check_methods(names: Sequence[str], valid: Sequence[str], source: str) -> None:
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown method '{name}' in {source}{hint} (valid: {', '.join(valid)}, all)"
            )


def _parse_methods(exp: Experiment, text: str) -> list[str] | None:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError("--method needs at least one method name or 'all'")
    if "all" in names:
        return list(exp.methods) if exp.methods else None
    if exp.methods:
        _check_methods(names, exp.methods, "--method")
    return names


def _add_common(p: argparse.ArgumentParser, exp: Experiment) -> None:
    choices = f" ({', '.join(exp.methods)})" if exp.methods else ""
    p.add_argument("--method", metavar="NAMES",
                   help=f"comma-separated methods to run, or 'all'{choices}")
    p.add_argument("--out", type=Path, default=Path("runs") / exp.name, metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="INT", help="random seed")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override one setting (repeatable; VALUE is YAML)")
    p.add_argument("--quick", action="store_true", help="small, fast settings for a smoke test")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its checkpoints")
    group.add_argument("--force", action="store_true",
                       help="overwrite an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")


def _settings_epilog(exp: Experiment) -> str:
    try:
        keys = ", ".join(config_fields(exp.config_cls))
    except TypeError:
        return ""
    return f"settings for --config / --set: {keys}"


def build_parser(exps: dict[str, Experiment]) -> argparse.ArgumentParser:
    """The ``rbp`` argument parser for the given experiments."""
    parser = argparse.ArgumentParser(
        prog="rbp", description="Recurrent back-propagation experiments."
    )
    parser.add_argument("--version", action="version", version=f"rbp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the experiments", description="List the experiments.")
    _add_tool_commands(sub)
    for exp in exps.values():
        p = sub.add_parser(exp.name, help=exp.help, description=exp.help,
                           epilog=_settings_epilog(exp))
        _add_common(p, exp)
        if exp.add_arguments is not None:
            exp.add_arguments(p)
        dests = {a.dest for a in p._actions}
        missing = sorted(set(exp.flag_to_key) - dests)
        if missing:
            raise ValueError(f"experiment '{exp.name}': flag_to_key names unknown flags {missing}")
    return parser


def _add_tool_commands(sub: Any) -> None:
    """``rbp sweep`` (a grid of runs) and ``rbp report`` (an HTML page of finished runs)."""
    from rbp.runner import report, sweep

    p = sub.add_parser("sweep", help="run a grid of runs of one experiment",
                       description="Run a grid of independent runs of one experiment, in "
                       "local worker processes or on a Ray cluster; re-run to resume.")
    sweep.add_arguments(p)
    p = sub.add_parser("report", help="one HTML page of finished runs",
                       description="Write one self-contained HTML page of the finished runs "
                       "(results.json) and sweeps (sweep.json) found under RESULTS_DIR.")
    report.add_arguments(p)


def _build_config(exp: Experiment, args: argparse.Namespace) -> Any:
    values: dict[str, Any] = {}
    if args.method is not None:
        methods = _parse_methods(exp, args.method)
        if methods is not None:
            values["methods"] = methods
    if args.seed is not None:
        values["seed"] = args.seed
    for dest, key in exp.flag_to_key.items():
        value = getattr(args, dest)
        if value is not None:
            values[key] = value
    default = exp.default_config or default_config_path(exp.name)
    cfg = load_config(exp.config_cls, default, args.config, args.overrides or [], args.quick,
                      values)
    methods_now = getattr(cfg, "methods", None)
    if exp.methods and isinstance(methods_now, list):
        _check_methods(methods_now, exp.methods, "setting 'methods'")
    return cfg


def _adopt_previous(ctx: RunContext, log: logging.Logger) -> None:
    """On resume: keep the earlier partial results and warn about changed settings."""
    try:
        prev = read_json(ctx.results_path)
    except (OSError, ValueError):
        return
    if not isinstance(prev, dict):
        return
    ctx._last = {k: v for k, v in prev.items() if k not in RESERVED_RESULT_KEYS}
    old = prev.get("config") or {}
    new = config_to_dict(ctx.config)
    changed = sorted(k for k in new if k in old and old[k] != new[k] and
                     not (isinstance(new[k], tuple) and list(new[k]) == old[k]))
    if changed:
        log.warning("resuming with changed settings: %s", ", ".join(changed))


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (and SIGINT, even when inherited as ignored, as under
    ``nohup ... &``) raise KeyboardInterrupt in the main thread, so that runs and sweeps
    record their state; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def _error(prog: str, message: object) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _finish_quietly(ctx: RunContext, status: str, error: str | None = None) -> None:
    try:
        ctx.write_results(ctx._last, status=status, error=error)
    except Exception as exc:  # never mask the original problem
        ctx.log.debug("could not record status %s: %s", status, exc)


def _run(exp: Experiment, args: argparse.Namespace, argv: list[str]) -> int:
    setup_logging(args.verbose)
    log = get_logger(exp.name)
    prog = f"rbp {exp.name}"
    try:
        cfg = _build_config(exp, args)
        out = prepare_run_dir(args.out, args.resume, args.force)
    except (ValueError, FileNotFoundError) as exc:
        _error(prog, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

    ctx = RunContext(
        out_dir=out, resume=args.resume, progress=not args.no_progress, log=log,
        checkpoint_every=int(getattr(cfg, "checkpoint_every", 0) or 0), name=exp.name,
        config=cfg, quick=args.quick, command=["rbp", *argv],
    )
    if args.resume:
        _adopt_previous(ctx, log)
        has_ckpt = any((out / CHECKPOINT_DIR).glob("*.pt"))
        if not has_ckpt:
            log.info("no checkpoints in %s; starting from the beginning", out)
    else:
        ctx.write_results({}, status="running")
    log.debug("settings: %s", config_to_dict(cfg))
    seed = getattr(cfg, "seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed)

    try:
        with interrupt_on_sigterm():  # `kill` (e.g. by a job scheduler) saves like Ctrl-C
            results = exp.run(cfg, ctx)
    except KeyboardInterrupt:
        _finish_quietly(ctx, "interrupted")
        again = [a for a in argv if a != "--force"]
        again = again if "--resume" in again else [*again, "--resume"]
        print(f"\n{prog}: interrupted; continue the run with: rbp {shlex.join(again)}",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        _finish_quietly(ctx, "failed", error=str(exc))
        if args.verbose:
            traceback.print_exc()
        _error(prog, exc if args.verbose else f"{exc} (run with -v for the traceback)")
        return 2
    except BaseException as exc:
        _finish_quietly(ctx, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    path = ctx.write_results(ctx._last if results is None else results, status="finished")
    log.info("results written to %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rbp`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    exps = experiments()
    parser = build_parser(exps)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "list":
        if not exps:
            print("no experiments are installed")
        width = max((len(n) for n in exps), default=0)
        for name, exp in exps.items():
            print(f"{name:<{width}}  {exp.help}")
        return 0
    if args.command in ("sweep", "report"):
        tool = importlib.import_module(f"rbp.runner.{args.command}")
        return int(tool.run_command(args))
    return _run(exps[args.command], args, argv)


if __name__ == "__main__":
    sys.exit(main())
