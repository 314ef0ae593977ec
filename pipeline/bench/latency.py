"""CPU forward latency of models timed side by side (the prune stage's before/after figures)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pipeline.bench.chain import time_steps


def cpu_latency_ms(
    models: Sequence[nn.Module], image_size: int, batch: int = 1, runs: int = 30, warmup: int = 5, threads: int = 0
) -> list[float]:
    """Median wall time of one forward of each model on the CPU, in milliseconds.

    The models run alternately, one forward each per round (the benchmark's
    :func:`pipeline.bench.chain.time_steps`), so a change in the machine's load hits all
    of them alike and their ratio stays meaningful on a shared machine. Copies of the
    models are timed in eval mode (the caller's are left where they are). A temporal
    model carries its state from call to call, as when streaming a video.
    """
    x = torch.rand(batch, 3, image_size, image_size)
    steps = [(str(i), _forward_step(copy.deepcopy(m).cpu().eval(), x)) for i, m in enumerate(models)]
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        seconds, _ = time_steps(steps, runs, warmup, torch.device("cpu"))
    finally:
        torch.set_num_threads(previous_threads)
    return [seconds[str(i)] * 1000.0 for i in range(len(models))]


def _forward_step(model: nn.Module, x: torch.Tensor) -> Callable[[Any], None]:
    """One forward of ``model`` on ``x`` per call; a temporal model's state goes from call to call."""
    state = None

    def step(_: Any) -> None:
        nonlocal state
        if getattr(model, "is_temporal", False):
            _, _, state = model(x, state=state)
        else:
            model(x)

    return step
