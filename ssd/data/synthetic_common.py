"""What the synthetic data sets share (:mod:`ssd.data.synthetic`): classes, degradations, seed
streams, the annotation and spec types, and two pixel helpers. No file I/O."""

from __future__ import annotations

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
