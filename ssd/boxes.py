"""Box math: conversions, IoU, and the SSD box encoding. Pure tensor functions.

Conventions (the one place they are stated):

- ``xyxy``: ``(x1, y1, x2, y2)`` corners; ``cxcywh``: ``(cx, cy, w, h)`` centre and size.
- Inside the library boxes are normalised to ``[0, 1]`` by image width and height.
- Every function takes boxes as ``Tensor[..., 4]`` and works on any leading shape.

The encoding is the one of the SSD paper (Liu et al. 2016, arXiv 1512.02325)
as implemented by the original Caffe code and ssd.pytorch: offsets of the centre
in units of the prior's size, log ratios of the sizes, each divided by a
"variance" (0.1 for the centre, 0.2 for the size).
"""

from __future__ import annotations

import math

import numpy as np

import torch
from torch import Tensor
from torchvision.ops import box_iou as _tv_box_iou

#: Variances of the SSD encoding: (centre, size).
VARIANCES: tuple[float, float] = (0.1, 0.2)

#: Largest log size ratio passed to ``exp`` when decoding (as torchvision's
#: ``BoxCoder``): a box at most 1000/16 times its prior, so a wild regression
#: output can't overflow to ``inf`` and poison NMS with NaN.
MAX_LOG_SCALE: float = math.log(1000.0 / 16)

#: Smallest width/height used inside ``log`` when encoding, so a degenerate
#: (zero-size) target can never produce ``-inf``.
MIN_SIZE: float = 1e-6


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``Tensor[..., 4]`` corners -> ``Tensor[..., 4]`` centre and size."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``Tensor[..., 4]`` centre and size -> ``Tensor[..., 4]`` corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``Tensor[..., 4]`` xyxy boxes, 0 for inverted boxes: ``Tensor[...]``."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``Tensor[N, 4]`` and ``Tensor[M, 4]`` xyxy boxes: ``Tensor[N, M]``.

    torchvision's ``box_iou``, made NaN-free: a pair of zero-area boxes (whose
    union is 0) has IoU 0 instead of 0/0.
    """
    iou = _tv_box_iou(boxes1, boxes2)
    return torch.nan_to_num(iou, nan=0.0)


def valid_boxes(boxes: Tensor, min_size: float = MIN_SIZE) -> Tensor:
    """``Tensor[..., 4]`` xyxy -> ``bool Tensor[...]``: width and height both above ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def clip_boxes(boxes: Tensor) -> Tensor:
    """Clamp normalised xyxy boxes to the image ``[0, 1]``."""
    return boxes.clamp(min=0.0, max=1.0)


def encode(
    boxes: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES
) -> Tensor:
    """Encode target boxes relative to their priors.

    Args:
        boxes: ``Tensor[..., 4]`` xyxy targets, one per prior.
        priors: ``Tensor[..., 4]`` cxcywh priors (broadcastable to ``boxes``).
        variances: (centre, size) variances.

    Returns:
        ``Tensor[..., 4]`` offsets ``(dx, dy, dw, dh)``. Sizes are clamped to
        :data:`MIN_SIZE` before the ``log``, so degenerate targets stay finite.
    """
    g = xyxy_to_cxcywh(boxes)
    centre = (g[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    size = torch.log(g[..., 2:].clamp(min=MIN_SIZE) / priors[..., 2:]) / variances[1]
    return torch.cat((centre, size), dim=-1)


def decode_numpy(deltas: np.ndarray, priors: np.ndarray, variances: tuple[float, float] = VARIANCES) -> np.ndarray:
    """:func:`decode` then :func:`clip_boxes` in NumPy, for the few candidates of one frame
    (:func:`ssd.postprocess.single_image_cpu`): ``[N, 4]`` offsets and cxcywh priors -> ``[N, 4]``
    xyxy boxes in ``[0, 1]``; equal to the torch pair to float32 rounding (tested)."""
    centre = priors[:, :2] + deltas[:, :2] * variances[0] * priors[:, 2:]
    half = 0.5 * priors[:, 2:] * np.exp(np.minimum(deltas[:, 2:] * variances[1], MAX_LOG_SCALE))
    return np.clip(np.concatenate((centre - half, centre + half), axis=1), 0.0, 1.0)


def decode(
    deltas: Tensor, priors: Tensor, variances: tuple[float, float] = VARIANCES
) -> Tensor:
    """Inverse of :func:`encode`: offsets -> xyxy boxes.

    Args:
        deltas: ``Tensor[..., 4]`` predicted offsets.
        priors: ``Tensor[..., 4]`` cxcywh priors (broadcastable to ``deltas``).

    Returns:
        ``Tensor[..., 4]`` xyxy boxes (not clipped to the image). The size
        term is clamped to :data:`MAX_LOG_SCALE` before ``exp``.
    """
    centre = priors[..., :2] + deltas[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp((deltas[..., 2:] * variances[1]).clamp(max=MAX_LOG_SCALE))
    return cxcywh_to_xyxy(torch.cat((centre, size), dim=-1))
