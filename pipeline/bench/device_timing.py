"""Timing on a device for the GPU check: synchronised, alternating, with a time budget."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


class PartTimeout(Exception):
    """A part ran past its own hard limit (``Budget.run``'s ``limit``)."""


@contextlib.contextmanager
def hard_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM; no limit off the
    main thread or when None): a torch.compile that takes minutes must not eat the whole check."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"over its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """Parts of a measurement under one time limit: a part that would start after the limit is
    named in ``skipped``; one that fails (or runs past its own ``limit``) is named with its error in
    ``failed``, and the others go on (one out-of-memory batch size must not cost a GPU session all
    its figures). ``on_start(part)`` is called before each part that starts (a partial JSON naming
    the part a kill would interrupt) and ``on_start(None)`` after it."""

    def __init__(self, seconds: float, on_start: Callable[[str | None], None] | None = None):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.on_start = on_start or (lambda part: None)

    def run(self, part: str, fn: Callable[..., T], *args: Any, needs: float = 0.0,
            limit: float | None = None) -> T | None:
        """``fn(*args)``, or None if it fails, runs past ``limit`` seconds, or less than ``needs``
        seconds of the budget are left (a part that may take long must not start too late: the
        script's own limit kills it)."""
        if time.monotonic() + needs >= self.end:
            self.skipped.append(part)
            return None
        self.on_start(part)
        try:
            with hard_limit(limit):
                return fn(*args)
        except Exception as e:  # any failure of one part; its message goes to the JSON
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            self.failed.append(f"{part}: {type(e).__name__}: {first}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        finally:
            self.on_start(None)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str, fn: Callable[[], None], times: int) -> float | None:
    """Run ``fn`` ``times`` times (warm-up); its peak device memory in GiB (None off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(times):
        fn()
    sync(device)
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def timed(fns: Sequence[Callable[[], None]], repeats: int, device: str) -> list[float]:
    """Median seconds of each of ``fns``, run alternately ``repeats`` times."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
