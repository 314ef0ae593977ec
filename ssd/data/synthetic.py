"""Deterministic synthetic data sets: cluttered VOC-style images and degraded infrared videos.

A fresh clone has no Pascal VOC and no internet, so the pipeline's default data
is generated here. Every image and every video is a pure function of
``(seed, index)``: its random generator is ``numpy.random.default_rng([seed,
stream, index])``, so items can be generated in any order, by any number of
processes, and always come out the same. This module does no file I/O; the
``sample`` stage (:mod:`pipeline.sample`) writes the results to disk.

Box convention (this module only): pixels ``(x1, y1, x2, y2)`` as floats in
the image as generated, with ``x2``/``y2`` exclusive, so a box covering a whole
``W x H`` image is ``(0, 0, W, H)``. Boxes are exact: an object's pixels are
columns ``x1 .. x2-1`` and rows ``y1 .. y2-1`` and it touches all four sides
(the full object extent, clipped to the image, including parts hidden by
occluders).

Two data sets:

* :func:`voc_image`: a BGR image of ``128..224`` px per side with 0-6 objects of
  :data:`VOC_CLASSES`, each a distinct shape *and* texture (solid shaded disc,
  flat ring, striped square, checkered triangle, star with a bright core,
  dotted cross) in its own hue range, on a cluttered background (gradients,
  low-frequency colour noise, lines, blobs, and distractor shapes that are none
  of the classes, some of them in front of objects).
* :func:`ir_video`: a grey-scale "thermal" video with 1-3 warm objects of
  :data:`IR_CLASSES` moving smoothly over a cool background with sensor noise,
  in which about a third of the frames are degraded (:data:`DEGRADATIONS`) so
  that one frame alone is ambiguous while the frames before it are not. Objects
  keep their true boxes in degraded frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

VOC_CLASSES = ("disc", "ring", "square", "triangle", "star", "cross")
"""Object classes of :func:`voc_image`, in label order."""

IR_CLASSES = ("person", "car", "bike")
"""Object classes of :func:`ir_video`, in label order."""

DEGRADATIONS = ("noise", "occlusion", "washout", "dark", "garbage", "frozen")
"""Kinds of degraded IR frames: a burst of heavy sensor noise; one object hidden
behind a cold occluder; contrast collapsed so objects nearly vanish; and three
kinds of dropped frame: all dark, decoder garbage, or the last good frame
repeated (frozen)."""

# Streams of the per-item seed [seed, stream, index]; new data sets take new numbers.
_VOC_STREAM = 0
_IR_STREAM = 1
_SPLIT_STREAM = 2

VOC_HUES = {
    "disc": (-8, 8),  # red
    "ring": (100, 122),  # blue
    "square": (18, 32),  # yellow / orange
    "triangle": (50, 75),  # green
    "star": (138, 160),  # magenta
    "cross": (84, 98),  # cyan
}
"""Hue range of each VOC class (OpenCV degrees, 0..180; negative values wrap): far enough
apart to be told at a glance, wide enough that a class is not a single colour."""


@dataclass(frozen=True)
class ObjectAnnotation:
    """One object in one image or frame.

    ``box`` is ``(x1, y1, x2, y2)`` in pixels (x2, y2 exclusive), tight around the
    full object extent clipped to the image. ``visibility`` is the fraction of
    the object's pixels (including any outside the image) that can be seen.
    ``track_id`` (1-based) identifies the object across the frames of a video
    and is ``None`` in still images.
    """

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    truncated: bool = False
    visibility: float = 1.0
    track_id: int | None = None


@dataclass(frozen=True, eq=False)
class SyntheticImage:
    """A generated still image.

    ``image``: ``uint8 [H, W, 3]`` BGR. ``instances``: ``int16 [H, W]``, ``k`` where
    ``objects[k - 1]`` is the visible surface, 0 elsewhere (background, clutter).
    """

    image: np.ndarray
    objects: tuple[ObjectAnnotation, ...]
    instances: np.ndarray


@dataclass(frozen=True, eq=False)
class SyntheticVideo:
    """A generated grey-scale video of ``T`` frames.

    ``frames``: ``uint8 [T, H, W]``. ``objects[t]``: the objects in frame ``t``
    (0-based; objects fully outside the frame are left out). ``degradation[t]``:
    ``""`` for a clean frame, else one of :data:`DEGRADATIONS`. ``instances``:
    ``int8 [T, H, W]``, the ``track_id`` of the object visible at each pixel, 0
    elsewhere (also where an occluder hides it). ``name`` is unique per index
    and may contain ``_`` and ``-``.
    """

    name: str
    frames: np.ndarray
    objects: tuple[tuple[ObjectAnnotation, ...], ...]
    degradation: tuple[str, ...]
    instances: np.ndarray


@dataclass(frozen=True)
class VocSpec:
    """What :func:`voc_image` generates."""

    min_side: int = 128  # image width and height are drawn from [min_side, max_side]
    max_side: int = 224
    max_objects: int = 6  # a non-empty image has 1..max_objects objects
    empty_fraction: float = 0.03  # chance that an image has no object (a background sample)
    min_scale: float = 0.12  # object size as a fraction of the shorter side, log-uniform in [min, max]
    max_scale: float = 0.6
    difficult_scale: float = 0.1  # boxes with a longer side below this fraction are difficult
    difficult_visibility: float = 0.5  # objects less visible than this (occluded) are difficult


@dataclass(frozen=True)
class IrSpec:
    """What :func:`ir_video` generates."""

    width: int = 160  # frame size in pixels
    height: int = 120
    frames: int = 48  # frames per video
    max_objects: int = 3  # video ``i`` has ``1 + i % max_objects`` objects
    degraded_fraction: float = 0.33  # exactly round(degraded_fraction * frames) degraded frames per video


# --------------------------------------------------------------------------- VOC images


def voc_image(seed: int, index: int, spec: VocSpec = VocSpec()) -> SyntheticImage:
    """Generate image ``index`` of the VOC-style data set for ``seed``.

    Objects are drawn back to front, so later ones may hide parts of earlier
    ones; a few distractors are drawn in front of everything. An object is
    ``difficult`` when its box's longer side is below ``spec.difficult_scale``
    of the image's shorter side or less than ``spec.difficult_visibility`` of
    it can be seen, and ``truncated`` when part of it lies outside the image.
    Objects that end up entirely hidden are left out.
    """
    rng = np.random.default_rng([seed, _VOC_STREAM, index])
    w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    img = _voc_background(rng, h, w)
    inst = np.zeros((h, w), np.int16)
    short = min(w, h)
    for _ in range(int(rng.integers(1, 4))):
        _voc_distractor(rng, img, None, short)

    n = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    # Crowded images get smaller objects so that most of each stays visible.
    upper = min(spec.max_scale, 0.9 / math.sqrt(n)) if n else spec.max_scale
    lower = min(spec.min_scale, upper)
    placed: list[tuple[float, float, float, float]] = []  # rough boxes, to keep objects apart
    drawn: list[tuple[str, int, int, tuple]] = []  # (class, full area, area in the image, exact box)
    for _ in range(n):
        cls = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
        r = 0.5 * short * math.exp(rng.uniform(math.log(lower), math.log(upper)))
        centre = _place(rng, placed, r, w, h)
        if centre is None:
            continue
        drawn.append((cls, *_voc_object(rng, img, inst, len(drawn) + 1, cls, *centre, r)))

    if rng.random() < 0.25:  # clutter in front of the objects
        for _ in range(int(rng.integers(1, 3))):
            _voc_distractor(rng, img, inst, short)

    out = img.astype(np.float32) + rng.standard_normal(img.shape, np.float32) * float(rng.uniform(1.5, 6.0))
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)

    objects, remap = [], np.zeros(len(drawn) + 1, np.int16)
    visible = np.bincount(inst.ravel(), minlength=len(drawn) + 1)
    for k, (cls, full, inside, box) in enumerate(drawn, 1):
        if visible[k] == 0:
            continue
        vis = float(visible[k]) / full
        long_side = max(box[2] - box[0], box[3] - box[1])
        objects.append(
            ObjectAnnotation(
                name=cls,
                box=box,
                difficult=bool(long_side < spec.difficult_scale * short or vis < spec.difficult_visibility),
                truncated=inside < full,
                visibility=round(vis, 4),
            )
        )
        remap[k] = len(objects)
    return SyntheticImage(image=image, objects=tuple(objects), instances=remap[inst])


def _place(rng, placed: list, r: float, w: int, h: int) -> tuple[float, float] | None:
    """A centre for an object of half-size ``r`` that hides at most about half of any earlier one.

    Appends the new object's rough box to ``placed``; ``None`` when 15 tries fail.
    """
    reach = 1.3 * r
    for _ in range(15):
        # The centre stays 0.65 r inside the image: up to about a quarter of an object's
        # width may stick out (truncated objects).
        lo_x, hi_x = reach * 0.5, w - reach * 0.5
        lo_y, hi_y = reach * 0.5, h - reach * 0.5
        cx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else w / 2
        cy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else h / 2
        box = (cx - reach, cy - reach, cx + reach, cy + reach)
        if all(_overlap(p, box) <= 0.55 for p in placed):
            placed.append(box)
            return cx, cy
    return None


def _overlap(earlier, later) -> float:
    """The fraction of ``earlier``'s area covered by ``later``."""
    iw = min(earlier[2], later[2]) - max(earlier[0], later[0])
    ih = min(earlier[3], later[3]) - max(earlier[1], later[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((earlier[2] - earlier[0]) * (earlier[3] - earlier[1]))


def _hue_colour(rng, hue_range, sat=(150, 255), val=(150, 255)) -> np.ndarray:
    """A BGR colour (float32 [3]) with hue drawn from ``hue_range`` (OpenCV degrees)."""
    hue = int(round(rng.uniform(*hue_range))) % 180
    hsv = np.array([[[hue, int(rng.integers(*sat)), int(rng.integers(*val))]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


#: Saturation range of everything that is not an object (background, blobs, lines, distractors).
#: The objects are saturated (150-255): colour tells figure from clutter at a glance, shape and
#: texture tell the classes apart. With clutter as saturated as the objects, a from-scratch
#: SSDLite reached only 0.12-0.19 VOC07 mAP in the CPU budget of the default pipeline.
_CLUTTER_SAT = (0, 110)


def _random_colour(rng, sat=_CLUTTER_SAT, val=(30, 256)) -> np.ndarray:
    return _hue_colour(rng, (0, 180), sat, val)


def _voc_background(rng, h: int, w: int) -> np.ndarray:
    """A cluttered background, uint8 [H, W, 3]: gradient, colour noise, blurred blobs, lines."""
    c0 = _random_colour(rng, (0, 140), (40, 230))
    c1 = _random_colour(rng, (0, 140), (40, 230))
    a = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(a) + ys * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
    grid = tuple(int(v) for v in rng.integers(3, 9, size=2))
    img += _smooth_noise(rng, grid, (h, w), channels=3) * float(rng.uniform(8, 30))

    blobs = np.zeros((h, w, 3), np.float32)
    weight = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 7))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(blobs, centre, axes, angle, 0, 360, _random_colour(rng).tolist(), -1)
        cv2.ellipse(weight, centre, axes, angle, 0, 360, 1.0, -1)
    k = 2 * int(rng.integers(4, 10)) + 1
    blobs = cv2.GaussianBlur(blobs, (k, k), 0)
    weight = cv2.GaussianBlur(weight, (k, k), 0)[..., None] * rng.uniform(0.2, 0.6)
    img = img * (1 - weight) + blobs * weight
    out = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(1, 7))):
        p0 = (int(rng.integers(-20, w + 20)), int(rng.integers(-20, h + 20)))
        p1 = (int(rng.integers(-20, w + 20)), int(rng.integers(-20, h + 20)))
        cv2.line(out, p0, p1, _random_colour(rng).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    return out


def _voc_distractor(rng, img: np.ndarray, inst: np.ndarray | None, short: int) -> None:
    """Draw one shape that is none of the classes; with ``inst`` it hides what is under it.

    Elongated ellipses, smooth irregular blobs (mostly plain, a few striped or
    checkered, so texture alone does not quite give a class away) and scribbles.
    The textured ones are rare: with many of them a from-scratch model needs far
    more than the CPU budget of the default pipeline to learn shape over texture.
    """
    h, w = img.shape[:2]
    # 0 ellipse, 1 plain blob, 2 textured blob, 3 scribble
    kind = int(rng.choice(4, p=(0.35, 0.35, 0.05, 0.25)))
    mask = np.zeros((h, w), np.uint8)
    cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
    size = float(rng.uniform(0.05, 0.25)) * short
    if kind == 0:  # elongated ellipse, never disc-like
        axes = (max(2, int(size)), max(1, int(size / rng.uniform(2.5, 5.0))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 3:  # scribble
        pts = np.cumsum(rng.normal(0, size * 0.6, (int(rng.integers(3, 7)), 2)), axis=0) + (cx, cy)
        cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, int(rng.integers(1, 5)))
    else:  # smooth blob: radius modulated by the 2nd and 3rd harmonics (bean / potato shapes)
        theta = np.linspace(0, 2 * math.pi, 36, endpoint=False)
        radius = np.ones_like(theta)
        for harmonic in (2, 3):
            radius += rng.uniform(0.12, 0.3) * np.cos(harmonic * theta + rng.uniform(0, 2 * math.pi))
        pts = np.stack([cx + size * radius * np.cos(theta), cy + size * radius * np.sin(theta)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    sel = mask.astype(bool)
    colour = _random_colour(rng, _CLUTTER_SAT, (40, 256))
    if kind == 2:  # textured blob
        other = _random_colour(rng, _CLUTTER_SAT, (40, 256))
        ys, xs = np.nonzero(sel)
        period = rng.uniform(3, 9)
        if rng.random() < 0.5:
            a = rng.uniform(0, math.pi)
            stripe = ((xs * math.cos(a) + ys * math.sin(a)) // period).astype(np.int64) % 2
        else:
            stripe = ((xs // period).astype(np.int64) + (ys // period).astype(np.int64)) % 2
        img[ys, xs] = np.where(stripe[:, None] == 1, colour, other).astype(np.uint8)
    else:
        img[sel] = colour.astype(np.uint8)
    if inst is not None:
        inst[sel] = 0


def _voc_object(rng, img, inst, k: int, cls: str, cx: float, cy: float, r: float) -> tuple[int, int, tuple]:
    """Draw object ``k`` of class ``cls`` centred at ``(cx, cy)`` with half-size ``r``.

    Writes ``k`` into ``inst`` where it is drawn. Returns the mask's area in
    full and inside the image, and its exact box inside the image.
    """
    h, w = img.shape[:2]
    sx, sy = (float(v) for v in rng.uniform(0.85, 1.15, size=2))  # mild stretch: no two alike
    ang = float(rng.uniform(0, 2 * math.pi))
    reach = 1.5 * r * max(sx, sy)
    x0, x1 = int(math.floor(cx - reach)) - 1, int(math.ceil(cx + reach)) + 2
    y0, y1 = int(math.floor(cy - reach)) - 1, int(math.ceil(cy + reach)) + 2
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres
    c, s = math.cos(ang), math.sin(ang)
    u = (c * dx + s * dy) / (r * sx)  # object frame: the shape lies within |u|, |v| <= ~1
    v = (-s * dx + c * dy) / (r * sy)
    rr = u * u + v * v
    colour = _hue_colour(rng, VOC_HUES[cls])

    if cls == "disc":  # solid, shaded like a lit sphere
        mask = rr <= 1.0
        la = rng.uniform(0, 2 * math.pi)
        shade = 1.0 - 0.25 * (u * math.cos(la) + v * math.sin(la)) - 0.15 * rr
        tex = colour * shade[..., None]
    elif cls == "ring":  # flat colour, a hole showing the background
        inner = rng.uniform(0.45, 0.65)
        mask = (rr <= 1.0) & (rr >= inner * inner)
        tex = np.broadcast_to(colour, u.shape + (3,))
    elif cls == "square":  # stripes parallel to one side
        mask = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
        stripes = int(rng.integers(4, 7))
        on = np.floor((u + 1.0) * stripes / 2.0).astype(np.int64) % 2 == 0
        dark = colour * rng.uniform(0.15, 0.35)
        tex = np.where(on[..., None], colour, dark)
    elif cls == "triangle":  # checkerboard with a light colour
        normals = [(math.cos(t), math.sin(t)) for t in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        mask = np.ones_like(u, bool)
        for nx, ny in normals:
            mask &= u * nx + v * ny <= 0.5
        cells = rng.uniform(2.5, 3.5)
        on = (np.floor((u + 2) * cells) + np.floor((v + 2) * cells)).astype(np.int64) % 2 == 0
        light = np.full(3, rng.uniform(215, 255), np.float32)
        tex = np.where(on[..., None], colour, light)
    elif cls == "star":  # five points, bright core
        mask = rr <= _star_radius(np.arctan2(v, u), rng.uniform(0.38, 0.5)) ** 2
        core = np.clip(1.0 - np.sqrt(rr) / 0.6, 0.0, 1.0)[..., None]
        tex = colour + (255.0 - colour) * 0.75 * core
    else:  # cross: plus sign with dark dots
        arm = rng.uniform(0.3, 0.4)
        au, av = np.abs(u), np.abs(v)
        mask = ((au <= arm) & (av <= 1.0)) | ((av <= arm) & (au <= 1.0))
        dots = rng.uniform(3.0, 4.0)
        fu, fv = (u * dots) % 1.0 - 0.5, (v * dots) % 1.0 - 0.5
        dot = fu * fu + fv * fv < 0.08
        tex = np.where(dot[..., None], colour * 0.3, colour)

    full = int(mask.sum())
    # Clip the patch to the image.
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x1, w), min(y1, h)
    sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    inside = int(sub.sum())
    if inside:
        tsub = np.asarray(tex)[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        region = img[cy0:cy1, cx0:cx1]
        region[sub] = np.clip(tsub[sub], 0, 255).astype(np.uint8)
        inst[cy0:cy1, cx0:cx1][sub] = k
        extent = _mask_box(sub, cx0, cy0)
    else:
        extent = (0.0, 0.0, 0.0, 0.0)
    return full, inside, extent


def _mask_box(mask: np.ndarray, x0: int, y0: int) -> tuple[float, float, float, float]:
    """The tight box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of a non-empty mask with top-left pixel (x0, y0)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    return (float(x0 + cols[0]), float(y0 + rows[0]), float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))


def _smooth_noise(rng, grid: tuple[int, int], size: tuple[int, int], channels: int = 0) -> np.ndarray:
    """Unit Gaussian noise on a coarse ``grid`` (rows, cols), upsampled smoothly to ``size`` (H, W).

    Returns float32 ``[H, W]``, or ``[H, W, channels]`` when ``channels`` is given.
    """
    shape = grid + ((channels,) if channels else ())
    coarse = rng.standard_normal(shape, np.float32)
    return cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def _star_radius(theta: np.ndarray, inner: float) -> np.ndarray:
    """Radius of a five-pointed star (outer radius 1) with straight edges, at angle ``theta``."""
    phi = math.pi / 5  # half the angle between points
    t = (theta + math.pi / 2) % (2 * phi)  # a point straight up
    t = np.where(t > phi, 2 * phi - t, t)
    # The ray at angle t meets the edge from the point (1, 0) to the notch (inner, phi) at this radius.
    a = inner * math.sin(phi)
    return a / (a * np.cos(t) + (1 - inner * math.cos(phi)) * np.sin(t))


# --------------------------------------------------------------------------- IR videos

# Nominal object size in pixels at a 120 px frame height: person height, car length, bike width.
_IR_SIZE = {"person": (22.0, 46.0), "car": (30.0, 62.0), "bike": (16.0, 26.0)}
# Speed in pixels per frame at a 120 px frame height: a box moves only a few pixels per frame.
_IR_SPEED = {"person": (0.3, 1.0), "car": (0.8, 2.0), "bike": (0.6, 1.5)}
# Largest angle between the heading and the horizontal (radians): vehicles keep to the road.
_IR_HEADING = {"person": 0.8, "car": 0.2, "bike": 0.3}
# Degradation events: (weight, shortest, longest run of frames).
_EVENTS = {
    "noise": (0.28, 2, 4),
    "occlusion": (0.24, 2, 5),
    "washout": (0.24, 2, 4),
    "dark": (0.10, 1, 2),
    "garbage": (0.09, 1, 2),
    "frozen": (0.05, 1, 3),
}
_CLEAN_HEAD = 3  # clean frames at the start of a video, so memory has something to hold
_CLEAN_GAP = 2  # clean frames between two degradation events
_MIN_INSIDE = 0.25  # an object with less of its area inside the frame is not annotated
_SHIFT = 4  # sub-pixel bits for OpenCV drawing
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class _Track:
    """A warm object's smooth path: centre(t) = start + velocity * t + a gentle sideways sine."""

    track_id: int
    cls: str
    size: float  # nominal size (see _IR_SIZE) at t = 0, pixels
    growth: float  # relative size change per frame (approaching or receding)
    start: tuple[float, float]
    velocity: tuple[float, float]
    wobble: tuple[float, float, float]  # amplitude (px), angular frequency (rad/frame), phase
    heat: float  # temperature offset of this object (grey levels)
    facing: int  # +1 right, -1 left

    def centre(self, t: float) -> tuple[float, float]:
        amp, omega, phase = self.wobble
        vx, vy = self.velocity
        speed = math.hypot(vx, vy) or 1.0
        side = amp * math.sin(omega * t + phase)
        return (self.start[0] + vx * t - vy / speed * side, self.start[1] + vy * t + vx / speed * side)

    def extent(self, t: float) -> tuple[float, float]:
        """Nominal width and height at frame ``t``."""
        s = self.size * (1.0 + self.growth * t)
        if self.cls == "person":
            return 0.36 * s, s
        if self.cls == "car":
            return s, 0.45 * s
        return s, 1.15 * s


def ir_video(seed: int, index: int, spec: IrSpec = IrSpec()) -> SyntheticVideo:
    """Generate video ``index`` of the infrared data set for ``seed``.

    Video ``index`` holds ``1 + index % spec.max_objects`` objects (so every
    count occurs even in tiny data sets) of random classes, moving on smooth
    paths (at most about 3 px per frame). Exactly
    ``round(spec.degraded_fraction * spec.frames)`` frames are degraded, in
    runs of 1-5 frames after at least :data:`_CLEAN_HEAD` clean frames at the
    start and :data:`_CLEAN_GAP` between runs (fewer when a short video
    cannot fit them). Objects mostly outside the frame (under a quarter of
    their area inside) are left out of that frame's annotations; no object is
    ``difficult``.
    """
    rng = np.random.default_rng([seed, _IR_STREAM, index])
    T, H, W = spec.frames, spec.height, spec.width
    scale = H / 120.0
    scene = "night" if rng.random() < 0.5 else "day"
    background = _ir_background(rng, H, W, scene)
    column_noise = rng.normal(0.0, rng.uniform(1.5, 3.5), W).astype(np.float32)  # fixed pattern
    sigma = float(rng.uniform(2.0, 4.0))
    agc = (float(rng.uniform(0, 4)), float(rng.uniform(20, 60)), float(rng.uniform(0, 2 * math.pi)))
    tracks = [_ir_track(rng, k + 1, T, W, H, scale) for k in range(1 + index % spec.max_objects)]
    degradation = _schedule(rng, T, spec.degraded_fraction)

    # Objects first: occluders are placed from where the objects will be.
    drawings = [[_ir_draw(track, t) for track in tracks] for t in range(T)]
    bands = _occluder_bands(rng, degradation, drawings, W, H)

    frames = np.empty((T, H, W), np.uint8)
    instances = np.zeros((T, H, W), np.int8)
    objects: list[tuple[ObjectAnnotation, ...]] = []
    previous = None
    for t in range(T):
        f = background + agc[0] * math.sin(2 * math.pi * t / agc[1] + agc[2])
        inst = instances[t]
        # Far objects (box bottom higher in the frame) first, near ones over them.
        order = sorted(range(len(tracks)), key=lambda k: drawings[t][k][1] + drawings[t][k][3].shape[0])
        for k in order:
            _paste(f, inst, *drawings[t][k], tracks[k].track_id)
        if t in bands:
            b0, b1, cold = bands[t]
            f[:, b0:b1] = cold[:, : b1 - b0]
            inst[:, b0:b1] = 0
        f = f + column_noise + rng.standard_normal((H, W), np.float32) * sigma
        kind = degradation[t]
        if kind == "frozen" and previous is not None:
            out = previous.copy()
        else:
            out = np.clip(np.rint(_degrade(rng, f, kind)), 0, 255).astype(np.uint8)
        frames[t] = out
        if not kind:
            previous = out
        objects.append(_ir_annotations(tracks, drawings[t], inst, W, H))

    return SyntheticVideo(
        name=f"ir_{index:03d}-{scene}",
        frames=frames,
        objects=tuple(objects),
        degradation=tuple(degradation),
        instances=instances,
    )


def video_splits(seed: int, count: int, val_fraction: float) -> tuple[str, ...]:
    """``"train"`` or ``"val"`` for each of ``count`` videos: whole videos, never both.

    ``round(val_fraction * count)`` videos go to val, chosen by a permutation
    seeded from ``seed``; when ``count >= 2`` and ``0 < val_fraction < 1``
    both splits get at least one video.
    """
    n_val = int(round(val_fraction * count))
    if count >= 2 and 0 < val_fraction < 1:
        n_val = min(max(n_val, 1), count - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(count)
    val = set(order[:n_val].tolist())
    return tuple("val" if i in val else "train" for i in range(count))


def _ir_track(rng, track_id: int, T: int, W: int, H: int, scale: float) -> _Track:
    cls = IR_CLASSES[int(rng.integers(len(IR_CLASSES)))]
    size = float(rng.uniform(*_IR_SIZE[cls])) * scale
    speed = float(rng.uniform(*_IR_SPEED[cls])) * scale
    heading = float(rng.uniform(-_IR_HEADING[cls], _IR_HEADING[cls]))
    facing = 1 if rng.random() < 0.5 else -1
    wobble = (
        float(rng.uniform(0, 5)) * scale,  # a few pixels sideways
        2 * math.pi / float(rng.uniform(T, 3 * T)),  # over one to three video lengths
        float(rng.uniform(0, 2 * math.pi)),
    )
    growth = float(rng.uniform(-0.15, 0.15)) / T
    heat = float(rng.uniform(-12, 12))
    # Most objects stay in view throughout; some walk or drive into or out of the frame
    # (frames without them then have no box). Falls back to staying in view when
    # the object is too slow to come in (or go out) within the video.
    mode = ("inside", "enter", "leave")[int(rng.choice(3, p=(0.8, 0.1, 0.1)))]
    for attempt in range(60):
        if attempt == 30:
            mode = "inside"
        v = speed * (0.5 ** (attempt // 20)) if mode == "inside" else speed  # too long a path: slow down
        velocity = (facing * v * math.cos(heading), v * math.sin(heading))
        y = float(rng.uniform(0, H))
        if mode == "inside":
            x = float(rng.uniform(0, W))
            start = (x - velocity[0] * (T - 1) / 2, y - velocity[1] * (T - 1) / 2)
        else:
            t_edge = 0 if mode == "enter" else T - 1
            w_edge = _Track(track_id, cls, size, growth, (0, 0), velocity, wobble, heat, facing).extent(t_edge)[0]
            beyond = w_edge / 2 + float(rng.uniform(0, 8))
            # Entering: just outside the edge it comes from; leaving: just past the edge it goes to.
            left_side = (facing > 0) == (mode == "enter")
            x = -beyond if left_side else W + beyond
            start = (x - velocity[0] * t_edge, y - velocity[1] * t_edge)
        track = _Track(track_id, cls, size, growth, start, velocity, wobble, heat, facing)
        if _path_fits(track, mode, T, W, H):
            return track
    return track


def _path_fits(track: _Track, mode: str, T: int, W: int, H: int) -> bool:
    """Whether the object stays vertically in view, and horizontally too unless it enters or leaves.

    An entering or leaving object must be fully in view for at least 40% of the video.
    """
    in_view = 0
    for t in range(T):
        (cx, cy), (w, h) = track.centre(t), track.extent(t)
        if not h / 2 <= cy <= H - h / 2:
            return False
        inside = w / 2 <= cx <= W - w / 2
        if mode == "inside" and not inside:
            return False
        in_view += inside
    return in_view >= 0.4 * T


def _ir_background(rng, h: int, w: int, scene: str) -> np.ndarray:
    """A cool, gently structured scene, float32 [H, W]: sky, ground, buildings, road, poles, lamps."""
    base, amp = (float(rng.uniform(80, 105)), 12.0) if scene == "day" else (float(rng.uniform(40, 62)), 8.0)
    ys = np.arange(h, dtype=np.float32)[:, None]
    horizon = float(rng.uniform(0.2, 0.5)) * h
    ground = 1.0 / (1.0 + np.exp(-(ys - horizon) / 2.0))
    f = np.broadcast_to(base - 18.0 + 10.0 * ys / h + ground * 22.0, (h, w)).astype(np.float32).copy()
    f += _smooth_noise(rng, (int(rng.integers(3, 7)), int(rng.integers(4, 9))), (h, w)) * amp
    for _ in range(int(rng.integers(0, 4))):  # buildings on the horizon
        bw, bh = int(rng.integers(w // 10, w // 3)), int(rng.integers(h // 10, h // 3))
        bx, by = int(rng.integers(-bw // 2, w)), int(horizon) - bh
        f[max(by, 0) : int(horizon) + 1, max(bx, 0) : bx + bw] += float(rng.uniform(-12, 20))
    if rng.random() < 0.6:  # a road, a little warmer than the ground
        r0 = int(rng.uniform(horizon + 0.1 * h, 0.9 * h))
        f[r0 : r0 + int(rng.integers(h // 10, h // 4))] += float(rng.uniform(5, 14))
    for _ in range(int(rng.integers(0, 3))):  # cold poles: the same look as an occluder, but harmless
        px, pw = int(rng.integers(0, w)), int(rng.integers(3, 12))
        f[: int(rng.uniform(0.5, 1.0) * h), px : px + pw] = float(rng.uniform(15, 45))
    for _ in range(int(rng.integers(0, 4))):  # small warm spots: lamps, windows
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(f, centre, int(rng.integers(1, 4)), float(rng.uniform(120, 190)), -1)
    return cv2.GaussianBlur(f, (0, 0), float(rng.uniform(0.8, 1.6)))


def _schedule(rng, T: int, share: float) -> list[str]:
    """Which frames are degraded and how: exactly ``round(share * T)`` of them, in short runs."""
    n_bad = int(round(share * T))
    if n_bad <= 0:
        return [""] * T
    kinds = list(_EVENTS)
    weights = np.array([_EVENTS[k][0] for k in kinds])
    events: list[tuple[str, int]] = []
    left = n_bad
    while left > 0:
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        length = min(int(rng.integers(_EVENTS[kind][1], _EVENTS[kind][2] + 1)), left)
        events.append((kind, length))
        left -= length
    clean = T - n_bad
    head, gap = _CLEAN_HEAD, _CLEAN_GAP
    while head + gap * (len(events) - 1) > clean:  # a short video: squeeze the clean stretches
        if gap > 1 or (gap == 1 and head <= 1):
            gap -= 1
        else:
            head -= 1
        if gap < 0:
            gap, head = 0, 0
            break
    spare = clean - head - gap * (len(events) - 1)
    # Spread the spare clean frames over the head, the gaps and the tail.
    cuts = np.sort(rng.integers(0, spare + 1, size=len(events)))
    extra = np.diff(np.concatenate([[0], cuts, [spare]]))
    out: list[str] = [""] * (head + int(extra[0]))
    for i, (kind, length) in enumerate(events):
        out += [kind] * length
        out += [""] * ((gap if i < len(events) - 1 else 0) + int(extra[i + 1]))
    return out


def _ir_draw(track: _Track, t: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Render ``track`` at frame ``t``: ``(x0, y0, patch float32 [h, w], mask bool [h, w])``.

    The patch's top-left pixel is ``(x0, y0)`` in the frame (may lie outside it).
    """
    (cx, cy), (w, h) = track.centre(t), track.extent(t)
    left, top = cx - w / 2, cy - h / 2
    x0, y0 = int(math.floor(left)) - 2, int(math.floor(top)) - 2
    patch = np.zeros((int(math.ceil(h)) + 5, int(math.ceil(w)) + 5), np.float32)
    mask = np.zeros(patch.shape, np.uint8)
    ox, oy = left - x0, top - y0  # the object's nominal top-left in patch coordinates
    hot = track.heat
    gait = t * math.hypot(*track.velocity) * 0.6 + track.track_id

    def at(px: float, py: float) -> tuple[float, float]:
        # Nominal coordinates (fractions of w, h; x mirrored when facing left) -> patch pixels.
        if track.facing < 0:
            px = 1.0 - px
        return ox + px * w, oy + py * h

    def fill(pts_px, value):
        # OpenCV puts pixel centres at integer coordinates.
        pts = np.round((np.asarray(pts_px) - 0.5) * _ONE).astype(np.int32)
        cv2.fillPoly(patch, [pts], float(value), cv2.LINE_8, _SHIFT)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, _SHIFT)

    def poly(points, value):
        fill([at(*p) for p in points], value)

    def disc(px, py, radius, value, thickness=-1):
        x, y = at(px, py)
        centre = (int(round((x - 0.5) * _ONE)), int(round((y - 0.5) * _ONE)))
        r = int(round(radius * _ONE))
        cv2.circle(patch, centre, r, float(value), thickness, cv2.LINE_8, _SHIFT)
        cv2.circle(mask, centre, r, 1, thickness, cv2.LINE_8, _SHIFT)

    def limb(p0, p1, width, value):
        # A bar ``width * w`` pixels wide from p0 to p1.
        (ax, ay), (bx, by) = at(*p0), at(*p1)
        n = math.hypot(bx - ax, by - ay) or 1.0
        ex, ey = -(by - ay) / n * width * w / 2, (bx - ax) / n * width * w / 2
        fill([(ax + ex, ay + ey), (bx + ex, by + ey), (bx - ex, by - ey), (ax - ex, ay - ey)], value)

    if track.cls == "person":
        swing = 0.22 * math.sin(gait)
        limb((0.38, 0.55), (0.38 + swing, 1.0), 0.24, 160 + hot)  # legs
        limb((0.62, 0.55), (0.62 - swing, 1.0), 0.24, 165 + hot)
        limb((0.1, 0.24), (0.06 - swing / 2, 0.52), 0.16, 170 + hot)  # arms
        limb((0.9, 0.24), (0.94 + swing / 2, 0.52), 0.16, 170 + hot)
        poly([(0.12, 0.2), (0.88, 0.2), (0.8, 0.58), (0.2, 0.58)], 190 + hot)  # torso
        disc(0.5, 0.11, 0.105 * h, 225 + hot)  # head, the warmest part
    elif track.cls == "car":
        poly([(0.22, 0.42), (0.33, 0.02), (0.68, 0.02), (0.8, 0.42)], 118 + hot)  # cabin: cool glass
        poly([(0.0, 0.5), (0.05, 0.38), (0.95, 0.38), (1.0, 0.5), (1.0, 0.8), (0.0, 0.8)], 140 + hot)  # body
        poly([(0.74, 0.38), (0.95, 0.38), (1.0, 0.5), (1.0, 0.76), (0.74, 0.76)], 225 + hot)  # engine
        disc(0.2, 0.78, 0.22 * h, 195 + hot)  # wheels: warm tyres and brakes
        disc(0.8, 0.78, 0.22 * h, 195 + hot)
        disc(0.03, 0.72, 0.06 * h, 235 + hot)  # exhaust
    else:
        hub = 1.0 - 0.2 * w / h
        ring = max(1, int(round(0.07 * w)))
        disc(0.2, hub, 0.2 * w, 150 + hot, ring)  # wheels
        disc(0.8, hub, 0.2 * w, 150 + hot, ring)
        limb((0.2, hub), (0.45, 0.55), 0.08, 135 + hot)  # frame
        limb((0.45, 0.55), (0.8, hub), 0.08, 135 + hot)
        limb((0.45, 0.52), (0.5 + 0.08 * math.sin(gait), hub), 0.14, 170 + hot)  # leg
        limb((0.42, 0.52), (0.62, 0.2), 0.22, 195 + hot)  # torso
        limb((0.62, 0.22), (0.8, 0.45), 0.1, 180 + hot)  # arm
        disc(0.66, 0.1, 0.1 * h, 220 + hot)  # head
    return x0, y0, patch, mask.astype(bool)


def _paste(f: np.ndarray, inst: np.ndarray, x0: int, y0: int, patch, mask, track_id: int) -> None:
    """Draw a rendered object into frame ``f`` and mark its pixels in ``inst``."""
    H, W = f.shape
    ph, pw = mask.shape
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + pw, W), min(y0 + ph, H)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sub = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    f[fy0:fy1, fx0:fx1][sub] = patch[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0][sub]
    inst[fy0:fy1, fx0:fx1][sub] = track_id


def _ir_annotations(tracks, drawings, inst, W: int, H: int) -> tuple[ObjectAnnotation, ...]:
    out = []
    visible = np.bincount(inst.ravel().astype(np.int64), minlength=len(tracks) + 1)
    for track, (x0, y0, _, mask) in zip(tracks, drawings):
        ph, pw = mask.shape
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + pw, W), min(y0 + ph, H)
        full = int(mask.sum())
        sub = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] if fx0 < fx1 and fy0 < fy1 else mask[:0, :0]
        inside = int(sub.sum())
        if inside < _MIN_INSIDE * full:
            continue
        box = _mask_box(sub, fx0, fy0)
        out.append(
            ObjectAnnotation(
                name=track.cls,
                box=box,
                truncated=inside < full,
                visibility=round(float(visible[track.track_id]) / full, 4),
                track_id=track.track_id,
            )
        )
    return tuple(out)


def _occluder_bands(rng, degradation, drawings, W: int, H: int) -> dict[int, tuple[int, int, np.ndarray]]:
    """For each run of ``occlusion`` frames, a cold full-height band hiding one object throughout.

    Returns ``{frame: (x0, x1, cold float32 [H, >= x1 - x0])}``.
    """
    bands = {}
    t = 0
    while t < len(degradation):
        if degradation[t] != "occlusion":
            t += 1
            continue
        end = t
        while end < len(degradation) and degradation[end] == "occlusion":
            end += 1
        # An object that is in view throughout the run, if any.
        spans = []
        for k in range(len(drawings[t])):
            xs = []
            for u in range(t, end):
                x0, _, _, mask = drawings[u][k]
                cols = np.nonzero(mask.any(axis=0))[0] + x0
                cols = cols[(cols >= 0) & (cols < W)]
                xs.append((cols.min(), cols.max() + 1) if cols.size else None)
            if all(x is not None for x in xs):
                spans.append((min(x[0] for x in xs), max(x[1] for x in xs)))
        if spans:
            lo, hi = spans[int(rng.integers(len(spans)))]
        else:
            lo = int(rng.integers(0, W - 8))
            hi = lo + 8
        b0 = max(0, int(lo) - int(rng.integers(2, 11)))
        b1 = min(W, int(hi) + int(rng.integers(2, 11)))
        level = float(rng.uniform(15, 40))
        cold = level + 4.0 * _smooth_noise(rng, (4, 3), (H, b1 - b0))
        for u in range(t, end):
            bands[u] = (b0, b1, cold)
        t = end
    return bands


def _degrade(rng, f: np.ndarray, kind: str) -> np.ndarray:
    """Apply one degradation to a float frame (``""`` and ``"occlusion"``: unchanged)."""
    H, W = f.shape
    if kind == "noise":  # gain drops, blotches of object size, heavy grain, dead pixels
        m = float(f.mean())
        g = float(rng.uniform(0.25, 0.45))
        blotch = _smooth_noise(rng, (max(H // 8, 2), max(W // 8, 2)), (H, W)) * float(rng.uniform(30, 45))
        grain = rng.standard_normal((H, W), np.float32) * float(rng.uniform(45, 70))
        out = m + g * (f - m) + blotch + grain
        out += rng.normal(0, 12, W)
        dead = rng.random((H, W)) < rng.uniform(0.03, 0.07)
        out[dead] = rng.choice(np.array([0.0, 255.0]), size=int(dead.sum()))
        return out
    if kind == "washout":  # contrast collapsed around a bright level
        c = float(rng.uniform(0.02, 0.06))
        blotch = _smooth_noise(rng, (max(H // 10, 2), max(W // 10, 2)), (H, W)) * float(rng.uniform(2, 5))
        grain = rng.standard_normal((H, W), np.float32) * float(rng.uniform(2, 4))
        level = float(rng.uniform(150, 230))
        return level + c * (f - float(f.mean())) + blotch + grain
    if kind == "dark" or kind == "frozen":  # frozen with nothing to repeat: a dark frame
        return float(rng.uniform(2, 12)) + rng.normal(0, 1.5, (H, W))
    if kind == "garbage":  # a decoder's blocks and streaks
        block = int(rng.choice([4, 8, 16]))
        blocks = rng.uniform(0, 255, (H // block + 1, W // block + 1)).astype(np.float32)
        out = np.kron(blocks, np.ones((block, block), np.float32))[:H, :W].copy()
        rows = rng.random(H) < 0.15
        out[rows] = rng.uniform(0, 255, (int(rows.sum()), 1))
        return out
    return f
