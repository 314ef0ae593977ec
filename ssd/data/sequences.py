"""Frames as sequences: frame ids, videos, clips and splits, as pure functions.

- Frame ids such as ``seq01_000123`` split into a video and a frame number
  (:func:`split_frame_id`, through a pattern with the named groups ``video`` and ``frame``);
- frames grouped into videos in numeric order, with a new segment at every gap
  (:func:`group_videos`); names ordered by the value of their digit runs (:func:`natural_key`);
- clips laid over a video (:func:`clip_starts`);
- whole videos assigned to splits, by a hash of their names (:func:`split_videos`).

The reasons a frame is skipped (:data:`ssd.data.annotations.BAD_FRAME_ID`,
:data:`~ssd.data.annotations.DUPLICATE_FRAME`) are the annotations' vocabulary.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Generic, Iterable, Sequence, TypeVar

from ssd.data.annotations import BAD_FRAME_ID, AnnotationError

T = TypeVar("T")

DEFAULT_FRAME_ID_PATTERN = r"^(?P<video>.+)[_-]\D*(?P<frame>\d+)$"
"""Everything before the last ``_`` or ``-`` is the video; the trailing digits are the frame
(``seq01_000123`` -> ``("seq01", 123)``, ``walk-f10`` -> ``("walk", 10)``)."""


def compile_frame_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a frame id pattern; it must have the named groups ``video`` and ``frame``.

    Raises ValueError (with a one-line message) otherwise.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
    missing = {"video", "frame"} - set(compiled.groupindex)
    if missing:
        raise ValueError(f"pattern {pattern!r} lacks the named group(s) {', '.join(sorted(missing))}")
    return compiled


def split_frame_id(frame_id: str, pattern: str | re.Pattern[str] = DEFAULT_FRAME_ID_PATTERN) -> tuple[str, int]:
    """``"seq01_000123" -> ("seq01", 123)`` through ``pattern`` (groups ``video`` and ``frame``).

    Raises :class:`AnnotationError` (:data:`BAD_FRAME_ID`) when the id does not
    match or the ``frame`` group is not an integer.
    """
    compiled = compile_frame_pattern(pattern) if isinstance(pattern, str) else pattern
    m = compiled.search(frame_id)
    if m is None or not m.group("video"):
        raise AnnotationError(BAD_FRAME_ID, f"{frame_id!r} does not match {compiled.pattern!r}")
    try:
        frame = int(m.group("frame"))
    except (TypeError, ValueError):
        raise AnnotationError(BAD_FRAME_ID, f"{frame_id!r}: frame {m.group('frame')!r} is not an integer") from None
    return m.group("video"), frame


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``"f2" < "f10"``, ``"Misc_9" < "Misc_10"``."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts)


def trailing_number(stem: str) -> int | None:
    """The last run of digits in a file stem (``"frame_0012" -> 12``), or None."""
    m = re.search(r"(\d+)\D*$", stem)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class VideoSegment(Generic[T]):
    """A run of frames of one video with no gap larger than the allowed one.

    ``segment`` counts the runs of one video from 0; ``frames`` are the frame
    numbers, strictly increasing; ``items`` the callers' payloads, same order.
    """

    video: str
    segment: int
    frames: tuple[int, ...]
    items: tuple[T, ...]


def group_videos(
    entries: Iterable[tuple[str, int, T]], max_gap: int = 0
) -> tuple[list[VideoSegment[T]], list[tuple[T, str]]]:
    """Group ``(video, frame number, payload)`` entries into videos ordered by frame NUMBER.

    Videos come out in :func:`natural_key` order of their names. Within a
    video, a jump between consecutive frame numbers that leaves more than
    ``max_gap`` numbers missing starts a new segment (``max_gap=0``: frames
    must be consecutive). A repeated frame number keeps the first entry (in
    input order); the others are returned as ``(payload, detail)`` with reason
    :data:`DUPLICATE_FRAME`.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    by_video: dict[str, list[tuple[int, int, T]]] = {}
    for order, (video, frame, payload) in enumerate(entries):
        by_video.setdefault(video, []).append((frame, order, payload))
    segments: list[VideoSegment[T]] = []
    duplicates: list[tuple[T, str]] = []
    for video in sorted(by_video, key=natural_key):
        frames: list[int] = []
        items: list[T] = []
        index = 0
        for frame, _, payload in sorted(by_video[video], key=lambda e: (e[0], e[1])):
            if frames and frame == frames[-1]:
                duplicates.append((payload, f"frame {frame} of video {video!r} appears more than once"))
                continue
            if frames and frame - frames[-1] - 1 > max_gap:
                segments.append(VideoSegment(video, index, tuple(frames), tuple(items)))
                index += 1
                frames, items = [], []
            frames.append(frame)
            items.append(payload)
        if frames:
            segments.append(VideoSegment(video, index, tuple(frames), tuple(items)))
    return segments, duplicates


def clip_starts(num_frames: int, clip_length: int, stride: int) -> list[int]:
    """Start indices of clips of ``clip_length`` frames covering ``num_frames`` frames.

    Clips start every ``stride`` frames; when the last regular clip stops short
    of the end, one more clip ends exactly at the last frame (it starts earlier
    and overlaps its neighbour), so no frame is left out. Fewer frames than
    ``clip_length``: no clip. ``1 <= stride <= clip_length`` (a larger stride
    would drop frames).

    >>> clip_starts(10, 4, 4)
    [0, 4, 6]
    """
    if clip_length < 1 or not 1 <= stride <= clip_length:
        raise ValueError(f"need clip_length >= 1 and 1 <= stride <= clip_length, got {clip_length}, {stride}")
    if num_frames < clip_length:
        return []
    starts = list(range(0, num_frames - clip_length + 1, stride))
    if starts[-1] + clip_length < num_frames:
        starts.append(num_frames - clip_length)
    return starts


def split_videos(names: Sequence[str], val_fraction: float) -> dict[str, str]:
    """Assign whole videos to ``"train"``/``"val"`` deterministically.

    The videos are ranked by the SHA-1 of their name (independent of listing
    order and stable when videos are added) and the first
    ``round(len(names) * val_fraction)`` go to val, at least one when
    ``val_fraction > 0`` and there are two or more videos.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(names), key=natural_key)
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0 and len(unique) >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(len(unique) - 1, 0))
    ranked = sorted(unique, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    val = set(ranked[:n_val])
    return {name: ("val" if name in val else "train") for name in unique}
