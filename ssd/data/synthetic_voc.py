"""The VOC-style synthetic images (:func:`voc_image`; the conventions in :mod:`ssd.data.synthetic`)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ssd.data.synthetic_common import (
    VOC_CLASSES,
    _VOC_STREAM,
    VOC_HUES,
    ObjectAnnotation,
    SyntheticImage,
    VocSpec,
    _mask_box,
    _smooth_noise,
)


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


def _star_radius(theta: np.ndarray, inner: float) -> np.ndarray:
    """Radius of a five-pointed star (outer radius 1) with straight edges, at angle ``theta``."""
    phi = math.pi / 5  # half the angle between points
    t = (theta + math.pi / 2) % (2 * phi)  # a point straight up
    t = np.where(t > phi, 2 * phi - t, t)
    # The ray at angle t meets the edge from the point (1, 0) to the notch (inner, phi) at this radius.
    a = inner * math.sin(phi)
    return a / (a * np.cos(t) + (1 - inner * math.cos(phi)) * np.sin(t))
