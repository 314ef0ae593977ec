"""Timed chains: a frame's steps (pre-processing, forward, post-processing) run in a loop and
timed one by one, the figures rounded alike, and the benchmark's synthetic JPEG frame.

:func:`time_steps` is what every latency of the benchmark goes through: the models, the
torchvision peer, the deployed graphs and the timing of alternatives side by side (running
several chains' steps in one loop makes a change in the machine's load hit them alike).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

#: One step of a timed chain: a name and a function of the previous step's output.
Step = tuple[str, Callable[[Any], Any]]

PARTS = ("pre", "forward", "post")


def time_steps(steps: Sequence[Step], repeats: int, warmup: int, device: torch.device) -> tuple[dict[str, float], Any]:
    """Run the chain ``steps`` ``warmup + repeats`` times; median seconds of each step over the last ``repeats``.

    Each step gets the previous step's output (the first gets ``None``). On CUDA the device is
    synchronised around every step, so each one's queued kernels are counted in its own time.
    Returns the medians and the last run's final output.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    value: Any = None
    with torch.inference_mode():
        for i in range(warmup + repeats):
            value = None
            sync()
            t0 = time.perf_counter()
            for name, fn in steps:
                value = fn(value)
                sync()
                t1 = time.perf_counter()
                if i >= warmup:
                    times[name].append(t1 - t0)
                t0 = t1
    return {name: statistics.median(t) for name, t in times.items()}, value


def part_ms(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds of each of :data:`PARTS` -> milliseconds (3 decimals), with their ``total``."""
    out = {part: round(seconds[part] * 1e3, 3) for part in PARTS}
    out["total"] = round(sum(seconds[part] for part in PARTS) * 1e3, 3)
    return out


def part_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each of :data:`PARTS` over their sum (4 decimals)."""
    total = sum(seconds[part] for part in PARTS)
    return {part: round(seconds[part] / total, 4) for part in PARTS}


def rounded_ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def frame_figures(params: int, macs: int, latency: dict[str, float], class_logits: torch.Tensor,
                  score_threshold: float, detections: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures our models and the torchvision peer both report for one frame: cost, the batch-1
    ``latency`` (seconds per part) in milliseconds and shares, and what the post-processing had to
    sift: ``candidates_per_image``, the class scores (softmax of ``class_logits [1, P, C]``, the
    background at 0 left out) above ``score_threshold``, and the detections it kept."""
    scores = torch.softmax(class_logits.float(), dim=-1)[..., 1:]
    return {
        "params": params,
        "macs": macs,
        "latency_ms": part_ms(latency),
        "share": part_shares(latency),
        "candidates_per_image": int((scores > score_threshold).sum()),
        "detections_per_image": len(detections[0]["labels"]),
    }


def source_jpeg(source_image: str | None, source_size: Sequence[int], quality: int) -> tuple[bytes, int, int]:
    """``(jpeg, width, height)``: the frame the pre-processing decodes, the JPEG file
    ``source_image``, else a :func:`synthetic_jpeg` of ``source_size`` (width, height) and ``quality``."""
    if source_image is not None:
        jpeg = Path(source_image).read_bytes()
        height, width = decode_rgb(jpeg).shape[:2]
        return jpeg, width, height
    width, height = (int(s) for s in source_size)
    return synthetic_jpeg(width, height, quality), width, height


def synthetic_jpeg(width: int, height: int, quality: int = 90, seed: int = 0) -> bytes:
    """A ``width`` x ``height`` JPEG with the detail of a photo: smooth colour fields, shapes, sensor noise.

    A flat or pure-noise image would decode faster or slower than a real frame: JPEG decoding
    time follows the amount of detail.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(2, min(width, height) // 30), max(3, min(width, height) // 6)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + r), colour, -1)
    img = np.clip(img.astype(np.int16) + rng.normal(0, 6, img.shape).astype(np.int16), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode the benchmark frame")
    return data.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 ``[H, W, 3]`` RGB, as the loaders decode (EXIF orientation ignored)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError(f"cannot decode the benchmark frame ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
