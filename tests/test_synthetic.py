"""Tests of ssd.data.synthetic: determinism, exact boxes, flags, and the IR videos' motion and degradation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ssd.data.synthetic import (
    DEGRADATIONS,
    IR_CLASSES,
    VOC_CLASSES,
    VOC_HUES,
    IrSpec,
    VocSpec,
    ir_video,
    video_splits,
    voc_image,
)

SMALL_IR = IrSpec(width=96, height=72, frames=24)


@pytest.fixture(scope="module")
def images():
    return [voc_image(7, i) for i in range(60)]


@pytest.fixture(scope="module")
def videos():
    return [ir_video(7, i, SMALL_IR) for i in range(6)]


# --------------------------------------------------------------------------- VOC images


def test_voc_image_is_a_function_of_seed_and_index():
    a, b = voc_image(3, 5), voc_image(3, 5)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.objects == b.objects
    assert not np.array_equal(voc_image(4, 5).image[:64, :64], a.image[:64, :64])
    assert not np.array_equal(voc_image(3, 6).image[:64, :64], a.image[:64, :64])


def test_voc_image_shapes(images):
    spec = VocSpec()
    for s in images:
        h, w, c = s.image.shape
        assert c == 3 and s.image.dtype == np.uint8
        assert spec.min_side <= h <= spec.max_side and spec.min_side <= w <= spec.max_side
        assert s.instances.shape == (h, w)
        assert len(s.objects) <= spec.max_objects
        assert {o.name for o in s.objects} <= set(VOC_CLASSES)
    # Both sides vary, independently: aspect ratios differ.
    assert len({s.image.shape[0] / s.image.shape[1] for s in images}) > 30


def test_voc_boxes_are_tight_and_inside_the_image(images):
    fully_visible = 0
    for s in images:
        h, w = s.instances.shape
        for k, o in enumerate(s.objects, 1):
            x1, y1, x2, y2 = o.box
            assert all(float(v).is_integer() for v in o.box)
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            ys, xs = np.nonzero(s.instances == k)
            assert xs.size > 0, "an annotated object has visible pixels"
            # Every visible pixel of the object lies inside its box ...
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            if o.visibility == 1.0:
                fully_visible += 1
                # ... and an unoccluded object touches all four sides.
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    assert fully_visible > 50


def test_voc_objects_are_drawn_in_their_class_hue(images):
    checked = 0
    for s in images:
        hsv = cv2.cvtColor(s.image, cv2.COLOR_BGR2HSV)
        for k, o in enumerate(s.objects, 1):
            px = hsv[s.instances == k]
            px = px[(px[:, 1] > 80) & (px[:, 2] > 60)]  # coloured pixels (not the white checks)
            if px.shape[0] < 30:
                continue
            lo, hi = VOC_HUES[o.name]
            # Median hue, measured on the circle around the middle of the class range.
            middle = (lo + hi) / 2
            offset = (px[:, 0].astype(np.float64) - middle + 90) % 180 - 90
            assert abs(np.median(offset)) <= (hi - lo) / 2 + 4, (o.name, np.median(offset))
            checked += 1
    assert checked > 50


def test_difficult_and_truncated_flags(images):
    spec = VocSpec()
    objects = [(o, min(s.image.shape[:2])) for s in images for o in s.objects]
    difficult = [o for o, _ in objects if o.difficult]
    assert 0 < len(difficult) < len(objects) / 2
    for o, short in objects:
        long_side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
        expected = long_side < spec.difficult_scale * short or o.visibility < spec.difficult_visibility
        assert o.difficult == expected
    assert any(o.truncated for o, _ in objects)
    assert any(o.visibility < 1.0 and not o.difficult for o, _ in objects), "partly occluded objects"
    assert any(o.visibility < spec.difficult_visibility for o, _ in objects), "heavily occluded objects"
    scales = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / short for o, short in objects]
    assert min(scales) < 0.1 and max(scales) > 0.45


def test_empty_images():
    spec = VocSpec(empty_fraction=0.5)
    samples = [voc_image(1, i, spec) for i in range(16)]
    empty = [s for s in samples if not s.objects]
    assert 0 < len(empty) < len(samples)
    for s in empty:
        assert not s.instances.any()
    # An empty image is still cluttered, not a flat colour.
    assert all(s.image.std() > 10 for s in empty)


def test_default_empty_fraction_gives_a_few_empty_images():
    assert any(not voc_image(0, i).objects for i in range(150))


# --------------------------------------------------------------------------- IR videos


def test_ir_video_is_a_function_of_seed_and_index(videos):
    again = ir_video(7, 0, SMALL_IR)
    np.testing.assert_array_equal(again.frames, videos[0].frames)
    assert again.objects == videos[0].objects and again.degradation == videos[0].degradation
    assert not np.array_equal(ir_video(8, 0, SMALL_IR).frames, videos[0].frames)


def test_ir_video_shapes_and_names(videos):
    names = [v.name for v in videos]
    assert len(set(names)) == len(names)
    for i, v in enumerate(videos):
        assert v.frames.shape == (SMALL_IR.frames, SMALL_IR.height, SMALL_IR.width)
        assert v.frames.dtype == np.uint8
        assert len(v.objects) == len(v.degradation) == SMALL_IR.frames
        tracks = {o.track_id for objs in v.objects for o in objs}
        assert tracks == set(range(1, 2 + i % SMALL_IR.max_objects))
        for objs in v.objects:
            for o in objs:
                assert o.name in IR_CLASSES and not o.difficult
                x1, y1, x2, y2 = o.box
                assert 0 <= x1 < x2 <= SMALL_IR.width and 0 <= y1 < y2 <= SMALL_IR.height


def test_ir_track_keeps_its_class(videos):
    for v in videos:
        names = {}
        for objs in v.objects:
            for o in objs:
                assert names.setdefault(o.track_id, o.name) == o.name


def test_ir_boxes_move_smoothly(videos):
    steps = []
    for v in videos:
        for before, after in zip(v.objects, v.objects[1:]):
            prev = {o.track_id: o for o in before if not o.truncated}
            for o in after:
                p = prev.get(o.track_id)
                if p is None or o.truncated:
                    continue
                steps.append(max(abs(a - b) for a, b in zip(o.box, p.box)))
    assert len(steps) > 50
    assert max(steps) <= 4.0, "a box edge moves at most a few pixels per frame"
    assert np.mean(steps) > 0.3, "objects do move"


def test_some_objects_enter_or_leave_the_frame():
    spells = 0
    for i in range(12):
        v = ir_video(0, i)
        for track in {o.track_id for objs in v.objects for o in objs}:
            present = [any(o.track_id == track for o in objs) for objs in v.objects]
            if all(present):
                continue
            spells += 1
            # One stretch in view, touching neither end (enter) or the start (leave) ...
            first, last = present.index(True), len(present) - 1 - present[::-1].index(True)
            assert all(present[first : last + 1]) and (first == 0 or last == len(present) - 1)
            # ... long enough to be worth tracking, with a clipped box at the edge.
            assert sum(present) >= 0.4 * len(present)
            edge = v.objects[first if first > 0 else last]
            assert next(o for o in edge if o.track_id == track).truncated
    assert spells > 0


def test_ir_visible_pixels_lie_inside_boxes(videos):
    for v in videos:
        for t, objs in enumerate(v.objects):
            for o in objs:
                ys, xs = np.nonzero(v.instances[t] == o.track_id)
                if xs.size:
                    x1, y1, x2, y2 = o.box
                    assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2


@pytest.mark.parametrize("share", [0.0, 0.2, 0.33, 0.5])
def test_degraded_share_is_exact(share):
    spec = IrSpec(width=64, height=48, frames=30, degraded_fraction=share)
    for i in range(3):
        v = ir_video(2, i, spec)
        kinds = [k for k in v.degradation if k]
        assert len(kinds) == round(share * spec.frames)
        assert set(kinds) <= set(DEGRADATIONS)
        if kinds:
            assert v.degradation[0] == "", "a video starts clean"


def test_all_degradation_kinds_occur():
    seen = {k for i in range(24) for k in ir_video(0, i, SMALL_IR).degradation}
    assert seen >= {"noise", "occlusion", "washout", "dark", "garbage"}


def test_occlusion_hides_an_object_that_stays_annotated(videos):
    hidden = 0
    for v in videos:
        for t, kind in enumerate(v.degradation):
            if kind == "occlusion" and v.objects[t]:
                assert min(o.visibility for o in v.objects[t]) == 0.0
                hidden += 1
    assert hidden > 0


def _contrast(frame: np.ndarray, box) -> float:
    """(mean in the box - mean of a margin around it) / the frame's standard deviation."""
    x1, y1, x2, y2 = (int(v) for v in box)
    f = frame.astype(np.float64)
    pad = 4
    X1, Y1, X2, Y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, f.shape[1]), min(y2 + pad, f.shape[0])
    inner = f[y1:y2, x1:x2]
    outer = f[Y1:Y2, X1:X2]
    ring = (outer.sum() - inner.sum()) / max(outer.size - inner.size, 1)
    return (inner.mean() - ring) / (f.std() + 1e-6)


def test_degraded_frames_hide_objects_that_clean_frames_show():
    clean, degraded = [], []
    for i in range(8):
        v = ir_video(0, i, SMALL_IR)
        for t, kind in enumerate(v.degradation):
            for o in v.objects[t]:
                if o.truncated:
                    continue
                c = _contrast(v.frames[t], o.box)
                if kind == "":
                    clean.append(c)
                elif kind in ("noise", "washout", "dark", "garbage"):
                    degraded.append(c)
    assert len(clean) > 50 and len(degraded) > 20
    assert np.median(clean) > 1.0, "objects stand out in clean frames"
    assert np.median(degraded) < 0.35 * np.median(clean), "and hardly at all in degraded ones"


def test_video_splits_are_deterministic_and_disjoint():
    s = video_splits(0, 36, 0.25)
    assert s == video_splits(0, 36, 0.25)
    assert s.count("val") == 9 and s.count("train") == 27
    assert s != video_splits(1, 36, 0.25)
    tiny = video_splits(0, 3, 0.25)
    assert tiny.count("val") == 1 and tiny.count("train") == 2
    assert video_splits(0, 4, 0.0) == ("train",) * 4
