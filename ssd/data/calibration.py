"""Frames to calibrate an int8 graph on (:func:`ssd.quantize.quantize_int8`), drawn from shards.

The frames are spread over the whole split rather than its first images: frame shards give
``count`` evenly spaced images; clip shards give runs of ``run_length`` consecutive frames of
videos spread evenly over the split, each run starting a sequence, so a temporal graph is
calibrated on the state it reaches while streaming, not only on its zero state. Each frame
goes through the evaluation transform (resize, [0, 1] float), as at inference.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ssd.data.loader import eval_loader


def calibration_frames(
    urls: str | Sequence[str], *, image_size: int, kind: str, count: int, run_length: int = 8
) -> Iterator[tuple[np.ndarray, bool]]:
    """``(images float32 [1, 3, S, S], starts_sequence)`` for about ``count`` frames of ``urls``.

    ``kind``: ``frames`` (frame shards) or ``frames_from_clips`` (clip shards, each distinct
    frame once). Fewer frames come out when the split has fewer.
    """
    if count < 1 or run_length < 1:
        raise ValueError(f"calibration_frames: count {count} and run_length {run_length} must be positive")
    dataset = eval_loader(urls, image_size=image_size, rank=0, world_size=1, batch_size=1, num_workers=0,
                          kind=kind).dataset  # type: ignore[arg-type]
    for index, starts in pick(dataset.entries, kind, count, run_length):
        yield dataset[index].image.unsqueeze(0).numpy(), starts


def pick(entries: Sequence, kind: str, count: int, run_length: int) -> list[tuple[int, bool]]:
    """``(entry index, starts_sequence)`` of the frames :func:`calibration_frames` yields, in order."""
    n = len(entries)
    if kind == "frames" or n == 0:
        return [(int(i), True) for i in np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))]
    videos: dict[str, list[int]] = {}
    for i, e in enumerate(entries):  # (video, frame number) order
        videos.setdefault(e.sort_key[0], []).append(i)
    names = list(videos)
    runs = -(-count // run_length)
    picked: list[tuple[int, bool]] = []
    for r in range(runs):
        if runs <= len(names):  # one run from each of `runs` evenly spaced videos
            frames, lap = videos[names[r * len(names) // runs]], 0
        else:  # more runs than videos: every video, later laps further into it
            frames, lap = videos[names[r % len(names)]], r // len(names)
        run = frames[lap * run_length:(lap + 1) * run_length]
        picked.extend((i, k == 0) for k, i in enumerate(run))
    return picked[:count]
