"""Exponential moving average of a model's weights, on :class:`torch.optim.swa_utils.AveragedModel`.

The averaged copy is what validation and the final model use: it follows the trained
weights with a lag, averaging out the noise of the last few hundred steps, which matters
most when a short run ends while the learning rate is still high.

The decay warms up: the update after ``n`` updates uses ``min(decay, (1 + n) / (10 + n))``, so the
average is not dominated by the random initial weights in a run of a few hundred steps
(with a fixed 0.999 the initial weights would still weigh ``0.999**500 = 0.61`` after
500 steps). Buffers (batch-norm statistics) are averaged like the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ssd.bounds import AtLeast, Below


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights; validation and the model file use it.
    Off by default: with a cosine schedule that ends near zero the last weights are already an
    average, and on the sample the EMA's final mAP equalled theirs while lagging ~150 steps behind
    mid-run (docs/training.md). Worth it with a constant or step schedule, or a run cut short."""
    decay: Annotated[float, AtLeast(0), Below(1)] = 0.998
    """Weight of the average at each update, once warmed up (see :func:`ema_decay`); below 1 (at 1
    the average would never leave its first copy, the weights after step 1)."""


def ema_decay(decay: float, n: int) -> float:
    """The decay of the update that follows ``n`` updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


def averaged(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (weights and buffers) on the model's device.

    Call ``update_parameters(model)`` after every optimiser step; ``.module`` is the averaged
    model. Its ``state_dict()`` holds ``n_averaged`` and the copy's tensors (``module.*``).
    """

    @torch.no_grad()
    def update(averages: list[torch.Tensor], current: list[torch.Tensor], n_averaged: Any) -> None:
        # n_averaged counts the updates so far (the first one, a plain copy, made it 1).
        get_ema_multi_avg_fn(ema_decay(decay, int(n_averaged)))(averages, current, n_averaged)

    device = next(iter(model.parameters())).device
    return AveragedModel(model, device=device, multi_avg_fn=update, use_buffers=True)
