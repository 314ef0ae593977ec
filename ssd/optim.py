"""Optimisers and learning-rate schedules for detector training.

Schedules are functions ``step -> factor`` of the base learning rate, for
``torch.optim.lr_scheduler.LambdaLR``: a linear warm-up from
``warmup_factor`` to 1 over ``warmup_steps``, then a cosine decay to
``min_factor`` at ``total_steps``, a step decay (multiply by ``gamma`` at each
milestone, given as fractions of ``total_steps``, as ssd.pytorch's 80k/100k of
120k iterations), or a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import torch
from torch import nn

from ssd.bounds import AtLeast, Below, Count, Fraction, PositiveFloat, PositiveInt


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "adamw"
    """SGD with momentum (the SSD paper's) or AdamW (faster from scratch on small data)."""
    lr: PositiveFloat = 1e-3
    """Base learning rate (per optimiser step, whatever the number of processes)."""
    momentum: Annotated[float, AtLeast(0), Below(1)] = 0.9
    """SGD momentum (ignored by AdamW)."""
    weight_decay: Annotated[float, AtLeast(0)] = 5e-4
    """L2 penalty (SGD) / decoupled weight decay (AdamW); not applied to biases and norms."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """Shape of the learning rate after the warm-up."""
    warmup_steps: Count = 100
    """Linear warm-up length in optimiser steps."""
    warmup_factor: Fraction = 0.001
    """Learning rate at step 0, as a fraction of ``lr``."""
    min_factor: Fraction = 0.0
    """Cosine: final learning rate as a fraction of ``lr``."""
    milestones: tuple[Fraction, ...] = (0.67, 0.83)
    """Step: where to decay, as fractions of the total steps (ssd.pytorch: 80k and 100k of 120k)."""
    gamma: PositiveFloat = 0.1
    """Step: decay factor at each milestone."""
    lr_factors: dict[str, PositiveFloat] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name prefix (``{"temporal": 10}``: the modules
    under ``temporal.``), e.g. for layers new to a model started from a trained one; the
    longest matching prefix wins, other parameters get 1."""
    grad_clip: Annotated[float, AtLeast(0)] = 0.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    grad_accum: PositiveInt = 1
    """Micro-batches accumulated per optimiser step."""

    def __post_init__(self) -> None:
        # Also checked where configs are parsed (ssd.bounds); here for direct construction.
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        bad = {k: v for k, v in self.lr_factors.items() if not v > 0}
        if bad:
            raise ValueError(f"lr_factors must be positive, got {bad}")


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of ``config`` over ``model``'s trainable parameters.

    Weight decay applies to weights of convolutions and linear layers only, not to
    biases, batch-norm parameters or L2Norm scales (decaying those only hurts). Each
    parameter group carries ``"backbone": bool`` (parameters named ``backbone.*``), so a
    schedule can hold the backbone still for a while (:func:`group_factors`), and its own
    learning rate, ``config.lr`` times the factor of ``config.lr_factors`` that applies.

    Raises:
        ValueError: an ``lr_factors`` prefix that names no trainable parameter (a misspelt
            module name would otherwise change no learning rate, silently).
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for prefix in config.lr_factors:
        if not any(_matches(name, prefix) for name in trainable):
            tops = sorted({name.split(".")[0] for name in trainable})
            raise ValueError(f"optim.lr_factors: {prefix!r} names no trainable parameter of the model "
                             f"(its top-level modules: {', '.join(tops)})")
    buckets: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), p.ndim > 1, _lr_factor_of(name, config.lr_factors))
        buckets.setdefault(key, []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "backbone": backbone,
            "lr": config.lr * factor,
        }
        for (backbone, decay, factor), params in sorted(buckets.items())
    ]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def _lr_factor_of(name: str, factors: dict[str, float]) -> float:
    matches = [p for p in factors if _matches(name, p)]
    return float(factors[max(matches, key=len)]) if matches else 1.0


def group_factors(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, freeze_backbone_steps: int = 0
) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` factor per parameter group: :func:`lr_factor`, and 0 for the backbone's
    groups during the first ``freeze_backbone_steps`` steps (the LSTM-SSD paper's stage-wise
    training: the new layers learn on a fixed backbone first). A zero learning rate freezes
    the weights for SGD and AdamW alike (weight decay is scaled by it too) while every
    process still computes every gradient, which keeps DDP's gradient buckets unchanged."""
    base = lr_factor(config, total_steps)

    def frozen(step: int) -> float:
        return 0.0 if step < freeze_backbone_steps else base(step)

    return [frozen if g.get("backbone") else base for g in optimizer.param_groups]


def lr_factor(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """``step -> factor`` for ``LambdaLR`` (step counts optimiser steps from 0)."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            alpha = step / max(1, config.warmup_steps)
            return config.warmup_factor + (1 - config.warmup_factor) * alpha
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "step":
            passed = sum(step >= m * total_steps for m in config.milestones)
            return config.gamma**passed
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_factor + (1 - config.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
