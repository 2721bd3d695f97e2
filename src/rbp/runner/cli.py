"""The ``rbp`` command: one sub-command per registered experiment.

An application registers itself at import time (in its package ``__init__``)::

    register(Experiment(name="hopfield", help="...", config_cls=HopfieldConfig, run=run))

``rbp <name> [options] [KEY=VALUE ...]`` then loads and checks the settings and hands them to
:func:`rbp.runner.lifecycle.run_experiment`, which owns the run directory, checkpoints,
resume, interrupts and ``results.json``. Importing this module loads neither torch nor any
application: the built-in applications are imported only when their command runs, so
``rbp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbp.runner.arguments import add_experiment, suggestions
from rbp.runner.config import ConfigError, build_config, config_fields, parse_methods

# The registry (Experiment, register, BUILTIN_APPS...) lives in rbp.runner.registry, below
# this module, so that applications register without importing the CLI.
from rbp.runner.registry import (
    _REGISTRY,
    APP_MODULES,
    BUILTIN_APPS,
    Experiment,
    experiments,
    register,
    unregister,
)
from rbp.runner.registry import import_app as _import_app

if TYPE_CHECKING:
    from rbp.runner.lifecycle import RunContext

__all__ = [
    "APP_MODULES",
    "BUILTIN_APPS",
    "Experiment",
    "RunContext",
    "build_parser",
    "experiments",
    "main",
    "register",
    "unregister",
]

_TOOLS = {
    "sweep": "run a grid of runs of one experiment",
    "report": "one HTML page of finished runs",
}


def __getattr__(name: str) -> Any:
    # Kept for code written against the older layout; imported on use (they load torch).
    if name in ("RunContext", "RESERVED_RESULT_KEYS", "interrupt_on_sigterm"):
        from rbp.runner import lifecycle

        return getattr(lifecycle, name)
    raise AttributeError(f"module 'rbp.runner.cli' has no attribute {name!r}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-rbp")
    except PackageNotFoundError:
        return "unknown"


def _parse_methods(exp: Experiment, text: str) -> list[str] | None:
    return parse_methods(text, exp.methods, "--method")


def build_parser(exps: dict[str, Experiment]) -> argparse.ArgumentParser:
    """The ``rbp`` argument parser for the given experiments.

    Built-in applications and tools not among ``exps`` get a placeholder that shows their
    help line (so the top-level ``--help`` imports nothing).
    """
    parser = argparse.ArgumentParser(
        prog="rbp", description="Recurrent back-propagation experiments."
    )
    parser.add_argument("--version", action="version", version=f"rbp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the experiments", description="List the experiments.")
    _add_tool_commands(sub, real=False)
    for name, (_, help_text) in BUILTIN_APPS.items():
        if name not in exps:
            sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    for exp in exps.values():
        add_experiment(sub, exp)
    return parser


def _add_tool_commands(sub: Any, real: bool = True, only: str | None = None) -> None:
    """``rbp sweep`` (a grid of runs) and ``rbp report`` (an HTML page of finished runs);
    placeholders unless ``real`` (the real ones import their modules)."""
    descriptions = {
        "sweep": "Run a grid of independent runs of one experiment, in local worker processes "
                 "or on a Ray cluster; re-run to resume.",
        "report": "Write one self-contained HTML page of the finished runs (results.json) and "
                  "sweeps (sweep.json) found under RESULTS_DIR.",
    }
    for name, help_text in _TOOLS.items():
        if real and name == only:
            p = sub.add_parser(name, help=help_text, description=descriptions[name])
            importlib.import_module(f"rbp.runner.{name}").add_arguments(p)
        else:
            sub.add_parser(name, help=help_text, description=descriptions[name],
                           add_help=False)


def _build_config(exp: Experiment, args: argparse.Namespace) -> Any:
    """Settings from parsed ``rbp <exp>`` arguments (see :func:`rbp.runner.config.build_config`)."""
    values: dict[str, Any] = {}
    if args.method is not None:
        methods = _parse_methods(exp, args.method)
        if methods is not None:
            values["methods"] = methods
    if args.seed is not None:
        values["seed"] = args.seed
    if getattr(args, "data_dir", None) is not None:
        if "data_dir" not in config_fields(exp.config_cls):
            raise ConfigError(f"experiment '{exp.name}' has no setting 'data_dir' for --data-dir")
        values["data_dir"] = args.data_dir
    if getattr(args, "device", None) is not None:
        if "device" not in config_fields(exp.config_cls):
            raise ConfigError(f"experiment '{exp.name}' has no setting 'device' for --device")
        values["device"] = args.device
    for dest, key in exp.flag_to_key.items():
        value = getattr(args, dest)
        if value is not None:
            values[key] = value
    overrides = [*(args.overrides or []), *getattr(args, "settings", [])]
    return build_config(exp, overrides, config_file=args.config, quick=args.quick,
                        values=values)


def _error(prog: str, message: object) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _dry_run(exp: Experiment, cfg: Any, out: Path, resume: bool, force: bool,
             reuse_from: list[Path] | None = None) -> int:
    """Check what a run would need without running it: exit 0 when all is in place."""
    prog = f"rbp {exp.name}"
    problems: list[str] = []
    print(f"{prog}: settings are valid")
    lines: list[str] = []
    if exp.check_data is not None:
        from rbp.runner.registry import check_experiment_data

        try:
            lines = check_experiment_data(exp, cfg)
        except (ValueError, FileNotFoundError) as exc:
            problems.append(f"data: {exc}")
    for line in lines:
        print(f"  data: {line}")
    out = Path(out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        problems.append(f"--out {out}: {probe} is not a directory")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"--out {out}: {probe} is not writable")
    else:
        from rbp.runner.lock import describe_holder, lock_holder
        from rbp.runner.results import RunExistsError, check_run_dir

        holder = lock_holder(out)
        if holder is not None:
            problems.append(f"--out {out}: another run ({describe_holder(holder)}) is writing "
                            "there; wait for it to end or choose another --out")
        try:
            check_run_dir(out, resume, force)
            if resume and out.is_dir():  # what --resume would refuse: unknown or other settings
                from rbp.runner.resume import check_resume, previous_results

                check_resume(out, previous_results(out), cfg, exp.name)
        except RunExistsError as exc:
            problems.append(str(exc))
    from rbp.runner.lifecycle import reuse_problems
    from rbp.runner.results import CHECKPOINT_DIR

    problems += reuse_problems(out, reuse_from or [])
    for other in reuse_from or []:
        found = len(list((Path(other) / CHECKPOINT_DIR).glob("*.pt")))
        print(f"  reuse: {other} ({found} checkpoint(s) there now; finished units with these "
              "settings are taken, not trained)")
    for problem in problems:
        _error(prog, problem)
    if not problems:
        print(f"{prog}: ready to run into {out}")
    return 2 if problems else 0


def _run(exp: Experiment, args: argparse.Namespace, argv: list[str]) -> int:
    from rbp.runner.progress import get_logger, setup_logging

    setup_logging(args.verbose)
    log = get_logger(exp.name)
    prog = f"rbp {exp.name}"
    try:
        cfg = _build_config(exp, args)
    except (ValueError, FileNotFoundError) as exc:
        _error(prog, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if args.dry_run:
        return _dry_run(exp, cfg, args.out, args.resume, args.force, args.reuse_from)
    from rbp.runner.lifecycle import run_experiment

    return run_experiment(exp.name, exp.run, cfg, args.out, resume=args.resume,
                          force=args.force, quick=args.quick,
                          show_progress=not args.no_progress, verbose=args.verbose,
                          command=["rbp", *argv], log=log, reuse_from=args.reuse_from)


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The sub-command's parser (its usage line is the one to show), else ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, "command", None))
            if sub is not None:
                return sub
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
        if arg in ("-h", "--help", "--version"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rbp`` command; returns the exit status (130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. Ctrl-C while torch loads; runs handle their own
        print("rbp: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    command = _command_of(argv)
    if command in BUILTIN_APPS and command not in _REGISTRY:
        if not {"-h", "--help"} & set(argv):
            print(f"rbp {command}: loading torch and the experiment ...", file=sys.stderr,
                  flush=True)
        _import_app(BUILTIN_APPS[command][0])
    exps = dict(sorted(_REGISTRY.items()))
    if command is not None and command not in exps and command != "list" and \
            command not in _TOOLS:
        exps = experiments()  # an unknown command: let argparse list every experiment
    parser = build_parser(exps)
    if command in _TOOLS:
        parser = argparse.ArgumentParser(prog="rbp")
        tool_sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        _add_tool_commands(tool_sub, real=True, only=command)
    try:
        args, extra = parser.parse_known_args(argv)
        if hasattr(args, "settings"):  # KEY=VALUE words after options (argparse takes one run)
            kv = [a for a in extra if "=" in a and not a.startswith("-")]
            args.settings = [*args.settings, *kv]
            extra = [a for a in extra if a not in kv]
        if extra:
            sub = _command_parser(parser, args)
            sub.error(f"unrecognized arguments: {' '.join(extra)}"
                      f"{suggestions(sub, parser, extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "list":
        names = {n: e.help for n, e in exps.items()}
        for name, (_, help_text) in BUILTIN_APPS.items():
            names.setdefault(name, help_text)
        width = max((len(n) for n in names), default=0)
        for name, help_text in sorted(names.items()):
            print(f"{name:<{width}}  {help_text}")
        return 0
    if args.command in _TOOLS:
        tool = importlib.import_module(f"rbp.runner.{args.command}")
        return int(tool.run_command(args))
    if args.command not in exps:  # a built-in whose module is not installed
        _error("rbp", f"experiment '{args.command}' is not installed")
        return 2
    return _run(exps[args.command], args, argv)


if __name__ == "__main__":
    sys.exit(main())
