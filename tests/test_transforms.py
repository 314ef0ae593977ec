"""Tests for ssd.data.transforms: boxes follow the image content, clips share one draw."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from ssd.data.transforms import DEFERRED_COLOUR, AugmentConfig, DeviceColour, eval_transform, train_transform

# Geometry only: colour changes would blur "white object on black".
GEOMETRY = AugmentConfig(photometric_p=0.0)
S = 32  # output size


def _target(boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult if difficult is not None else [False] * len(labels), dtype=torch.bool),
    }


def _white_rect(width: int, height: int, x1: int, y1: int, x2: int, y2: int) -> tuple[torch.Tensor, dict]:
    """A black uint8 image with a white rectangle, and its normalised box."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, y1:y2, x1:x2] = 255
    return image, _target([[x1 / width, y1 / height, x2 / width, y2 / height]], [5])


def _bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Pixel-edge bounds (x1, y1, x2, y2) of the True pixels of a [H, W] mask."""
    ys, xs = mask.nonzero(as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_output_format_and_range():
    image, target = _white_rect(64, 48, 10, 8, 40, 30)
    torch.manual_seed(0)
    out, out_target = train_transform(S)(image, target)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert out_target["boxes"].dtype == torch.float32 and out_target["boxes"].shape[1] == 4
    assert out_target["labels"].dtype == torch.int64 and out_target["difficult"].dtype == torch.bool


def test_box_follows_white_rectangle():
    # Whatever zoom, crop and flip are drawn, the box is the white pixels' extent.
    image, target = _white_rect(64, 48, 12, 10, 44, 30)
    transform = train_transform(S, GEOMETRY)
    checked = 0
    for seed in range(60):
        torch.manual_seed(seed)
        out, out_target = transform(image, target)
        assert len(out_target["boxes"]) == len(out_target["labels"]) == len(out_target["difficult"])
        if len(out_target["boxes"]) == 0:
            continue  # crop left the box's centre out: dropped with its label
        assert out_target["labels"].tolist() == [5]
        box = (out_target["boxes"][0] * S).tolist()
        white = out.min(dim=0).values > 0.5
        if not white.any():
            continue  # the object shrank below a pixel
        x1, y1, x2, y2 = _bounds(white)
        # Resizing blurs edges by at most about a pixel of the output.
        assert box[0] - 1.5 <= x1 and x2 <= box[2] + 1.5, (seed, box, (x1, y1, x2, y2))
        assert box[1] - 1.5 <= y1 and y2 <= box[3] + 1.5, (seed, box, (x1, y1, x2, y2))
        # ... and the box is tight: its area is covered by (at least faintly) bright pixels.
        bright = out.max(dim=0).values > 0.05
        bx1, by1, bx2, by2 = _bounds(bright)
        assert bx1 - 1.5 <= box[0] and box[2] <= bx2 + 1.5 and by1 - 1.5 <= box[1] and box[3] <= by2 + 1.5
        checked += 1
    assert checked > 30


def test_flip_only_mirrors_box():
    image, target = _white_rect(64, 48, 8, 8, 24, 40)
    cfg = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, crop_p=0.0, flip_p=1.0)
    out, out_target = train_transform(S, cfg)(image, target)
    assert_close(out_target["boxes"], torch.tensor([[1 - 24 / 64, 8 / 48, 1 - 8 / 64, 40 / 48]]))
    white = out.min(dim=0).values > 0.5
    assert _bounds(white) == (20, 5, 28, 27)  # 40/64*32 .. 56/64*32, 8/48*32 .. 40/48*32 (rounded inwards)


@pytest.mark.parametrize("size, width, height", [(320, 600, 400), (160, 300, 225), (300, 299, 200)])
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_boxes_at_the_right_and_bottom_edges_are_kept(size, width, height, flip_p):
    """Resize put an edge at the width a few 1e-6 past the new size, and SanitizeBoundingBoxes then
    dropped the box: objects cut by the right or bottom edge (after a flip, the left), and a box
    covering the whole image, were trained as background."""
    cfg = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, crop_p=0.0, flip_p=flip_p)
    target = _target([[0.5, 0.2, 1.0, 0.8], [0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.4, 1.0], [0.1, 0.1, 0.4, 0.4]],
                     [1, 2, 3, 4])
    _, out = train_transform(size, cfg)(torch.zeros(3, height, width, dtype=torch.uint8), target)
    assert out["labels"].tolist() == [1, 2, 3, 4]
    expected = target["boxes"] if not flip_p else torch.stack(
        [1 - target["boxes"][:, 2], target["boxes"][:, 1], 1 - target["boxes"][:, 0], target["boxes"][:, 3]], dim=1)
    assert_close(out["boxes"], expected, atol=1e-6, rtol=0)


def test_cropped_out_boxes_are_dropped_with_their_labels():
    # A large box on the left (label 1) and a small difficult box in the bottom-right corner (label 2).
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    target = _target([[0.0, 0.0, 0.5, 1.0], [0.9, 0.9, 1.0, 1.0]], [1, 2], [False, True])
    cfg = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, flip_p=0.0, crop_max_scale=0.6)
    transform = train_transform(S, cfg)
    dropped = kept = 0
    for seed in range(80):
        torch.manual_seed(seed)
        _, out = transform(image, target)
        labels = out["labels"].tolist()
        assert len(out["boxes"]) == len(labels) == len(out["difficult"])
        assert out["difficult"].tolist() == [label == 2 for label in labels]  # flags travel with labels
        if labels == [1, 2]:
            kept += 1
            # Without a flip the small box stays right of and below the large one.
            assert float(out["boxes"][1, 0]) >= float(out["boxes"][0, 2]) - 1e-6
        elif 2 not in labels:
            dropped += 1
    assert dropped > 0 and kept > 0


def test_image_without_boxes_passes_through():
    image = torch.full((3, 40, 50), 77, dtype=torch.uint8)
    empty = _target([], [])
    for seed in range(10):
        torch.manual_seed(seed)
        out, out_target = train_transform(S)(image, empty)
        assert out.shape == (3, S, S)
        assert out_target["boxes"].shape == (0, 4) and out_target["labels"].shape == (0,)
        assert out_target["difficult"].shape == (0,)


@pytest.mark.parametrize("photometric_first", [True, False])
def test_clip_static_object_is_identical_on_every_frame(photometric_first):
    image, target = _white_rect(64, 48, 20, 12, 36, 40)
    frames = image.unsqueeze(0).repeat(5, 1, 1, 1)
    # The full augmentation, colour included.
    transform = train_transform(S, AugmentConfig(photometric_first=photometric_first))
    flipped = unflipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, targets = transform.clip(frames, [target] * 5)
        assert out.shape == (5, 3, S, S)
        for t in range(1, 5):
            assert_close(out[t], out[0], rtol=0, atol=0)  # same colour change, zoom, crop and flip
            assert_close(targets[t]["boxes"], targets[0]["boxes"], rtol=0, atol=0)
            assert targets[t]["labels"].tolist() == targets[0]["labels"].tolist()
        if len(targets[0]["boxes"]):
            centre = float(targets[0]["boxes"][0, [0, 2]].mean())
            # The object sits right of centre (x 20..36 of 64) before any flip.
            flipped += centre < 0.5
            unflipped += centre > 0.5
    assert flipped > 0 and unflipped > 0  # the draws did vary


def test_clip_moving_object_shares_geometry():
    # The object moves right by 8 px per frame; after a shared flip it moves left on every frame.
    frames, targets = [], []
    for t in range(3):
        image, target = _white_rect(64, 48, 8 + 8 * t, 16, 24 + 8 * t, 32)
        frames.append(image)
        targets.append(target)
    transform = train_transform(S, GEOMETRY)
    for seed in range(40):
        torch.manual_seed(seed)
        out, out_targets = transform.clip(torch.stack(frames), targets)
        if any(len(tg["boxes"]) == 0 for tg in out_targets):
            continue
        x = [float(tg["boxes"][0, 0]) for tg in out_targets]
        widths = [float(tg["boxes"][0, 2] - tg["boxes"][0, 0]) for tg in out_targets]
        steps = [x[1] - x[0], x[2] - x[1]]
        clipped = any(float(tg["boxes"][0, 0]) < 1e-4 or float(tg["boxes"][0, 2]) > 1 - 1e-4 for tg in out_targets)
        if not clipped:
            assert_close(steps[0], steps[1], atol=1e-5, rtol=0)  # same zoom and crop on every frame
            assert_close(widths[0], widths[2], atol=1e-5, rtol=0)
        assert (steps[0] > 0) == (steps[1] > 0)  # same flip on every frame
        for t in range(3):
            white = out[t].min(dim=0).values > 0.5
            if white.any():
                x1, _, x2, _ = _bounds(white)
                box = (out_targets[t]["boxes"][0] * S).tolist()
                assert box[0] - 1.5 <= x1 and x2 <= box[2] + 1.5


def test_clip_keeps_boxes_with_their_frames():
    frames = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    targets = [
        _target([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]], [1, 2]),
        _target([], []),
        _target([[0.2, 0.2, 0.6, 0.6]], [3], [True]),
    ]
    cfg = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, crop_p=0.0, flip_p=0.0)
    _, out_targets = train_transform(16, cfg).clip(frames, targets)
    assert [tg["labels"].tolist() for tg in out_targets] == [[1, 2], [], [3]]
    assert [tg["difficult"].tolist() for tg in out_targets] == [[False, False], [], [True]]
    for before, after in zip(targets, out_targets):
        assert_close(after["boxes"], before["boxes"])  # resize keeps normalised boxes


def test_eval_transform_resizes_only():
    image, target = _white_rect(64, 48, 16, 12, 48, 36)
    out, out_target = eval_transform(S)(image, target)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert_close(out_target["boxes"], target["boxes"])
    assert out_target["labels"].tolist() == [5]
    assert _bounds(out.min(dim=0).values > 0.5) == (8, 8, 24, 24)
    # Deterministic: no random draw.
    assert_close(eval_transform(S)(image, target)[0], out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_p": 1.5},
        {"zoom_out_max": 0.5},
        {"crop_min_scale": 0.0},
        {"crop_min_ious": (0.5, 0.9)},
        {"min_box_size": 0.5},
        {"photometric_device": True},  # the colour change must come after the resize to be deferred
    ],
)
def test_augment_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="AugmentConfig"):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("min_iou", [0.0, 0.5, 0.7])
def test_batched_iou_crop_meets_torchvision_constraints(min_iou):
    from torchvision import tv_tensors
    from torchvision.ops import box_iou

    from ssd.data.transforms import _BatchedIoUCrop

    width, height = 100, 80
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    box = torch.tensor([[20.0, 16.0, 60.0, 56.0]])
    boxes = tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(height, width))
    crop = _BatchedIoUCrop(min_scale=0.3, max_scale=1.0, sampler_options=[min_iou])
    for seed in range(50):
        torch.manual_seed(seed)
        p = crop.make_params([image, boxes])
        w, h, left, top = p["width"], p["height"], p["left"], p["top"]
        assert int(0.3 * width) <= w <= width and int(0.3 * height) <= h <= height
        assert 0.5 <= w / h <= 2.0
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        assert p["is_within_crop_area"].tolist() == [True]  # the box centre (40, 36) is inside
        assert left < 40 < left + w and top < 36 < top + h
        iou = float(box_iou(box, torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32)))
        assert iou >= min_iou - 1e-6  # float32 rounding of the same IoU
    assert _BatchedIoUCrop(sampler_options=[1.0]).make_params([image, boxes]) == {}


def test_channel_shuffle_can_be_turned_off_to_keep_colour_cues():
    from ssd.data.transforms import AugmentConfig, train_transform

    red = torch.zeros(3, 32, 32, dtype=torch.uint8)
    red[0] = 200
    target = {"boxes": torch.tensor([[4.0, 4.0, 28.0, 28.0]]), "labels": torch.tensor([1]),
              "difficult": torch.tensor([False])}
    geometry_off = dict(zoom_out_p=0.0, crop_p=0.0, flip_p=0.0)

    def dominant(cfg, draws=30):
        torch.manual_seed(0)
        t = train_transform(32, cfg)
        return {int(t(red, dict(target))[0].mean(dim=(1, 2)).argmax()) for _ in range(draws)}

    assert dominant(AugmentConfig(photometric_p=1.0, channel_shuffle_p=0.0, hue=0.0, **geometry_off)) == {0}
    assert len(dominant(AugmentConfig(photometric_p=1.0, **geometry_off))) > 1  # SSD's recipe permutes
    with pytest.raises(ValueError, match="channel_shuffle_p"):
        AugmentConfig(channel_shuffle_p=1.5)


@pytest.mark.parametrize("channel_shuffle_p", [None, 0.0])  # torchvision's distortion and ours composed
def test_deferred_colour_gives_the_worker_paths_boxes_and_images(channel_shuffle_p):
    """Workers that leave the colour change to the device: the same boxes, bit for bit, and once
    DeviceColour has run, the same images as workers that change the colour themselves."""
    worker = AugmentConfig(photometric_first=False, photometric_p=1.0, channel_shuffle_p=channel_shuffle_p)
    deferred = AugmentConfig(photometric_first=False, photometric_p=1.0, channel_shuffle_p=channel_shuffle_p,
                             photometric_device=True)
    g = torch.Generator().manual_seed(0)
    frames = [(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g),
               _target([[0.1, 0.2, 0.5, 0.7], [0.4, 0.1, 0.9, 0.6]], [3, 7])) for _ in range(4)]
    clip = (torch.randint(0, 256, (3, 3, 60, 80), dtype=torch.uint8, generator=g),
            [_target([[0.2, 0.2, 0.6, 0.8]], [2])] * 3)
    for seed, (image, target) in enumerate(frames):
        torch.manual_seed(seed)
        expected_image, expected = train_transform(S, worker)(image, target)
        torch.manual_seed(seed)
        image_left, got = train_transform(S, deferred)(image, target)
        assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["labels"], expected["labels"])
        torch.manual_seed(1234)
        changed = DeviceColour(deferred)(image_left[None], [got])[0]
        drawn = torch.rand(())
        torch.manual_seed(1234)
        assert torch.equal(drawn, torch.rand(()))  # the training process's generator is left as it was
        assert not torch.equal(changed, image_left)
        assert_close(changed, expected_image, atol=1e-6, rtol=0)
    torch.manual_seed(9)
    expected_clip, expected_targets = train_transform(S, worker).clip(*clip)
    torch.manual_seed(9)
    clip_left, targets = train_transform(S, deferred).clip(*clip)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, expected_targets))
    assert_close(DeviceColour(deferred)(clip_left[None], [targets])[0], expected_clip, atol=1e-6, rtol=0)


def test_device_colour_refuses_a_batch_without_draws():
    deferred = AugmentConfig(photometric_first=False, photometric_device=True)
    with pytest.raises(ValueError, match=f"sample 0 of the batch carries no colour draws \\('{DEFERRED_COLOUR}'\\)"):
        DeviceColour(deferred)(torch.rand(1, 3, S, S), [_target([[0.1, 0.1, 0.5, 0.5]], [1])])
