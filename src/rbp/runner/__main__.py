"""``rbp`` / ``python -m rbp.runner``: the command line, or a clear word when the extra is missing.

This module imports only the standard library before it has checked that the experiment kit's
dependencies (``pip install "torch-rbp[experiments]"``) are installed, so a core-only install gets a
one-line message instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

#: Import names of the ``experiments`` extra that the command line needs.
NEEDED = ("yaml", "numpy", "scipy", "sklearn", "matplotlib", "tqdm", "threadpoolctl", "jinja2")


def missing_modules() -> list[str]:
    """The modules of :data:`NEEDED` that cannot be found."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the extra, then run :func:`rbp.runner.cli.main`."""
    missing = missing_modules()
    if missing:
        print(f"rbp: the command line needs the experiments extra (missing: "
              f"{', '.join(missing)}); install it with: pip install \"torch-rbp[experiments]\"",
              file=sys.stderr)
        return 2
    from rbp.runner.cli import main as cli_main
    from rbp.runner.signals import interrupt_on_sigterm

    try:
        with interrupt_on_sigterm():  # a sweep stops its points with SIGINT, even under nohup
            code = cli_main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except KeyboardInterrupt:
        print("rbp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rbp sweep SPEC --dry-run | head`: the reader has gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to say, and no exit traceback
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
