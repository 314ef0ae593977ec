"""Preemption signals: SIGTERM/SIGINT become a flag the loop reads between steps."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

log = logging.getLogger("pipeline.train")


class StopFlag:
    """SIGTERM/SIGINT set a flag (no collectives in a signal handler); a second SIGINT aborts."""

    def __init__(self, then: str = "finishing the current step, then saving a checkpoint") -> None:
        self.requested = False
        self.then = then
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: %s", signal.Signals(signum).name, self.then)


@contextlib.contextmanager
def signals_blocked():
    """SIGTERM and SIGINT held back (not lost) inside the block: processes forked there inherit the block."""
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
