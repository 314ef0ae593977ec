"""Training speed for the GPU check (:mod:`pipeline.bench.gpu`): our step, torchvision's, and the
real training stage from shards.

- :func:`our_step`: forward + MultiBox loss + backward + optimiser step of one of our models on a
  batch already on the device (the ``limit``: nothing to wait for but the GPU);
- :func:`peer_step`: torchvision's model of the same family with its own loss and matching, on
  the same images and boxes (``ssd300_vgg16`` for SSD300-VGG16; ``ssdlite320_mobilenet_v3_large``,
  a MobileNetV3 backbone, for our MobileNetV2 SSDLite: the nearest torchvision has);
- :func:`training_loop`: ``pipeline.train`` itself for a few dozen steps, loader workers reading
  the shards and augmenting, through Accelerate: its images/s and the fraction of the time it
  waited for data.

A precision is ``fp32`` (IEEE float32), ``tf32`` (float32 with TF32 matmuls and convolutions),
``bf16`` or ``fp16`` (autocast; fp16 through a gradient scaler). Every step ends with the
optimiser's update; timing synchronises the device (:func:`pipeline.bench.gpu.timed`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import device as device_setup
from ssd.loss import MultiBoxLoss
from ssd.models import build_model
from ssd.optim import OptimConfig, build_optimizer

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
#: Our model families at their usual input sizes, and torchvision's nearest model.
MODELS = {
    "ssd300_vgg16": ({"name": "ssd300_vgg16", "image_size": 300}, "ssd300_vgg16"),
    "ssdlite_mobilenet_v2": ({"name": "ssdlite_mobilenet_v2", "image_size": 320}, "ssdlite320_mobilenet_v3_large"),
}
NUM_CLASSES = 21  # Pascal VOC's 20 and the background


def autocast(precision: str, device: str):
    """The autocast context of a precision (none for fp32/tf32); sets TF32 for the float32 ones."""
    device_setup.set_tf32(precision != "fp32")
    if precision in ("bf16", "fp16"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def synthetic_batch(batch: int, size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """``images [B, 3, S, S]`` in [0, 1] and B targets of 1-6 boxes (normalised corners, labels 1-20)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = 0.05 + torch.rand(n, 2, generator=g) * 0.35
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=1.0)], 1),
                        "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g)})
    return images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def _stepper(optimizer, loss_of: Callable[[], torch.Tensor], precision: str, device: str) -> Callable[[], None]:
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

    def step() -> None:
        loss = loss_of()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_step(name: str, images: torch.Tensor, targets: list[dict], precision: str, device: str,
             channels_last: bool = False, compile_backend: str | None = None) -> Callable[[], None]:
    """One optimisation step of our ``name`` model on ``images [B, 3, S, S]`` (on ``device``)."""
    torch.manual_seed(0)
    model = build_model({**MODELS[name][0], "num_classes": NUM_CLASSES}).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    criterion = MultiBoxLoss(model.priors).to(device)

    def loss_of() -> torch.Tensor:
        with autocast(precision, device):
            logits, deltas = forward(images)
        return criterion(logits, deltas, targets)["loss"]  # matching and loss in float32

    return _stepper(build_optimizer(model, OptimConfig()), loss_of, precision, device)


def peer_model(name: str):
    """torchvision's untrained model of the family of our ``name``."""
    from torchvision.models import detection

    return getattr(detection, MODELS[name][1])(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


def peer_step(name: str, images: torch.Tensor, targets: list[dict], precision: str, device: str) -> Callable[[], None]:
    """One optimisation step of torchvision's model with its own loss on the same batch (pixel boxes)."""
    torch.manual_seed(0)
    model = peer_model(name).to(device).train()
    size = images.shape[-1]
    frames = list(images)
    pixel = [{"boxes": t["boxes"] * size, "labels": t["labels"]} for t in targets]

    def loss_of() -> torch.Tensor:
        with autocast(precision, device):  # torchvision's reference trains with its loss inside autocast
            losses = model(frames, pixel)
        return sum(losses.values())

    # torchvision's detection reference's optimiser.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return _stepper(optimizer, loss_of, precision, device)


def training_loop(name: str, precision: str, batch: int, steps: int, shards: str, num_workers: int,
                  workdir: Path, colour_on_device: bool = False) -> dict[str, Any]:
    """``pipeline.train`` for ``steps`` steps from ``shards``: images/s (the median of its logged
    windows after the first) and its data-wait fraction. ``colour_on_device``: the workers leave
    the colour change to the training process (``photometric_device``); else SSD's augmentation."""

    from pipeline.config import from_dict
    from pipeline.train import TrainConfig, train

    run_name = f"gpu-{name}-{precision}-{batch}" + ("-colour-on-device" if colour_on_device else "")
    augment = {"photometric_first": False, "photometric_device": True} if colour_on_device else {}
    cfg = from_dict(TrainConfig, {
        "name": run_name, "model": MODELS[name][0], "steps": steps, "seed": 0,
        "data": {"shards": shards, "batch_size": batch, "num_workers": num_workers, "streams": max(1, num_workers),
                 "augment": augment},
        "mixed_precision": precision if precision in ("bf16", "fp16") else "no", "tf32": precision != "fp32",
        "log_every": max(1, steps // 8), "checkpoint_every": steps, "validation": {"every": 0},
        **{f"{d}_dir": str(workdir / d) for d in ("models", "metrics", "plots", "runs", "checkpoints")},
    })
    try:
        code = train(cfg, restart=True)
    finally:
        device_setup.reset_accelerate()
    if code != 0:
        raise RuntimeError(f"pipeline.train exited {code}")
    metrics = json.loads((workdir / "metrics" / f"train-{run_name}.json").read_text())
    with open(workdir / "plots" / f"train-{run_name}.csv", newline="") as f:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(f)]
    steady = rates[1:] or rates  # the first window holds the start-up (workers, cuDNN's search)
    return {"images_per_s": round(statistics.median(steady), 2),
            "data_wait_fraction": metrics["data_wait_fraction"]}
