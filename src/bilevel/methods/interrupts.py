"""SIGINT and SIGTERM during a run: SIGTERM (what schedulers and ``timeout`` send) raises
:class:`Terminated`, a KeyboardInterrupt, and both signals are held while a step is committed,
so that an interrupt always finds the state at a step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Terminated", "deferred_interrupts", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM received during a run: handled like Ctrl-C (checkpoint, status "interrupted")."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for sig in _DEFERRED:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # signals unavailable here
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif sig == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so that a
    run stopped by a scheduler or ``timeout`` writes its checkpoint (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
