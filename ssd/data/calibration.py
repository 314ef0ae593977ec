"""Frames to calibrate an int8 graph on (:func:`ssd.quantize.quantize_int8`), drawn from shards.

The frames are spread over the whole split rather than its first images: frame shards give
``count`` evenly spaced images; clip shards give runs of ``run_length`` consecutive frames of
videos spread evenly over the split, each run starting a sequence, so a temporal graph is
calibrated on the state it reaches while streaming, not only on its zero state. Each frame
goes through the evaluation transform (resize, [0, 1] float), as at inference.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from ssd.data.loader import eval_loader


def calibration_frames(
    urls: str | Sequence[str], *, image_size: int, kind: str, count: int, run_length: int = 8
) -> Iterator[tuple[np.ndarray, bool]]:
    """``(images float32 [1, 3, S, S], starts_sequence)`` for about ``count`` frames of ``urls``.

    ``kind``: ``frames`` (frame shards) or ``frames_from_clips`` (clip shards, each distinct
    frame once). Fewer frames come out only when the split has fewer: runs cut short by the
    end of a video are made up from other videos.
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
    picked: list[tuple[int, bool]] = []
    for lap in itertools.count():  # lap k: the k-th run of every video long enough to have one
        chunks = [f[lap * run_length:(lap + 1) * run_length] for f in videos.values() if len(f) > lap * run_length]
        if not chunks or len(picked) >= count:
            break
        need = count - len(picked)
        if sum(map(len, chunks)) > need:
            # Evenly spaced videos first, then the others in order while frames are still missing
            # (runs cut short by a video's end would otherwise leave the count unmet).
            k = min(len(chunks), -(-need // run_length))
            first = [r * len(chunks) // k for r in range(k)]
            taken = set(first)
            chunks = [chunks[i] for i in first] + [c for i, c in enumerate(chunks) if i not in taken]
        for run in chunks:
            if len(picked) >= count:
                break
            picked.extend((i, k == 0) for k, i in enumerate(run))
    return picked[:count]
