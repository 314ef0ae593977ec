"""Training-step benchmark: where a step's time goes beyond the network itself.

Two figures on the same model, batch size and input size:

- ``bare``: forward and backward of a fixed batch with a trivial loss (the sum of the
  outputs), no optimiser: the floor a training step can't go under;
- ``full``: what pipeline/train.py does per step: the next batch from the shard loader
  (with its workers), matching and the MultiBox loss, backward, gradient clipping and the
  optimiser step.

``overhead = 1 - full_images_per_s / bare_images_per_s`` is the share of a step spent on
everything but the network (data wait, matching, loss, optimiser).
"""

from __future__ import annotations

import math
import time

import torch

from ssd.data.loader import train_loader
from ssd.data.transforms import AugmentConfig
from ssd.loss import MultiBoxLoss
from ssd.optim import OptimConfig, build_optimizer
from ssd.pruned_widths import rebuild_model


def run(
    shards: list[str],
    num_classes: int,
    arch: dict,
    batch_size: int = 16,
    num_workers: int = 2,
    steps: int = 30,
    warmup: int = 5,
    samples: int = 2000,
    device: str = "cpu",
) -> dict:
    """Images/s of the bare and the full step (medians over ``steps`` after ``warmup``).

    ``arch``: a model file's arch (a pruned one too); ``device``: where the model runs (on
    CUDA the device is synchronised after every step, so a step's queued kernels count).
    """
    torch.manual_seed(0)
    model = rebuild_model({**arch, "num_classes": num_classes}).to(device).train()
    criterion = MultiBoxLoss(model.priors).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    loader = train_loader(
        shards, AugmentConfig(), image_size=model.image_size, rank=0, world_size=1, seed=0, epoch=0,
        batches_per_epoch=max(warmup + steps, math.ceil(samples / batch_size)), batch_size=batch_size,
        num_workers=num_workers, streams=max(2, num_workers),
    )
    batches = iter(loader)
    fixed = next(batches).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def bare() -> None:
        logits, deltas = model(fixed.images)
        (logits.float().sum() + deltas.float().sum()).backward()
        model.zero_grad(set_to_none=True)

    def full() -> None:
        batch = next(batches).to(device)
        out = criterion(*model(batch.images), batch.targets)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"batch_size": batch_size, "image_size": model.image_size, "num_workers": num_workers,
              "threads": torch.get_num_threads()}
    for name, fn in (("bare", bare), ("full", full)):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        median = times[len(times) // 2]
        result[f"{name}_images_per_s"] = round(batch_size / median, 2)
        result[f"{name}_step_ms"] = round(median * 1e3, 2)
    result["overhead"] = round(1 - result["full_images_per_s"] / result["bare_images_per_s"], 4)
    return result
