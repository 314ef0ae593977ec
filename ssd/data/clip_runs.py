"""Runs of consecutive clips, for carrying a temporal model's state from clip to clip:
:func:`cut_runs` (the training loader's sequence mode)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from ssd.data.samples import RawSample
from ssd.errors import InputError


def cut_runs(clips: Iterable[RawSample], limit: int) -> Iterator[list[RawSample]]:
    """Clips (in shard order) cut into runs of consecutive clips of one video segment, at most
    ``limit`` long. A run ends where the video or its segment changes (the clip writer starts a
    segment where the frame size changes), where the frame numbers stop increasing (another
    shard's part of the same video), and where a clip starts after the frame that follows the
    previous clip (a jump: no state could carry into it). Clips that overlap the previous one (a
    ``clip_stride`` below ``clip_length``, a video's tail clip) stay in the run."""
    run: list[RawSample] = []
    last: tuple = ("", 0, 0, 0)  # (video, segment, first frame, last frame) of the run's last clip
    for raw in clips:
        try:
            meta = json.loads(raw.meta)
            video, segment = str(meta["video"]), int(meta.get("segment", 0))
            start, end = int(meta["frames"][0]), int(meta["frames"][-1])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise InputError(f"{raw.url}: sample {raw.key!r}: bad JSON member ({e!r})") from None
        if run and (
            (video, segment) != last[:2]
            or start <= last[2]  # the next pass over the data
            or start > last[3] + 1  # a jump: this clip doesn't continue the run
            or len(run) == limit
        ):
            yield run
            run = []
        run.append(raw)
        last = (video, segment, start, end)
    if run:
        yield run
