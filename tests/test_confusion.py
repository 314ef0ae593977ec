"""The detection confusion matrix on tiny hand-made images."""

from __future__ import annotations

import numpy as np

from ssd.confusion import confusion_matrix, image_confusion
from ssd.metrics import ImageRecord


def record(dets, gts, difficult=None) -> ImageRecord:
    """``dets``: (box, score, label); ``gts``: (box, label)."""
    return ImageRecord(
        image_id="x", width=100, height=100,
        boxes=np.array([d[0] for d in dets], dtype=np.float64).reshape(-1, 4),
        scores=np.array([d[1] for d in dets], dtype=np.float32),
        labels=np.array([d[2] for d in dets], dtype=np.int64),
        gt_boxes=np.array([g[0] for g in gts], dtype=np.float64).reshape(-1, 4),
        gt_labels=np.array([g[1] for g in gts], dtype=np.int64),
        gt_difficult=np.array(difficult if difficult is not None else [False] * len(gts), dtype=bool),
    )


A, B, C = [0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 90, 90]
A_SHIFTED = [1, 0, 11, 10]  # IoU 9/11 with A


def test_hits_confusions_misses_and_false_detections():
    r = record(
        dets=[(A_SHIFTED, 0.9, 1), (B, 0.8, 2), ([70, 0, 80, 10], 0.7, 1), (C, 0.2, 2)],  # C: below the threshold
        gts=[(A, 1), (B, 1), (C, 2)],
    )
    counts = image_confusion(r, num_classes=2, score_threshold=0.5)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[1, 1] = 1  # A found as class 1
    expected[1, 2] = 1  # B (class 1) detected as class 2
    expected[0, 1] = 1  # a detection where there is nothing
    expected[2, 0] = 1  # C missed (its detection scored under the threshold)
    np.testing.assert_array_equal(counts, expected)
    lower = image_confusion(r, num_classes=2, score_threshold=0.1)
    assert lower[2, 2] == 1 and lower[2, 0] == 0


def test_each_object_is_matched_once_by_the_best_scored_detection():
    r = record(dets=[(A, 0.6, 2), (A_SHIFTED, 0.9, 1)], gts=[(A, 1)])
    counts = image_confusion(r, num_classes=2)
    assert counts[1, 1] == 1 and counts[0, 2] == 1 and counts.sum() == 2


def test_iou_threshold_and_difficult_objects():
    far = [5, 0, 15, 10]  # IoU 50/150 = 1/3 with A
    r = record(dets=[(far, 0.9, 1), (B, 0.9, 1)], gts=[(A, 1), (B, 1), (C, 1)], difficult=[False, True, True])
    counts = image_confusion(r, num_classes=1, iou_threshold=0.5)
    # far: no match (IoU 1/3) -> background row; B: matched to a difficult object -> nowhere;
    # A missed; C (difficult, unmatched) is not a miss.
    np.testing.assert_array_equal(counts, [[0, 1], [1, 0]])
    assert image_confusion(r, num_classes=1, iou_threshold=0.3)[1, 1] == 1


def test_empty_images_and_the_sum_over_images():
    empty = record(dets=[], gts=[])
    only_gt = record(dets=[], gts=[(A, 2)])
    only_det = record(dets=[(A, 0.9, 2)], gts=[])
    total = confusion_matrix([empty, only_gt, only_det], num_classes=2)
    np.testing.assert_array_equal(total, [[0, 0, 1], [0, 0, 0], [1, 0, 0]])
