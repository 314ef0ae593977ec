"""Post-processing: raw predictions -> detections, vectorised over the batch.

The result is the standard SSD post-processing (the one of ssd.pytorch's
``Detect`` and torchvision's ``SSD.postprocess_detections``): softmax, decode,
clip to the image; per image and class, drop scores at or below the
threshold, keep the ``top_k`` best, suppress overlaps above the NMS threshold;
per image keep the ``max_detections`` best. The work is done for the whole
batch and all classes at once, with no Python loop over images or classes
(the old per-class Python loop made post-processing 3/4 of inference time):

1. one threshold over ``[B, P, C-1]`` scores picks the candidates; only when some
   (image, class) has more than ``top_k`` of them, one ``topk`` trims them;
2. greedy NMS only depends, for each box, on the higher-scored boxes of its own
   class, so running it on each image's ``M`` best candidates gives exactly
   the full run's verdicts for those ``M``. ``M`` starts at twice
   ``max_detections`` and grows only while an image has fewer survivors than
   ``max_detections`` and candidates left: almost always one round;
3. ``torchvision.ops.nms`` over the window of all images and classes, each
   (image, class) group shifted to its own region of the plane so groups never
   overlap, in calls of about 512 boxes (:func:`grouped_nms`): one call over the
   whole window would cost its size squared (the trained 6-class sample model at
   batch 16: 260 ms, against 40 ms in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import nms

from ssd.bounds import AtLeast, Below, Fraction, PositiveInt
from ssd.boxes import clip_boxes, decode, decode_numpy


@dataclass(frozen=True)
class PostprocessConfig:
    score_threshold: Annotated[float, AtLeast(0), Below(1)] = 0.01
    """Class scores at or below this are not detections (ssd.pytorch's 0.01)."""
    top_k: PositiveInt = 400
    """Candidates kept per image and class before NMS (torchvision's topk_candidates)."""
    nms_threshold: Fraction = 0.45
    """IoU above which the lower-scored of two boxes of one class is suppressed."""
    max_detections: PositiveInt = 200
    """Detections kept per image after NMS."""


class PostProcessor(nn.Module):
    """Turns ``(class_logits, box_deltas)`` into per-image detections.

    Args:
        priors: ``Tensor[P, 4]`` cxcywh priors of the model.
        config: thresholds and limits.
    """

    def __init__(self, priors: Tensor, config: PostprocessConfig = PostprocessConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("priors", priors.detach().clone(), persistent=False)

    @torch.no_grad()
    def forward(self, class_logits: Tensor, box_deltas: Tensor) -> list[dict[str, Tensor]]:
        """Detections of a batch.

        Args:
            class_logits: ``Tensor[B, P, C]`` raw class scores, class 0 the background.
            box_deltas: ``Tensor[B, P, 4]`` encoded offsets.

        Returns:
            Per image ``{"boxes": Tensor[K, 4] xyxy normalised, "scores": Tensor[K],
            "labels": int64 Tensor[K] (>= 1)}``, sorted by decreasing score, ``K <= max_detections``.
        """
        scores = class_probabilities(class_logits)  # [B, P, C-1]
        deltas = box_deltas.float()
        if scores.shape[0] == 1 and scores.device.type == "cpu":
            found = single_image_cpu(scores, deltas, self.priors, self.config)
            if found is not None:
                return found

        def boxes_of(img: Tensor, prior: Tensor) -> Tensor:
            if img.numel() >= deltas.shape[0] * deltas.shape[1]:  # decode each prior once
                return clip_boxes(decode(deltas, self.priors))[img, prior]
            # Only the candidates' boxes: a deployed detector's few dozen instead of every prior.
            return clip_boxes(decode(deltas[img, prior], self.priors[prior]))

        return select_detections(scores, boxes_of, self.config)


def class_probabilities(class_logits: Tensor) -> Tensor:
    """``Tensor[B, P, C]`` logits -> ``Tensor[B, P, C-1]`` softmax probabilities of the object classes.

    Computed with the classes on the middle axis (``[B, C, P]``, returned as a ``[B, P, C-1]``
    view): reductions over a handful of classes on the last axis are slow on a CPU, where for
    one SSDLite frame (2,990 priors x 7 classes, one thread) ``torch.softmax`` takes 0.42 ms
    and this 0.04 ms, equal to 1e-7. The threshold that follows reads the view as fast.
    """
    x = class_logits.float().transpose(1, 2).contiguous()  # [B, C, P]
    e = (x - x.amax(dim=1, keepdim=True)).exp_()
    return (e[:, 1:] / e.sum(dim=1, keepdim=True)).transpose(1, 2)


def select_detections(
    scores: Tensor, boxes: Tensor | Callable[[Tensor, Tensor], Tensor], config: PostprocessConfig
) -> list[dict[str, Tensor]]:
    """Threshold, top-k, class-wise NMS and the per-image cap, for a whole batch.

    Args:
        scores: ``Tensor[B, P, K]`` probabilities of the ``K`` object classes (no background).
        boxes: ``Tensor[B, P, 4]`` xyxy boxes, shared by all classes of a prior; or a function
            ``(img [N], prior [N]) -> Tensor[N, 4]`` giving the candidates' boxes only.

    Returns:
        As :meth:`PostProcessor.forward`; labels are ``class index + 1``.
    """
    batch, num_priors, num_classes = scores.shape
    passed = scores > config.score_threshold  # [B, P, K]
    k = min(config.top_k, num_priors)
    img, prior, cls = passed.nonzero(as_tuple=True)
    box_of = boxes if callable(boxes) else (lambda i, p: boxes[i, p])
    budget = 2 * config.max_detections
    if img.numel() <= min(k, budget):
        # No (image, class) over top_k and no image over the first survivor window: what a
        # deployed detector's threshold leaves, taken without the general path's bookkeeping.
        cand_scores = scores[img, prior, cls]
        order = cand_scores.argsort(descending=True, stable=True)
        if batch > 1:
            order = order[img[order].argsort(stable=True)]
        img, prior, cls, cand_scores = img[order], prior[order], cls[order], cand_scores[order]
        cand_boxes = box_of(img, prior)
        keep = grouped_nms(cand_boxes, cand_scores, img * num_classes + cls, config.nms_threshold)
        return _per_image(keep, img, cls, cand_scores, cand_boxes, batch, config.max_detections)

    trimmed = bool((passed.sum(dim=1) > k).any())
    if trimmed:
        # Some (image, class) has more than top_k candidates: keep its k best. A trained
        # model rarely gets here, so the common case pays no topk at all.
        kth = scores.topk(k, dim=1).values[:, -1:, :]  # [B, 1, K]
        passed &= scores >= kth
        img, prior, cls = passed.nonzero(as_tuple=True)
    cand_scores = scores[img, prior, cls]
    order = _by_image_and_score(img, cls, cand_scores, num_classes, batch, k if trimmed else None)
    img, prior, cls, cand_scores = img[order], prior[order], cls[order], cand_scores[order]
    cand_boxes = box_of(img, prior)
    per_image = torch.bincount(img, minlength=batch)
    rank = torch.arange(img.numel(), device=img.device) - (per_image.cumsum(0) - per_image)[img]

    group = img * num_classes + cls
    while True:
        window = (rank < budget).nonzero(as_tuple=True)[0]
        keep = window[grouped_nms(cand_boxes[window], cand_scores[window], group[window], config.nms_threshold)]
        survivors = torch.bincount(img[keep], minlength=batch)
        short = (survivors < config.max_detections) & (per_image > budget)
        if not bool(short.any()):
            break
        budget *= 2
    return _per_image(keep, img, cls, cand_scores, cand_boxes, batch, config.max_detections)


#: Most candidates :func:`single_image_cpu` takes; more go to :func:`select_detections`.
LEAN_CANDIDATES = 64


def single_image_cpu(scores: Tensor, deltas: Tensor, priors: Tensor, config: PostprocessConfig
                     ) -> list[dict[str, Tensor]] | None:
    """:func:`select_detections` for one image on the CPU with at most :data:`LEAN_CANDIDATES`
    candidates (a deployed detector's frame), in NumPy; None when there are more.

    Why it exists: at batch 1 the torch path is about 40 small operators, and the dispatch of
    each, not the arithmetic, was the cost: 0.31 ms warm and 1.5 ms with the caches cold after
    a forward (the ``deployed`` benchmark), a fifth of an int8 SSDLite frame. NumPy's per-call
    cost is a few times lower. The results are the torch path's: the same probabilities
    (:func:`class_probabilities`), candidates in the same order (by prior, then class, then a
    stable sort by decreasing score), the boxes decoded by :mod:`ssd.boxes` for the candidates
    only, and greedy NMS with ``torchvision.ops.nms``'s arithmetic on :func:`grouped_nms`'s
    shifted float64 boxes (tested against both paths).

    Args:
        scores: ``Tensor[1, P, K]`` class probabilities (a view of a contiguous ``[1, K, P]``).
        deltas: ``Tensor[1, P, 4]`` float32; ``priors``: ``Tensor[P, 4]`` cxcywh.
    """
    by_class = scores.transpose(1, 2)[0]  # [K, P], contiguous from class_probabilities
    probs = by_class.numpy() if by_class.is_contiguous() else by_class.contiguous().numpy()
    # The priors with some class over the threshold first: one pass over [K, P], then the
    # comparison only on their columns.
    limit = min(LEAN_CANDIDATES, config.top_k, config.max_detections)
    some = np.flatnonzero(probs.max(axis=0) > config.score_threshold)
    if some.size > limit:
        return None
    cls, col = np.nonzero(probs[:, some] > config.score_threshold)
    if cls.size > limit:
        return None
    prior = some[col]
    first = np.argsort(prior * probs.shape[0] + cls, kind="stable")  # the torch path's (prior, class) order
    cls, prior = cls[first], prior[first]
    cand = probs[cls, prior]
    order = np.argsort(-cand, kind="stable")
    cls, prior, cand = cls[order], prior[order], cand[order]
    boxes = decode_numpy(deltas[0].numpy()[prior], priors.numpy()[prior])  # [n, 4]
    keep = _greedy_nms(boxes.astype(np.float64) + 2.0 * cls[:, None], config.nms_threshold)[: config.max_detections]
    return [{"boxes": torch.from_numpy(boxes[keep]), "scores": torch.from_numpy(cand[keep]),
             "labels": torch.from_numpy(cls[keep].astype(np.int64) + 1)}]


def _greedy_nms(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS of ``boxes [n, 4]`` float64, already by decreasing score;
    ``torchvision.ops.nms``'s CPU arithmetic (areas, intersection, ``iou > threshold``)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    w = np.maximum(0.0, np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]))
    h = np.maximum(0.0, np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        suppresses = inter / (areas[:, None] + areas[None] - inter) > threshold  # [n, n]
    suppresses &= np.triu(np.ones(suppresses.shape, dtype=bool), 1)  # only lower-scored boxes
    removed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in range(len(boxes)):
        if not removed[i]:
            keep.append(i)
            removed |= suppresses[i]
    return np.asarray(keep, dtype=np.int64)


def _by_image_and_score(img: Tensor, cls: Tensor, scores: Tensor, num_classes: int, batch: int,
                        k: int | None) -> Tensor:
    """The candidates' order: by image, then by decreasing score; ``k``: also at most ``k`` per
    (image, class) (ties with a group's k-th score can let extra ones in)."""
    order = scores.argsort(descending=True, stable=True)
    if k is not None and bool((torch.bincount(img * num_classes + cls) > k).any()):
        order = order[(img * num_classes + cls)[order].argsort(stable=True)]
        group = (img * num_classes + cls)[order]
        sizes = torch.bincount(group, minlength=batch * num_classes)
        in_group = torch.arange(group.numel(), device=img.device) - (sizes.cumsum(0) - sizes)[group]
        order = order[in_group < k]
        order = order[scores[order].argsort(descending=True, stable=True)]
    return order[img[order].argsort(stable=True)]


def _per_image(keep: Tensor, img: Tensor, cls: Tensor, scores: Tensor, boxes: Tensor, batch: int,
               max_detections: int) -> list[dict[str, Tensor]]:
    """The survivors ``keep`` (by decreasing score) split by image, at most ``max_detections`` each."""
    if batch == 1:
        keep = keep[:max_detections]
        return [{"boxes": boxes[keep], "scores": scores[keep], "labels": cls[keep] + 1}]
    keep = keep[img[keep].argsort(stable=True)]
    kept_img = img[keep]
    counts = torch.bincount(kept_img, minlength=batch)
    kept_rank = torch.arange(keep.numel(), device=keep.device) - (counts.cumsum(0) - counts)[kept_img]
    keep = keep[kept_rank < max_detections]
    counts_list = counts.clamp(max=max_detections).tolist()
    out_boxes = boxes[keep].split(counts_list)
    out_scores = scores[keep].split(counts_list)
    out_labels = (cls[keep] + 1).split(counts_list)
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(out_boxes, out_scores, out_labels)]


#: Boxes per NMS call in :func:`grouped_nms` (whole groups: a call can hold more).
NMS_CHUNK = 512


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
    """Greedy NMS within each group: boxes of different groups never suppress each other.

    Each group is shifted to its own square of the plane (in float64, so the shift costs
    no precision), so that one ``torchvision.ops.nms`` call handles many groups. A call
    compares every box with the later unsuppressed ones, about ``n**2`` for ``n`` boxes,
    boxes of other groups included; so the groups, in order, are packed into calls of
    about :data:`NMS_CHUNK` boxes (a group is never split).

    Args:
        boxes: ``Tensor[N, 4]`` xyxy boxes inside ``[0, 1]``.
        scores: ``Tensor[N]``.
        groups: ``int64 Tensor[N]``, the group (image and class) of each box.
        threshold: IoU above which the lower-scored box of a pair in one group goes.

    Returns:
        ``int64 Tensor[K]``: indices of the kept boxes, by decreasing score.
    """
    shifted = boxes.to(torch.float64) + (2.0 * groups.to(torch.float64)).unsqueeze(1)
    scores64 = scores.to(torch.float64)
    n = boxes.shape[0]
    if n <= NMS_CHUNK:
        return nms(shifted, scores64, threshold)
    order = groups.argsort(stable=True)
    sorted_groups = groups[order]
    first = torch.ones(n, dtype=torch.bool, device=boxes.device)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.arange(n, device=boxes.device)[first]  # where each group begins
    chunk = starts[first.cumsum(0) - 1] // NMS_CHUNK  # a group's chunk: where it begins
    sizes = torch.bincount(chunk).tolist()
    kept = [idx[nms(shifted[idx], scores64[idx], threshold)] for idx in order.split([k for k in sizes if k])]
    keep = torch.cat(kept)
    return keep[scores[keep].argsort(descending=True, stable=True)]
