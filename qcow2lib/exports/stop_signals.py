"""Stopping a server on SIGINT or SIGTERM without killing it half-way: the signals wait
while the server starts, then call its shutdown (which must be safe from a handler)."""

from __future__ import annotations

import signal
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def hold_stop_signals(cleanup: ExitStack) -> None:
    """Block SIGINT and SIGTERM until stop_on_signals() is entered: one that arrives while
    the image opens or the server starts waits and then stops the server cleanly, instead
    of killing the process half-way. (Threads started meanwhile keep them blocked, so
    they go to the main thread, where Python runs handlers anyway.) `cleanup` restores
    the caller's signal mask, also when the command fails before serving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    cleanup.callback(signal.pthread_sigmask, signal.SIG_SETMASK, previous)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM calls stop() (a server's shutdown, which
    must be safe from a signal handler) instead of killing the process or raising; later
    ones do nothing, so that a shutdown is never interrupted by another. Signals held by
    hold_stop_signals() are delivered on entry."""
    signalled: list[int] = []

    def handler(signum, frame) -> None:
        if not signalled:
            signalled.append(signum)
            stop()

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
