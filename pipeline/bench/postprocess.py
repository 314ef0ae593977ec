"""Post-processing benchmark: ours against torchvision's ``SSD.postprocess_detections``.

Both get the same tensors (8 images x 2,990 priors x 21 classes by default,
the SSDLite-MobileNetV2 layout at 300 px) and the same settings, for two score
distributions:

- ``peaked``: what a trained model emits: the background dominates almost
  every prior, a few dozen priors per image are confident objects;
- ``flat``: what an early checkpoint emits: every class near ``1/C``, so
  thousands of boxes per class pass the 0.01 threshold.

The detections are checked to be the same before anything is timed.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD as TorchvisionSSD

from ssd.boxes import VARIANCES, cxcywh_to_xyxy
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.priors import generate_priors
from ssd.models.ssdlite import ssds_mobilenet_v2_priors


def make_inputs(kind: str, batch: int, num_priors: int, num_classes: int, seed: int = 0):
    """Synthetic ``(class_logits [B, P, C], box_deltas [B, P, 4])`` of the given score distribution."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(batch, num_priors, 4, generator=g) * 0.5
    if kind == "flat":
        logits = torch.randn(batch, num_priors, num_classes, generator=g) * 0.3
    elif kind == "peaked":
        logits = torch.randn(batch, num_priors, num_classes, generator=g)
        logits[..., 0] += 9.0
        objects = torch.randint(0, num_priors, (batch, 40), generator=g)
        classes = torch.randint(1, num_classes, (batch, 40), generator=g)
        rows = torch.arange(batch).unsqueeze(1).expand_as(objects)
        logits[rows, objects, classes] += 14.0
    else:
        raise ValueError(f"unknown score distribution {kind!r}")
    return logits, deltas


def torchvision_postprocess(config: PostprocessConfig):
    """torchvision's own method, bound to the attributes it reads, with the same settings."""
    fake = SimpleNamespace(
        box_coder=det_utils.BoxCoder(weights=(1 / VARIANCES[0],) * 2 + (1 / VARIANCES[1],) * 2),
        score_thresh=config.score_threshold,
        topk_candidates=config.top_k,
        nms_thresh=config.nms_threshold,
        detections_per_img=config.max_detections,
    )

    def run(logits, deltas, priors_xyxy):
        anchors = [priors_xyxy] * logits.shape[0]
        outputs = {"cls_logits": logits, "bbox_regression": deltas}
        return TorchvisionSSD.postprocess_detections(fake, outputs, anchors, [(1, 1)] * logits.shape[0])

    return run


def same_detections(ours, theirs, atol: float = 1e-5) -> bool:
    """Same boxes, scores and labels per image (order by score, as both return)."""
    if len(ours) != len(theirs):
        return False
    for a, b in zip(ours, theirs):
        if a["labels"].shape != b["labels"].shape or not torch.equal(a["labels"], b["labels"]):
            return False
        if not torch.allclose(a["scores"], b["scores"], atol=atol) or not torch.allclose(
            a["boxes"], b["boxes"], atol=atol
        ):
            return False
    return True


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: int = 8, num_classes: int = 21, repeat: int = 20, threads: int | None = None) -> dict:
    """Time both implementations on both distributions; return the figures (ms and ratios)."""
    if threads is not None:
        torch.set_num_threads(threads)
    priors = generate_priors(ssds_mobilenet_v2_priors(), 300, [19, 10, 5, 3, 2, 1])
    config = PostprocessConfig()
    ours = PostProcessor(priors, config)
    theirs = torchvision_postprocess(config)
    priors_xyxy = cxcywh_to_xyxy(priors)
    results: dict = {
        "batch": batch,
        "num_priors": priors.shape[0],
        "num_classes": num_classes,
        "threads": torch.get_num_threads(),
        "config": vars(config) if hasattr(config, "__dict__") else str(config),
    }
    for kind in ("peaked", "flat"):
        logits, deltas = make_inputs(kind, batch, priors.shape[0], num_classes)
        a = ours(logits, deltas)
        b = theirs(logits, deltas, priors_xyxy)
        candidates = int((torch.softmax(logits, -1)[..., 1:] > config.score_threshold).sum())
        t_ours = _time(lambda: ours(logits, deltas), repeat)
        t_theirs = _time(lambda: theirs(logits, deltas, priors_xyxy), repeat)
        results[kind] = {
            "candidates_above_threshold": candidates,
            "detections": sum(int(d["labels"].numel()) for d in a),
            "same_detections": same_detections(a, b),
            "ours_ms": round(t_ours * 1e3, 3),
            "torchvision_ms": round(t_theirs * 1e3, 3),
            "speedup": round(t_theirs / t_ours, 2),
        }
    return results
