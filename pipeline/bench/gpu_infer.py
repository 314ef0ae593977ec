"""Inference speed for the GPU check (:mod:`pipeline.bench.gpu`): our model with its
post-processing on the device against torchvision's model of the same family (whose forward in
eval mode includes its own resize, normalisation and post-processing), at batch 1 (latency) and
at a large batch (throughput), in one precision. Both use the evaluation's thresholds (score
0.01, NMS 0.45, 200 detections: torchvision's defaults too) and are untrained: near-uniform
scores, so every prior is a candidate, the post-processing's worst case, for both alike."""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.bench.device_timing import peak_memory, timed
from pipeline.bench.gpu_train import MODELS, NUM_CLASSES, autocast, peer_model
from ssd.models import build_model
from ssd.postprocess import PostprocessConfig, PostProcessor


def ours(name: str, precision: str, device: str) -> Callable[[torch.Tensor], Any]:
    torch.manual_seed(0)
    model = build_model({**MODELS[name][0], "num_classes": NUM_CLASSES}).to(device).eval()
    post = PostProcessor(model.priors, PostprocessConfig()).to(device)

    @torch.no_grad()
    def detect(images: torch.Tensor) -> Any:
        with autocast(precision, device):
            logits, deltas = model(images)
        return post(logits.float(), deltas.float())

    return detect


def peer(name: str, precision: str, device: str) -> Callable[[torch.Tensor], Any]:
    torch.manual_seed(0)
    model = peer_model(name).to(device).eval()

    @torch.no_grad()
    def detect(images: torch.Tensor) -> Any:
        with autocast(precision, device):
            return model(list(images))

    return detect


def compare(name: str, precision: str, batch: int, repeats: int, device: str) -> dict[str, Any]:
    """Batch-1 latency (ms) and batch-``batch`` images/s, ours and torchvision's, alternately."""
    size = MODELS[name][0]["image_size"]
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, 3, size, size, generator=g).to(device)
    many = torch.rand(batch, 3, size, size, generator=g).to(device)
    fns = {"ours": ours(name, precision, device), "torchvision": peer(name, precision, device)}
    out: dict[str, Any] = {}
    for who, fn in fns.items():
        peak = peak_memory(device, lambda fn=fn: fn(many), 2)
        if peak is not None:
            out[f"{who}_peak_gib"] = peak
    latency = timed([lambda: fns["ours"](one), lambda: fns["torchvision"](one)], repeats, device)
    throughput = timed([lambda: fns["ours"](many), lambda: fns["torchvision"](many)], max(3, repeats // 5), device)
    out.update({
        "latency_ms_ours": round(latency[0] * 1e3, 3), "latency_ms_torchvision": round(latency[1] * 1e3, 3),
        "images_per_s_ours": round(batch / throughput[0], 2),
        "images_per_s_torchvision": round(batch / throughput[1], 2),
        "latency_ours_vs_torchvision": round(latency[1] / latency[0], 3),
        "throughput_ours_vs_torchvision": round(throughput[1] / throughput[0], 3),
    })
    return out
