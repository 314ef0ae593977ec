"""Detection metrics: Pascal VOC average precision, and COCO metrics through torchmetrics.

Pascal VOC AP (IoU 0.5) is computed exactly as the published devkit does it
(``VOCevaldet.m`` of VOCdevkit 2007-2012; ``voc_eval.py`` of py-faster-rcnn is
the same algorithm in Python):

1. per class, the detections of the whole dataset are sorted by decreasing
   score (ties: image order, then the order within the image);
2. each detection is compared with the ground truth of its class in its image;
   its best-IoU box (the first one on ties) is its match if the IoU is strictly
   greater than 0.5. The IoU uses the devkit's integer-pixel areas,
   ``(x2 - x1 + 1) * (y2 - y1 + 1)``, on boxes in the devkit's convention:
   1-based pixel indices with inclusive corners, as in VOC XML;
3. a matched box marked difficult makes the detection count as neither true
   nor false positive; otherwise the first detection matched to a box is a true
   positive and every later one a false positive (the devkit never falls back
   to the second-best box); an unmatched detection is a false positive;
4. recall is ``TP / positives``, where difficult boxes are not positives;
   precision is ``TP / (TP + FP)``;
5. AP: VOC2007 averages the best precision at recall >= t over the eleven
   points ``t = 0, 0.1, ..., 1``; VOC2010+ is the area under the precision
   envelope (precision made non-increasing from the right), summed where the
   recall changes. mAP is the mean over the classes that have positives.

The one deliberate deviation from the devkit's code: the eleven recall points
are the correctly rounded ``k / 10``. The devkit's ``0:0.1:1`` (and
``np.arange(0, 1.1, 0.1)`` in py-faster-rcnn) produce e.g. ``3 * 0.1 =
0.30000000000000004``, so a recall of exactly 3/10 would not count as reaching 0.3.

Coordinates. The project's pixel boxes (shard JSON, :func:`to_pixels`) are
*edges*: ``[0, 0, W, H]`` covers a whole W x H image, and VOC XML's 1-based
``xmin..xmax`` was stored as ``x1 = xmin - 1, x2 = xmax``. :func:`to_devkit`
turns them back into the devkit's convention (``x1 + 1, y1 + 1, x2, y2``), which
recovers the VOC XML integers exactly (the loader hands evaluation the stored pixel
boxes in float64, ``target["pixels"]``: its float32 normalised boxes would not give them
back). In that convention the devkit's ``+ 1`` areas equal the plain areas of the edge
boxes, so the IoU the devkit computes is the ordinary continuous IoU of our pixel boxes
(the same IoU COCO uses).

COCO metrics (mAP@[.5:.95], AP50, AP75, AP small/medium/large, AR) come from
torchmetrics' ``MeanAveragePrecision`` with the ``faster_coco_eval`` backend, on
edge pixel boxes, with pycocotools' own float64 IoU and recall thresholds (tested equal to
the reference evaluator run directly). Difficult boxes are passed as ``iscrowd``: COCO then counts
them as no positive and ignores detections matched to them, like VOC; the
matching rule differs (a crowd box may absorb several detections, and its IoU is
intersection over the detection's area). COCO AP50 is *not* VOC AP: 101-point
interpolation instead of the envelope area, IoU >= 0.5 instead of > 0.5, a
detection whose best box is taken goes to the next best free box, at most 100
detections per image. Report the two under separate names.

No I/O here: everything takes arrays and returns numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ssd.errors import InputError

#: IoU a detection must exceed to match a ground-truth box (VOC: strictly greater).
VOC_IOU_THRESHOLD = 0.5

#: The eleven recall points of the VOC2007 AP, correctly rounded (see the module docstring).
VOC07_RECALL_POINTS = np.arange(11) / 10.0


def to_pixels(boxes: Any, width: int, height: int) -> np.ndarray:
    """Normalised xyxy ``[N, 4]`` -> float64 edge-pixel xyxy ``[N, 4]`` of a ``width`` x ``height`` image."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return b * np.array([width, height, width, height], dtype=np.float64)


