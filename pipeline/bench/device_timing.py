"""Timing on a device for the GPU check: synchronised, alternating, with a time budget."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


class Budget:
    """Parts of a measurement under one time limit: a part that would start after the limit is
    named in ``skipped``; one that fails is named with its error in ``failed``, and the others go on
    (one out-of-memory batch size must not cost a GPU session all its figures)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []
        self.failed: list[str] = []

    def run(self, part: str, fn: Callable[..., T], *args: Any, needs: float = 0.0) -> T | None:
        """``fn(*args)``, or None if it fails or less than ``needs`` seconds of the limit are left
        (a part that may take long must not start too late: the script's own limit kills it)."""
        if time.monotonic() + needs >= self.end:
            self.skipped.append(part)
            return None
        try:
            return fn(*args)
        except Exception as e:  # any failure of one part; its message goes to the JSON
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            self.failed.append(f"{part}: {type(e).__name__}: {first}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


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
