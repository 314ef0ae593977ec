"""Confusion matrix of a detector: which class each object was detected as, or missed, and what
each detection was.

Per image, the detections scored at least ``score_threshold`` are taken from the best
down; each one is matched to the not yet matched object (of any class) it overlaps most,
if that IoU is at least ``iou_threshold``. A matched pair counts at (object's class,
detection's class): on the diagonal when the class is right, off it when the box found
an object of another class. A detection that matches no object counts at (background,
its class); an object no detection matched at (its class, background). A detection
matched to a *difficult* object counts nowhere, and an unmatched difficult object is
not a miss (as in the VOC evaluation).

Row and column 0 are the background; rows are the ground truth, columns the
predictions; labels are 1-based as everywhere in the project.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ssd.boxes import box_iou
from ssd.metrics import ImageRecord


def image_confusion(record: ImageRecord, num_classes: int, iou_threshold: float = 0.5,
                    score_threshold: float = 0.5) -> np.ndarray:
    """``int64 [K+1, K+1]`` counts of one image (``K = num_classes`` object classes)."""
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    keep = record.scores >= score_threshold
    order = np.argsort(-record.scores[keep], kind="stable")
    labels = record.labels[keep][order]
    gt_labels, difficult = record.gt_labels, record.gt_difficult.astype(bool)
    if len(labels) and len(gt_labels):
        iou = box_iou(torch.from_numpy(record.boxes[keep][order]), torch.from_numpy(record.gt_boxes)).numpy()
    else:
        iou = np.zeros((len(labels), len(gt_labels)))
    matched = np.zeros(len(gt_labels), dtype=bool)
    for d, label in enumerate(labels):
        overlaps = np.where(matched, -1.0, iou[d])
        g = int(np.argmax(overlaps)) if len(overlaps) else -1
        if g < 0 or overlaps[g] < iou_threshold:
            counts[0, label] += 1  # a detection of nothing
            continue
        matched[g] = True
        if not difficult[g]:
            counts[gt_labels[g], label] += 1
    missed = ~matched & ~difficult
    np.add.at(counts, (gt_labels[missed], 0), 1)
    return counts


def confusion_matrix(records: Iterable[ImageRecord], num_classes: int, iou_threshold: float = 0.5,
                     score_threshold: float = 0.5) -> np.ndarray:
    """``int64 [K+1, K+1]``: the sum of :func:`image_confusion` over ``records``."""
    total = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for record in records:
        total += image_confusion(record, num_classes, iou_threshold, score_threshold)
    return total
