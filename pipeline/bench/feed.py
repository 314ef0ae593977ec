"""Can the CPU feed a GPU? The training loader's work per core, at a GPU trainer's input size.

A GPU trains SSD300 at hundreds of images per second (NVIDIA's published SSD300 v1.1: 663
images/s on one A100 80GB, mixed precision, batch 64); every one of those images is a JPEG
decoded and augmented on the CPU by a loader worker. This section times that work in one
process, one thread, as one worker does it:

- VOC-sized photo-like JPEGs (``source_size``, default 500 x 375, the Pascal VOC median),
  1-6 boxes each, held in memory (no I/O: the shards are read sequentially and cost little);
- :func:`ssd.data.loader.decode_sample` with the training transform at ``image_size`` (300):
  decode, the full SSD augmentation (photometric distortion, zoom out, IoU crop, flip), resize;
  again with the colour changes after the resize (``photometric_first: false``, our frame
  sections' choice), without them (the costliest of the steps on the CPU), and with them drawn
  by the worker but made by the training process on the device (``photometric_device``, the
  fed-GPU path; the device's share is the GPU check's ``colour_ms_per_image``).

``images_per_s_per_worker`` is the median over ``repeats`` passes; ``workers_needed`` says, for
each GPU rate of ``gpu_rates``, how many such workers (the full augmentation, as SSD trains)
keep it fed (before the loader's own
overhead, which the ``loader`` section measures as ``per_worker_efficiency``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch

from pipeline.bench.chain import synthetic_jpeg
from ssd.data.loader import RawSample, decode_sample
from ssd.data.transforms import AugmentConfig, train_transform


def voc_like_samples(count: int, size: Sequence[int], num_classes: int = 20, seed: int = 0) -> list[RawSample]:
    """``count`` in-memory frame samples: a photo-like JPEG of ``size`` (width, height) and 1-6 boxes."""
    rng = np.random.default_rng(seed)
    width, height = (int(s) for s in size)
    samples = []
    for i in range(count):
        boxes = []
        for _ in range(int(rng.integers(1, 7))):
            w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            boxes.append([round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)])
        meta = {"id": f"feed{i:05d}", "width": width, "height": height, "boxes": boxes,
                "labels": [int(rng.integers(0, num_classes)) for _ in boxes], "difficult": [False] * len(boxes)}
        jpeg = synthetic_jpeg(width, height, quality=90, seed=seed + i)
        samples.append(RawSample(meta["id"], "memory", (jpeg,), json.dumps(meta).encode(), None))
    return samples


def images_per_s(samples: list[RawSample], image_size: int, augment: AugmentConfig, repeats: int) -> float:
    """Median over ``repeats`` passes of decoding and augmenting every sample in this thread."""
    transform = train_transform(image_size, augment)
    rates = []
    torch.manual_seed(0)
    for _ in range(repeats):
        start = time.perf_counter()
        for raw in samples:
            decode_sample(raw, "frames", transform)
        rates.append(len(samples) / (time.perf_counter() - start))
    return statistics.median(rates)


def run(source_size: Sequence[int] = (500, 375), image_size: int = 300, samples: int = 64, repeats: int = 3,
        gpu_rates: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The figures of the module docstring."""
    rates = dict(gpu_rates or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each loader worker gets
    cv2.setNumThreads(1)
    try:
        data = voc_like_samples(samples, source_size)
        full = images_per_s(data, image_size, AugmentConfig(), repeats)
        late = images_per_s(data, image_size, AugmentConfig(photometric_first=False), repeats)
        geometric = images_per_s(data, image_size, AugmentConfig(photometric_p=0.0), repeats)
        deferred = images_per_s(data, image_size, AugmentConfig(photometric_first=False, photometric_device=True),
                                repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "source_size": f"{int(source_size[0])}x{int(source_size[1])}",
        "image_size": image_size,
        "images_per_s_per_worker": round(full, 1),
        "images_per_s_per_worker_photometric_after_resize": round(late, 1),
        "images_per_s_per_worker_no_photometric": round(geometric, 1),
        "images_per_s_per_worker_photometric_on_device": round(deferred, 1),
        "workers_needed": {name: math.ceil(rate / full) for name, rate in rates.items()},
        "workers_needed_photometric_on_device": {name: math.ceil(rate / deferred) for name, rate in rates.items()},
        "gpu_rates": ", ".join(f"{name} {rate:g} images/s" for name, rate in rates.items()),  # setup, not a figure
    }
