"""The infrared synthetic videos (:func:`ir_video`, :func:`video_splits`; the conventions in
:mod:`ssd.data.synthetic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ssd.data import ir_degradation
from ssd.data.synthetic_common import (
    IR_CLASSES,
    _IR_STREAM,
    _SPLIT_STREAM,
    ObjectAnnotation,
    SyntheticVideo,
    IrSpec,
    _mask_box,
    _smooth_noise,
)

# Nominal object size in pixels at a 120 px frame height: person height, car length, bike width.
_IR_SIZE = {"person": (22.0, 46.0), "car": (30.0, 62.0), "bike": (16.0, 26.0)}
# Speed in pixels per frame at a 120 px frame height: a box moves only a few pixels per frame.
_IR_SPEED = {"person": (0.3, 1.0), "car": (0.8, 2.0), "bike": (0.6, 1.5)}
# Largest angle between the heading and the horizontal (radians): vehicles keep to the road.
_IR_HEADING = {"person": 0.8, "car": 0.2, "bike": 0.3}
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
    runs of 1-5 frames after at least ``CLEAN_HEAD`` clean frames at the
    start and ``CLEAN_GAP`` between runs (fewer when a short video cannot fit
    them; :mod:`ssd.data.ir_degradation`). Objects mostly outside the frame (under a quarter of
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
    degradation = ir_degradation.schedule(rng, T, spec.degraded_fraction)

    # Objects first: occluders are placed from where the objects will be.
    drawings = [[_ir_draw(track, t) for track in tracks] for t in range(T)]
    bands = ir_degradation.occluder_bands(rng, degradation, drawings, W, H)

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
            out = np.clip(np.rint(ir_degradation.degrade(rng, f, kind)), 0, 255).astype(np.uint8)
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
