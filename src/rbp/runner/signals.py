"""Signals as exceptions: SIGTERM/SIGINT raise KeyboardInterrupt, or wait for a write to end.

Standard library only, so that the command line can install the handlers before it loads torch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["deferred_interrupts", "interrupt_on_sigterm"]


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


@contextlib.contextmanager
def deferred_interrupts(notice: str | None = None) -> Iterator[None]:
    """Hold SIGINT/SIGTERM that arrive within the block and raise KeyboardInterrupt after it,
    so a file write is never cut in half by a signal. An exception raised inside still
    escapes, as KeyboardInterrupt (caused by it) when a signal was held, so that no handler
    of that exception swallows the interrupt. ``notice`` is printed to stderr when the first
    signal is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if notice is not None and not caught:
            print(notice, file=sys.stderr, flush=True)
        caught.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception as exc:
        if caught:
            raise KeyboardInterrupt from exc
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if caught:
        raise KeyboardInterrupt
