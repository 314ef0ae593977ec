"""ssd.draw: outlines land on the objects' own border pixels, captions stay by their box."""

from __future__ import annotations

import numpy as np
import pytest

from ssd.draw import GT_COLOUR, PRED_COLOUR, draw_boxes, draw_detections, pixel_rect
from ssd.metrics import to_pixels

RED = (255, 0, 0)


def scene(h: int = 60, w: int = 80) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Grey image with a filled blue rectangle on rows 12..33 and columns 20..49 (inclusive)."""
    img = np.full((h, w, 3), 128, np.uint8)
    r1, r2, c1, c2 = 12, 33, 20, 49
    img[r1 : r2 + 1, c1 : c2 + 1] = (0, 0, 200)
    return img, (r1, r2, c1, c2)


def ring(shape: tuple[int, int], r1: int, r2: int, c1: int, c2: int, t: int) -> np.ndarray:
    """Mask of the pixels of the rectangle within ``t`` of its border (the rectangle's own pixels)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inside = (rows >= r1) & (rows <= r2) & (cols >= c1) & (cols <= c2)
    core = (rows >= r1 + t) & (rows <= r2 - t) & (cols >= c1 + t) & (cols <= c2 - t)
    return inside & ~core


def coloured(img: np.ndarray, colour) -> np.ndarray:
    return np.all(img == np.array(colour, np.uint8), axis=-1)


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_outline_is_exactly_the_rectangles_border(thickness):
    img, (r1, r2, c1, c2) = scene()
    # Edge-pixel box of the rectangle: columns c1..c2 are [c1, c2 + 1).
    out = draw_boxes(img, [[c1, r1, c2 + 1, r2 + 1]], RED, thickness=thickness)
    expected = ring(img.shape[:2], r1, r2, c1, c2, thickness)
    np.testing.assert_array_equal(coloured(out, RED), expected)
    # everything else untouched, and the input not modified (a new image)
    np.testing.assert_array_equal(out[~expected], img[~expected])
    assert not coloured(img, RED).any()


def test_normalised_boxes_scaled_to_pixels_land_on_the_object():
    """The evaluation path: a normalised box -> pixels of the original image -> drawn."""
    img, (r1, r2, c1, c2) = scene(h=60, w=80)
    normalised = np.array([[c1 / 80, r1 / 60, (c2 + 1) / 80, (r2 + 1) / 60]])
    out = draw_boxes(img, to_pixels(normalised, 80, 60), RED, thickness=1)
    np.testing.assert_array_equal(coloured(out, RED), ring(img.shape[:2], r1, r2, c1, c2, 1))
    # every outline pixel is on the object (the blue rectangle), none beside it
    assert (img[coloured(out, RED)] == (0, 0, 200)).all()


def test_caption_sits_above_the_box_and_leaves_the_outline_whole():
    img, (r1, r2, c1, c2) = scene()
    out = draw_boxes(img, [[c1, r1, c2 + 1, r2 + 1]], RED, texts=["cat 0.91"], thickness=1)
    red = coloured(out, RED)
    border = ring(img.shape[:2], r1, r2, c1, c2, 1)
    assert red[border].all()
    rows, cols = np.nonzero(red & ~border)
    assert rows.size > 0, "no caption tag drawn"
    assert rows.max() < r1 and cols.min() >= c1  # the tag is above the box, from its left edge
    assert not red[r1 + 1 : r2, c1 + 1 : c2].any()  # the object itself stays visible


def test_draw_detections_colours_ground_truth_and_thresholded_predictions():
    img, (r1, r2, c1, c2) = scene()
    box = [c1, r1, c2 + 1, r2 + 1]
    far = [60, 40, 75, 55]
    out = draw_detections(
        img, boxes=[box, far], labels=[1, 2], scores=[0.8, 0.1], class_names=["blue", "other"],
        gt_boxes=[box], gt_labels=[1], score_threshold=0.3, thickness=1,
    )
    border = ring(img.shape[:2], r1, r2, c1, c2, 1)
    # the prediction is drawn over the ground truth on the same border; the 0.1 one not at all
    assert coloured(out, PRED_COLOUR)[border].mean() > 0.9
    assert not coloured(out, PRED_COLOUR)[40:56, 60:76].any()
    gt_only = draw_detections(img, [], [], [], ["blue"], gt_boxes=[box], gt_labels=[1], thickness=1)
    assert coloured(gt_only, GT_COLOUR)[border].all()
    assert GT_COLOUR != PRED_COLOUR


def test_boxes_partly_outside_are_clipped_and_outside_ones_skipped():
    img = np.zeros((20, 30, 3), np.uint8)
    out = draw_boxes(img, [[-5, -5, 10, 10], [40, 40, 50, 50]], RED, thickness=1)
    red = coloured(out, RED)
    assert red[0, :10].all() and red[:10, 0].all() and red[9, :10].all() and red[:10, 9].all()
    assert red.sum() == 36  # the clipped 10 x 10 outline, nothing of the outside box
    assert pixel_rect([40, 40, 50, 50], 30, 20) is None


def test_rejects_non_rgb_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        draw_boxes(np.zeros((10, 10), np.uint8), [], RED)