def _gt_pixels(target: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """The ground truth in edge pixels: the loader's exact float64 ``pixels`` when it gives them.

    Its normalised boxes are float32, and back in pixels a stored 61 comes out 60.9999979: an
    area of exactly 32 x 32 drops from COCO's medium objects to its small ones, and a detection
    of IoU exactly 0.5 passes VOC's strict > 0.5."""
    pixels = target.get("pixels")
    if pixels is not None:
        return _array(pixels, np.float64).reshape(-1, 4)
    return to_pixels(_array(target["boxes"], np.float64), width, height)


def to_devkit(pixel_boxes: Any) -> np.ndarray:
    """Edge-pixel xyxy ``[N, 4]`` -> the devkit's 1-based inclusive pixel corners (``x1 + 1, y1 + 1, x2, y2``)."""
    b = np.asarray(pixel_boxes, dtype=np.float64).reshape(-1, 4)
    return b + np.array([1.0, 1.0, 0.0, 0.0])


def voc_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of devkit-convention boxes ``[N, 4]`` and ``[M, 4]``, with the devkit's ``+ 1`` sizes."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(1, -1, 4)
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
    area_b = (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
    return inter / (area_a + area_b - inter)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a precision/recall curve (arrays in detection order), VOC2007 11-point or VOC2010+ area."""
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_POINTS:
            reached = rec >= t
            ap += (float(prec[reached].max()) if reached.any() else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass(frozen=True)
class ClassAP:
    """VOC result of one class.

    ``recall``, ``precision``: float64 ``[D]``, one entry per detection of the class in
    score order (the devkit's arrays; a detection on a difficult box repeats the previous
    values). ``true_positive``: bool ``[D]``. ``ap07``/``ap``: NaN when the class has no positives.
    """

    label: int
    num_positives: int
    recall: np.ndarray
    precision: np.ndarray
    true_positive: np.ndarray
    ap07: float
    ap: float

    @property
    def num_detections(self) -> int:
        return int(self.recall.shape[0])


@dataclass(frozen=True)
class VocResult:
    """Per-class VOC AP; ``classes[k]`` is label ``k + 1``."""

    classes: list[ClassAP]

    def map(self, use_07_metric: bool) -> float:
        """Mean AP over the classes with positives; NaN when no class has any."""
        aps = [c.ap07 if use_07_metric else c.ap for c in self.classes if c.num_positives > 0]
        return float(np.mean(aps)) if aps else math.nan

    @property
    def map07(self) -> float:
        return self.map(True)

    @property
    def map2010(self) -> float:
        return self.map(False)


def voc_evaluate(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = VOC_IOU_THRESHOLD,
) -> VocResult:
    """Pascal VOC AP of every class over a dataset (the devkit's algorithm; see the module docstring).

    Args:
        detections: per image ``{"boxes": [K, 4], "scores": [K], "labels": [K]}``, boxes in the
            devkit convention (:func:`to_devkit`), labels 1-based. Arrays or tensors.
        ground_truth: per image (same order) ``{"boxes": [G, 4], "labels": [G], "difficult": [G]}``.
        num_classes: object classes, labels ``1..num_classes``.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection entries for {len(ground_truth)} images")
    scores_all, labels_all, best_iou_all, best_gt_all = [], [], [], []
    gt_labels_all, gt_difficult_all = [], []
    offset = 0
    for det, gt in zip(detections, ground_truth):
        boxes = _array(det["boxes"], np.float64).reshape(-1, 4)
        labels = _array(det["labels"], np.int64).reshape(-1)
        gt_boxes = _array(gt["boxes"], np.float64).reshape(-1, 4)
        gt_labels = _array(gt["labels"], np.int64).reshape(-1)
        gt_difficult = _array(gt["difficult"], bool).reshape(-1)
        # Each detection's best box among the ground truth of its own class (first on ties).
        iou = np.where(labels[:, None] == gt_labels[None, :], voc_iou(boxes, gt_boxes), -np.inf)
        if gt_boxes.shape[0]:
            best = iou.argmax(axis=1)
            best_iou = iou[np.arange(len(best)), best]
        else:
            best = np.zeros(len(labels), dtype=np.int64)
            best_iou = np.full(len(labels), -np.inf)
        scores_all.append(_array(det["scores"], np.float64).reshape(-1))
        labels_all.append(labels)
        best_iou_all.append(best_iou)
        best_gt_all.append(best + offset)
        gt_labels_all.append(gt_labels)
        gt_difficult_all.append(gt_difficult)
        offset += gt_boxes.shape[0]

    scores, labels = _cat(scores_all, np.float64), _cat(labels_all, np.int64)
    best_iou, best_gt = _cat(best_iou_all, np.float64), _cat(best_gt_all, np.int64)
    gt_labels, gt_difficult = _cat(gt_labels_all, np.int64), _cat(gt_difficult_all, bool)
    for what, values in (("detection", labels), ("ground-truth", gt_labels)):
        if values.size and (values.min() < 1 or values.max() > num_classes):
            raise ValueError(f"{what} labels must be in 1..{num_classes}, got {values.min()}..{values.max()}")

    # By class, then decreasing score; ties keep dataset order (image, then position in the image).
    order = np.lexsort((np.arange(scores.shape[0]), -scores, labels))
    labels, best_iou, best_gt = labels[order], best_iou[order], best_gt[order]
    matched = best_iou > iou_threshold
    ignored = matched & gt_difficult[np.where(matched, best_gt, 0)] if gt_difficult.size else np.zeros_like(matched)
    candidate = matched & ~ignored
    # The first candidate matched to a box takes it; every later one is a duplicate (false positive).
    true_positive = np.zeros(labels.shape[0], dtype=bool)
    picked = np.nonzero(candidate)[0]
    _, first = np.unique(best_gt[picked], return_index=True)
    true_positive[picked[first]] = True
    false_positive = ~ignored & ~true_positive

    bounds = np.searchsorted(labels, np.arange(1, num_classes + 2))
    results = []
    for label in range(1, num_classes + 1):
        lo, hi = bounds[label - 1], bounds[label]
        npos = int(np.count_nonzero((gt_labels == label) & ~gt_difficult))
        tp = np.cumsum(true_positive[lo:hi], dtype=np.float64)
        fp = np.cumsum(false_positive[lo:hi], dtype=np.float64)
        recall = tp / npos if npos else np.full_like(tp, math.nan)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap07 = voc_ap(recall, precision, True) if npos else math.nan
        ap = voc_ap(recall, precision, False) if npos else math.nan
        results.append(ClassAP(label, npos, recall, precision, true_positive[lo:hi].copy(), ap07, ap))
    return VocResult(results)


def pr_curve_points(result: ClassAP) -> tuple[np.ndarray, np.ndarray]:
    """The points of a class's precision-recall curve worth plotting: ``(recall, precision)``.

    The raw curve has one point per detection; between two true positives precision only
    falls at constant recall. Kept: each true positive (where a recall level is first
    reached, at its highest precision) and the last point (the final precision at full
    recall), so a class has at most ``positives + 1`` points.
    """
    if result.num_positives == 0 or result.num_detections == 0:
        return np.zeros(0), np.zeros(0)
    keep = result.true_positive.copy()
    keep[-1] = True
    return result.recall[keep], result.precision[keep]


@dataclass(frozen=True)
class ImageRecord:
    """Detections and ground truth of one image, in edge-pixel xyxy of the original image.

    ``boxes`` float64 ``[K, 4]``, ``scores`` float32 ``[K]``, ``labels`` int64 ``[K]`` (1-based);
    ``gt_boxes`` float64 ``[G, 4]``, ``gt_labels`` int64 ``[G]``, ``gt_difficult`` bool ``[G]``.
    """

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray


class DetectionAccumulator:
    """Collects per-image detections and ground truth; computes VOC and COCO metrics over them.

    The metrics depend only on the set of images, not on the order they were added in
    (records are taken in ``image_id`` order), so the shares of several processes can be
    merged in any order and give the same numbers as one process.
    """

    def __init__(self, records: Iterable[ImageRecord] = ()):
        self._records: dict[str, ImageRecord] = {}
        for r in records:
            self.add_record(r)

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        image_id: str,
        size: tuple[int, int],
        detections: Mapping[str, Any],
        target: Mapping[str, Any],
    ) -> ImageRecord:
        """Add one image: ``size`` its original ``(width, height)``; ``detections`` as the
        post-processor returns them and ``target`` as the loader does (normalised boxes,
        1-based labels; ``difficult`` optional; ``pixels``, optional: the ground truth's exact
        edge-pixel boxes, used instead of the float32 normalised ones)."""
        width, height = int(size[0]), int(size[1])
        gt_labels = _array(target["labels"], np.int64).reshape(-1)
        difficult = target.get("difficult")
        record = ImageRecord(
            image_id=image_id,
            width=width,
            height=height,
            boxes=to_pixels(_array(detections["boxes"], np.float64), width, height),
            scores=_array(detections["scores"], np.float32).reshape(-1),
            labels=_array(detections["labels"], np.int64).reshape(-1),
            gt_boxes=_gt_pixels(target, width, height),
            gt_labels=gt_labels,
            gt_difficult=(
                np.zeros(gt_labels.shape, dtype=bool) if difficult is None else _array(difficult, bool).reshape(-1)
            ),
        )
        self.add_record(record)
        return record

    def add_record(self, record: ImageRecord) -> None:
        if record.image_id in self._records:
            raise InputError(f"image {record.image_id!r} added twice (one sample key in two shards?)")
        self._records[record.image_id] = record

    @property
    def records(self) -> list[ImageRecord]:
        """All records, sorted by ``image_id``."""
        return [self._records[k] for k in sorted(self._records)]

    def voc(self, num_classes: int, iou_threshold: float = VOC_IOU_THRESHOLD) -> VocResult:
        records = self.records
        dets = [{"boxes": to_devkit(r.boxes), "scores": r.scores, "labels": r.labels} for r in records]
        gts = [{"boxes": to_devkit(r.gt_boxes), "labels": r.gt_labels, "difficult": r.gt_difficult} for r in records]
        return voc_evaluate(dets, gts, num_classes, iou_threshold)

    def coco(self) -> dict[str, float | None]:
        """COCO metrics (see :func:`coco_metrics`) of the records."""
        return coco_metrics(self.records)


#: The COCO numbers reported, as torchmetrics names them.
COCO_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)


def coco_metrics(records: Sequence[ImageRecord]) -> dict[str, float | None]:
    """COCO box metrics from torchmetrics (``faster_coco_eval`` backend) on edge-pixel boxes.

    Difficult boxes are passed as ``iscrowd``. Values COCO leaves undefined (-1: e.g. no
    small objects) are ``None``. Computed on ``records`` alone, with no collective: in a
    distributed run gather the records first and call this on one process.
    """
    from torchmetrics.detection import MeanAveragePrecision

    # The records are complete (a distributed run gathers them first), so compute() must not
    # sync with other processes: only the main process calls it.
    # pycocotools' own thresholds, in float64: torchmetrics' defaults come from torch.linspace
    # in float32 (0.550000011920929, not 0.55), and the metrics then differ from the reference
    # evaluator's in the fifth decimal (0.470395 against 0.470408 on the sample's VOC model).
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", sync_on_compute=False,
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(), rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )
    # COCO's maxDets=100 keeps each image's 100 best detections: that is the definition, not a problem.
    metric.warn_on_many_detections = False
    preds, targets = [], []
    for r in records:
        preds.append({
            "boxes": torch.from_numpy(r.boxes.reshape(-1, 4)),
            "scores": torch.from_numpy(r.scores.astype(np.float32)),
            "labels": torch.from_numpy(r.labels.astype(np.int64)),
        })
        targets.append({
            "boxes": torch.from_numpy(r.gt_boxes.reshape(-1, 4)),
            "labels": torch.from_numpy(r.gt_labels.astype(np.int64)),
            "iscrowd": torch.from_numpy(r.gt_difficult.astype(np.int64)),
        })
    if not records:
        return {k: None for k in COCO_KEYS}
    metric.update(preds, targets)
    out = metric.compute()
    result: dict[str, float | None] = {}
    for k in COCO_KEYS:
        v = float(out[k])
        result[k] = None if v < 0 else v
    return result


def _array(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
