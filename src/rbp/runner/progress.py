"""Progress bars and logging that do not garble each other."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["get_logger", "progress", "setup_logging"]

T = TypeVar("T")

_ROOT = "rbp"


def progress(
    iterable_or_total: Iterable[T] | int, desc: str = "", enabled: bool = True, **kwargs: Any
) -> tqdm:
    """A tqdm bar over an iterable, or over ``range``-less counting when given an int total.

    Shown only when ``enabled`` and stderr is a terminal. Apps call ``bar.set_postfix(loss=...)``
    and, for an int total, ``bar.update()``. Extra keyword arguments (``initial=`` when
    resuming, ``leave=``...) go to tqdm.
    """
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    disable = None if enabled else True
    if isinstance(iterable_or_total, int):
        return tqdm(total=iterable_or_total, desc=desc, disable=disable, **kwargs)
    return tqdm(iterable_or_total, desc=desc, disable=disable, **kwargs)


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``rbp`` hierarchy (``"hopfield"`` -> ``rbp.hopfield``)."""
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


class _TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write`` to the current ``sys.stderr`` so bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Send ``rbp.*`` log records to stderr at INFO (DEBUG when ``verbose``); idempotent."""
    logger = logging.getLogger(_ROOT)
    for handler in list(logger.handlers):
        if isinstance(handler, _TqdmHandler):
            logger.removeHandler(handler)
    handler = _TqdmHandler()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "[%(name)s] %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logger
