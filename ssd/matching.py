"""Assigning ground-truth boxes to priors (SSD paper, section 2.2, "Matching strategy").

Each prior takes the ground-truth box it overlaps most; it is a positive when
that IoU is at least the threshold (0.5), a negative otherwise. Each
ground-truth box's best prior is forced positive, so no object goes without a
prior however small it is. VOC ``difficult`` boxes are neither: a prior whose
best match is a difficult box is *ignored* (label ``IGNORE``), so the loss
neither learns the object nor punishes a detection of it; difficult boxes
don't force a prior either.

Degenerate ground truth (zero or negative width or height) is **dropped**: it
can't be encoded (``log 0``) and no prior can overlap it. Converters reject
such boxes at the boundary; this is the library's last line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd.boxes import box_iou, cxcywh_to_xyxy, valid_boxes

#: Label of priors that count neither as positives nor as negatives.
IGNORE: int = -1


def match(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    priors: Tensor,
    gt_difficult: Tensor | None = None,
    iou_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Match one image's ground truth to the priors.

    Args:
        gt_boxes: ``Tensor[N, 4]`` xyxy, normalised.
        gt_labels: ``int64 Tensor[N]``, object classes ``>= 1``.
        priors: ``Tensor[P, 4]`` cxcywh, normalised.
        gt_difficult: ``bool Tensor[N]`` or ``None`` (no difficult boxes).
        iou_threshold: IoU from which a prior is a positive.

    Returns:
        ``(boxes, labels)``: ``Tensor[P, 4]`` xyxy, the box each prior is
        matched to (meaningful where the label is ``>= 1``), and
        ``int64 Tensor[P]``: the class, 0 for background, :data:`IGNORE` for
        priors matched to a difficult box.
    """
    num_priors = priors.shape[0]
    priors_xyxy = cxcywh_to_xyxy(priors)
    if gt_difficult is None:
        gt_difficult = torch.zeros_like(gt_labels, dtype=torch.bool)
    keep = valid_boxes(gt_boxes)
    gt_boxes, gt_labels, gt_difficult = gt_boxes[keep], gt_labels[keep], gt_difficult[keep]
    if gt_boxes.shape[0] == 0:
        return priors_xyxy, torch.zeros(num_priors, dtype=torch.int64, device=priors.device)

    iou = box_iou(gt_boxes.to(priors.dtype), priors_xyxy)  # [N, P]
    best_iou, best_gt = iou.max(dim=0)  # [P]

    # Force each non-difficult box's best prior. When two boxes claim one
    # prior, the higher index wins (deterministic, unlike an indexed write).
    n = gt_boxes.shape[0]
    best_prior = iou.argmax(dim=1)  # [N]
    claimants = torch.arange(n, device=priors.device)[~gt_difficult]
    claims = torch.full((num_priors,), -1, dtype=torch.int64, device=priors.device)
    claims.scatter_reduce_(0, best_prior[~gt_difficult], claimants, reduce="amax")
    forced = claims >= 0
    best_gt = torch.where(forced, claims, best_gt)
    positive = forced | (best_iou >= iou_threshold)

    labels = torch.where(positive, gt_labels[best_gt], torch.zeros_like(best_gt))
    labels = torch.where(positive & gt_difficult[best_gt], torch.full_like(labels, IGNORE), labels)
    return gt_boxes[best_gt], labels


def match_batch(
    targets: list[dict[str, Tensor]], priors: Tensor, iou_threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """:func:`match` for each image of a batch.

    Args:
        targets: per image, ``{"boxes": Tensor[N, 4], "labels": Tensor[N]}`` and optionally
            ``"difficult": bool Tensor[N]``.
        priors: ``Tensor[P, 4]`` cxcywh.

    Returns:
        ``Tensor[B, P, 4]`` matched xyxy boxes and ``int64 Tensor[B, P]`` labels.
    """
    boxes, labels = zip(
        *(
            match(
                t["boxes"].to(priors.device),
                t["labels"].to(priors.device),
                priors,
                None if t.get("difficult") is None else t["difficult"].to(priors.device),
                iou_threshold,
            )
            for t in targets
        )
    )
    return torch.stack(boxes), torch.stack(labels)
