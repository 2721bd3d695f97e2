"""The options of ``rbp <experiment>``: its argument parser, built for the CLI and for a sweep
that checks its points' flags before it starts any."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbp.runner.config import DATA_DIR_ENV, ConfigError, config_fields
from rbp.runner.registry import Experiment

__all__ = ["add_experiment", "check_flags", "suggestions"]


def add_experiment(sub: Any, exp: Experiment) -> argparse.ArgumentParser:
    """Add ``rbp <exp.name>`` (its common options and its own) to subparsers ``sub``."""
    p = sub.add_parser(exp.name, help=exp.help, description=exp.help,
                       epilog=_settings_epilog(exp))
    _add_common(p, exp)
    if exp.add_arguments is not None:
        exp.add_arguments(p)
    dests = {a.dest for a in p._actions}
    missing = sorted(set(exp.flag_to_key) - dests)
    if missing:
        raise ValueError(f"experiment '{exp.name}': flag_to_key names unknown flags {missing}")
    return p


def _add_common(p: argparse.ArgumentParser, exp: Experiment) -> None:
    choices = f" ({', '.join(exp.methods)})" if exp.methods else ""
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="override settings (VALUE is YAML), same as --set KEY=VALUE")
    p.add_argument("--method", metavar="NAMES",
                   help=f"comma-separated methods to run, or 'all'{choices}")
    p.add_argument("--out", type=Path, default=Path("runs") / exp.name, metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="INT", help="random seed")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"where the data sets are (setting 'data_dir'; environment variable "
                        f"{DATA_DIR_ENV}; default: the data shipped with rbp)")
    p.add_argument("--device", metavar="NAME",
                   help="where the run lives: auto (CUDA when available, else CPU), cpu, "
                        "cuda, cuda:N or mps (setting 'device')")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override one setting (repeatable; VALUE is YAML)")
    p.add_argument("--quick", action="store_true", help="small, fast settings for a smoke test")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run (with its own settings) from its "
                            "checkpoints")
    group.add_argument("--force", action="store_true",
                       help="delete the run in --out and start a new one")
    p.add_argument("--reuse-from", action="append", type=Path, default=[], metavar="DIR",
                   help="another run's --out whose finished units this run takes instead of "
                        "training them (repeatable; e.g. a worker over other seeds)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings, the output directory and the data; run nothing")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")


def _settings_epilog(exp: Experiment) -> str:
    try:
        keys = ", ".join(config_fields(exp.config_cls))
    except TypeError:
        return ""
    return (f"settings for KEY=VALUE / --set / --config: {keys}. Later sources win: the "
            f"packaged defaults, its 'quick:' section (--quick), --config FILE, "
            f"${DATA_DIR_ENV} (data_dir only), --set and KEY=VALUE, then the flags.")


def check_flags(exp: Experiment, flags: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when ``rbp <exp.name>`` would refuse ``flags`` (an unknown
    option, a missing or bad value), with argparse's reason; a sweep checks its points' flags
    with it before it starts any."""
    parser = argparse.ArgumentParser(prog="rbp")
    sub = add_experiment(parser.add_subparsers(dest="command"), exp)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _, extra = parser.parse_known_args([exp.name, *flags])
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise ConfigError(f"rbp {exp.name} {' '.join(flags)}: prints its help and runs "
                              "nothing; leave the help flag out") from None
        reason = stderr.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        raise ConfigError(f"rbp {exp.name} {' '.join(flags)}: "
                          f"{reason[0].partition('error: ')[2] or reason[0]}") from None
    extra = [a for a in extra if not ("=" in a and not a.startswith("-"))]
    if extra:
        raise ConfigError(f"rbp {exp.name} does not take {' '.join(extra)}"
                          f"{suggestions(sub, parser, extra)}")


def suggestions(sub: argparse.ArgumentParser, parser: argparse.ArgumentParser,
                extra: Sequence[str]) -> str:
    """``; did you mean --quick?`` for unrecognized options close to one of the command's
    (``sub``, the command's parser, or ``parser`` above it)."""
    options = [o for a in sub._actions for o in a.option_strings]
    if sub is not parser:
        options += [o for a in parser._actions for o in a.option_strings]
    hints = []
    for word in extra:
        if not word.startswith("--"):
            continue
        close = difflib.get_close_matches(word.partition("=")[0], options, n=1, cutoff=0.6)
        if close:
            hints.append((word.partition("=")[0], close[0]))
    if not hints:
        return ""
    if len(hints) == 1:
        return f"; did you mean {hints[0][1]}?"
    return f"; did you mean {', '.join(f'{w} -> {o}' for w, o in hints)}?"
