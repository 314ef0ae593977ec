"""Drawing boxes on images: a numpy image and pixel boxes in, a new numpy image out.

Images are uint8 ``[H, W, 3]`` RGB (as the loaders decode them). Boxes are edge-pixel
xyxy of that image (``[0, 0, W, H]`` is the whole image; the object covers columns
``x1 .. x2 - 1``), which is what the evaluation and detection tools hold. The outline
of a box is drawn on the box's own outermost pixels and grows inwards with the
thickness, so it lies on the object, never beside it. Nothing here reads or writes files.
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

Colour = tuple[int, int, int]

#: Ground truth in green, predictions in magenta (RGB): told apart at a glance, on any background.
GT_COLOUR: Colour = (0, 230, 0)
PRED_COLOUR: Colour = (255, 0, 255)

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def default_thickness(image: np.ndarray) -> int:
    """Outline width in pixels for an image: 1 up to ~400 px, then growing with the size."""
    return max(1, round(min(image.shape[:2]) / 400))


def pixel_rect(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Edge-pixel box -> the inclusive pixel rectangle ``(c1, r1, c2, r2)`` it covers, clipped; None if outside."""
    x1, y1, x2, y2 = (float(v) for v in box)
    c1, r1 = int(np.floor(x1 + 0.5)), int(np.floor(y1 + 0.5))
    c2, r2 = int(np.floor(x2 + 0.5)) - 1, int(np.floor(y2 + 0.5)) - 1
    c2, r2 = max(c2, c1), max(r2, r1)  # a box thinner than a pixel still gets one
    if c2 < 0 or r2 < 0 or c1 >= width or r1 >= height:
        return None
    return max(c1, 0), max(r1, 0), min(c2, width - 1), min(r2, height - 1)


def draw_boxes(
    image: np.ndarray,
    boxes: Any,
    colour: Colour,
    texts: Sequence[str] | None = None,
    thickness: int | None = None,
    text_below: bool = False,
) -> np.ndarray:
    """A copy of ``image`` with the outlines of ``boxes`` (``[N, 4]`` edge pixels) in ``colour``.

    ``texts``: one caption per box (or None), written in a filled ``colour`` tag above the
    box's top-left corner (below its bottom-left corner with ``text_below``; moved inside
    the image when it would leave it).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    out = np.ascontiguousarray(image).copy()
    height, width = out.shape[:2]
    t = thickness or default_thickness(out)
    rgb = np.array(colour, dtype=np.uint8)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if texts is not None and len(texts) != len(boxes):
        raise ValueError(f"{len(texts)} captions for {len(boxes)} boxes")
    for i, box in enumerate(boxes):
        rect = pixel_rect(box, width, height)
        if rect is None:
            continue
        c1, r1, c2, r2 = rect
        out[r1 : min(r1 + t, r2 + 1), c1 : c2 + 1] = rgb  # top
        out[max(r2 - t + 1, r1) : r2 + 1, c1 : c2 + 1] = rgb  # bottom
        out[r1 : r2 + 1, c1 : min(c1 + t, c2 + 1)] = rgb  # left
        out[r1 : r2 + 1, max(c2 - t + 1, c1) : c2 + 1] = rgb  # right
        if texts is not None and texts[i]:
            _caption(out, texts[i], (c1, r2 + 1) if text_below else (c1, r1), rgb, below=text_below)
    return out


def _caption(image: np.ndarray, text: str, anchor: tuple[int, int], rgb: np.ndarray, below: bool) -> None:
    """Write ``text`` in a filled tag whose top (below) or bottom (above) edge touches ``anchor``."""
    height, width = image.shape[:2]
    scale = max(0.3, min(height, width) / 800)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    tag_h = th + base + 2
    x = min(max(anchor[0], 0), max(width - tw - 2, 0))
    top = anchor[1] if below else anchor[1] - tag_h
    top = min(max(top, 0), max(height - tag_h, 0))
    image[top : top + tag_h, x : x + tw + 2] = rgb
    # Black or white text, whichever reads better on the tag.
    ink = (0, 0, 0) if float(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) > 128 else (255, 255, 255)
    cv2.putText(image, text, (x + 1, top + th + 1), _FONT, scale, ink, 1, cv2.LINE_AA)


def draw_detections(
    image: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any,
    class_names: Sequence[str],
    gt_boxes: Any = None,
    gt_labels: Any = None,
    score_threshold: float = 0.3,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of ``image`` with ground truth (green, name below the box) and the predictions
    scored at least ``score_threshold`` (magenta, ``name score`` above the box).

    ``boxes`` ``[K, 4]`` / ``gt_boxes`` ``[G, 4]`` edge pixels; ``labels`` 1-based
    (``class_names[label - 1]``).
    """
    out = image
    if gt_boxes is not None:
        gl = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
        out = draw_boxes(out, gt_boxes, GT_COLOUR, [_name(class_names, k) for k in gl], thickness, text_below=True)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = s >= score_threshold
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[keep]
    pl = np.asarray(labels, dtype=np.int64).reshape(-1)[keep]
    # Lowest score first, so the best detection's outline ends up on top.
    order = np.argsort(s[keep], kind="stable")
    texts = [f"{_name(class_names, pl[i])} {s[keep][i]:.2f}" for i in order]
    return draw_boxes(out, b[order], PRED_COLOUR, texts, thickness)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else str(int(label))
