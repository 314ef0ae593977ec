"""Video records -> clip shards: one sample per clip of consecutive frames of one video.

Clips never cross a video or a gap in it (see ``docs/data-format.md``). Frames with
their own image files are read one per task, so that one long video still uses every
worker; a container (video file, frame folder) is decoded whole by one worker.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from ssd.data import sequences as seq
from ssd.data.shards import ShardWriter
from ssd.data.sources.clean import clean_frame
from ssd.data.sources.decode import DecodedVideo, LoadedImage, ordered_map, run_task
from ssd.data.sources.frame_writer import WriteOptions, sample_json
from ssd.data.sources.records import Frame, Listing, Video, sample_key
from ssd.data.sources.report import KEY_COLLISION, SHORT_VIDEO, Report


@dataclass(frozen=True)
class ClipOptions:
    clip_length: int = 8  # frames per clip (LSTM-SSD unroll length)
    stride: int = 8  # frames between clip starts (<= clip_length: no frame is dropped)
    max_gap: int = 0  # missing frame numbers tolerated inside a video; a bigger jump starts a new segment
    frame_split: float = 0.0  # > 0: the last share of each video's readable frames goes to the val split


class ClipWriter:
    """Cuts videos into clips and writes them; keeps the manifest's counts."""

    def __init__(self, clips: ClipOptions, opts: WriteOptions, splits: Sequence[str], classes: Sequence[str], report: Report):
        self.clips, self.opts, self.report = clips, opts, report
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.splits = list(splits)
        self.writers: dict[str, ShardWriter] = {}
        self.stats = {s: Counter() for s in splits}
        self.videos: dict[str, list[str]] = {s: [] for s in splits}
        self.keys: dict[str, str] = {}
        self.track_ids = False

    def open(self, stack: contextlib.ExitStack, out: Path) -> None:
        for s in self.splits:
            self.writers[s] = stack.enter_context(ShardWriter(out, s, self.opts.shard_size, self.opts.shard_max_bytes))

    def add_video(self, video: Video, frames: tuple[Frame, ...], images: Sequence[tuple[Frame, LoadedImage]]) -> None:
        """Write the clips of one video (all of whose frames are ``frames``) from its readable ``images``."""
        cleaned = []
        for ref, image in images:
            objs = clean_frame(ref, image, self.opts.size_mismatch, self.class_index, self.report)
            if objs is not None:
                cleaned.append((ref, image, objs))
        # Track ids are stored for every clip of a video whose source has any, so that
        # one video's clips all look alike (an object without one gets null).
        tracked = any(o.track_id is not None for ref in frames for o in ref.objects)
        self.track_ids |= tracked
        parts = [(video.split, cleaned)]
        if self.clips.frame_split > 0:  # by frame range: the head stays, the tail goes to val
            cut = round(len(cleaned) * (1 - self.clips.frame_split))
            parts = [(video.split, cleaned[:cut]), ("val", cleaned[cut:])]
        for split, part in parts:
            written = False
            for index, seg in enumerate(self._segments(video.name, part)):
                written |= self._write_segment(video, split, index, seg, tracked)
            if written:
                self.videos[split].append(video.name)

    def _write_segment(self, video: Video, split: str, index: int, seg: list, tracked: bool) -> bool:
        L = self.clips.clip_length
        span = f"video {video.name!r} frames {seg[0][0].number}..{seg[-1][0].number}"
        if len(seg) < L:
            self.report.skip(video.file, SHORT_VIDEO, f"{span}: {len(seg)} frames < {L}", defect=False)
            return False
        starts = seq.clip_starts(len(seg), L, self.clips.stride)
        st = self.stats[split]
        written = False
        for start in starts:
            clip = seg[start : start + L]
            key = sample_key(f"{video.name}_{clip[0][0].number:06d}")
            if key in self.keys:
                self.report.skip(video.file, KEY_COLLISION, f"{span}: key {key!r} is also {self.keys[key]!r}")
                continue
            self.keys[key] = video.name
            members = {f"{j:03d}.jpg": image.data for j, (_, image, _) in enumerate(clip)}
            sample = {
                "video": video.name,
                "segment": index,
                "frames": [ref.number for ref, _, _ in clip],
                "ids": [ref.id for ref, _, _ in clip],
                "width": clip[0][1].width,
                "height": clip[0][1].height,
                **{k: [o[k] for _, _, o in clip] for k in ("boxes", "labels", "difficult")},
            }
            if tracked:
                sample["track_ids"] = [o["track_ids"] for _, _, o in clip]
            members["json"] = sample_json(sample)
            self.writers[split].write(key, members)
            st.update(samples=1, frame_slots=L)
            written = True
        st.update(
            frames=len(seg),
            segments=1,
            boxes=sum(len(o["boxes"]) for _, _, o in seg),
            frames_covered_twice=len(starts) * L - len(seg),
        )
        return written

    def _segments(self, name: str, frames: list) -> list[list]:
        """Split a video at gaps larger than max_gap and where the frame size changes."""
        runs, _ = seq.group_videos(((name, f[0].number, f) for f in frames), self.clips.max_gap)
        out = []
        for run_ in runs:
            current: list = []
            for f in run_.items:
                if current and (f[1].width, f[1].height) != (current[-1][1].width, current[-1][1].height):
                    out.append(current)
                    current = []
                current.append(f)
            if current:
                out.append(current)
        return out

    def manifest(self) -> dict:
        splits = {}
        for s in self.splits:
            st = self.stats[s]
            splits[s] = {
                **{k: st[k] for k in ("samples", "frames", "frame_slots", "frames_covered_twice", "boxes")},
                "videos": len(self.videos[s]),
                "segments": st["segments"],
                "video_names": self.videos[s],
                "num_shards": len(self.writers[s].shards),
                "shards": self.writers[s].shards,
                "sha256": self.writers[s].sha256,  # the manifest changes with any byte of the data
            }
        return {
            "clip_length": self.clips.clip_length,
            "clip_stride": self.clips.stride,
            "max_gap": self.clips.max_gap,
            "has_track_ids": self.track_ids,
            "frames_covered_twice": sum(self.stats[s]["frames_covered_twice"] for s in self.splits),
            "splits": splits,
        }


def _tasks(videos: Sequence[Video], opts: WriteOptions) -> Iterator[tuple]:
    for v in videos:
        if v.container is not None:
            yield ("video", *v.container, v.name, opts.jpeg_quality, opts.max_pixels)
        else:
            yield from (("image", f.image, opts.jpeg_quality, opts.max_pixels) for f in v.frames)


def _units(videos: Sequence[Video], loaded: Iterable) -> Iterator[tuple[Video, list]]:
    """Regroup the loaded stream by video: ``(video, [LoadedImage per frame] or [DecodedVideo])``."""
    loaded = iter(loaded)
    for v in videos:
        yield v, [next(loaded)] if v.container is not None else [next(loaded) for _ in v.frames]


def _container_frames(video: Video, decoded: DecodedVideo, report: Report) -> tuple[tuple[Frame, ...], list] | None:
    """The frames of a decoded container with their objects, or None when the video is skipped."""
    for file, reason, detail in decoded.problems:
        report.skip(file, reason, detail)
    if decoded.error:
        report.skip(video.file, *decoded.error)
        return None
    objects_of = video.label(decoded.numbers, report)
    if objects_of is None:
        return None
    refs = tuple(
        Frame(id_, file, objects_of.get(n, ()), video.annotation, number=n, where=f"frame {n}, ")
        for n, id_, _, file in decoded.frames
    )
    for _, _, image, file in decoded.frames:
        if image.conversion:
            report.convert(file, image.conversion)
    return refs, [(ref, image) for ref, (_, _, image, _) in zip(refs, decoded.frames)]


def write_clips(
    listing: Listing, classes: Sequence[str], out: Path, opts: WriteOptions, clips: ClipOptions, report: Report
) -> dict:
    """Write ``listing``'s videos as clips to shards in ``out``; returns the manifest (without the report)."""
    videos: list[Video] = listing.items
    writer = ClipWriter(clips, opts, listing.splits, classes, report)
    unit = "video" if any(v.container for v in videos) else "frame"
    total = sum(1 if v.container else len(v.frames) for v in videos)
    with contextlib.ExitStack() as stack:
        imap = stack.enter_context(ordered_map(opts.workers))
        writer.open(stack, out)
        bar = stack.enter_context(tqdm(total=total, desc=listing.format, unit=unit, disable=None, leave=False))
        for video, loaded in _units(videos, imap(run_task, _tasks(videos, opts))):
            bar.update(len(loaded))
            if video.container is not None:
                got = _container_frames(video, loaded[0], report)
                if got is not None:
                    writer.add_video(video, *got)
                continue
            good = []
            for ref, image in zip(video.frames, loaded):
                if image.error:
                    report.skip(ref.image, *image.error)
                elif image.conversion:
                    report.convert(ref.image, image.conversion)
                if not image.error:
                    good.append((ref, image))
            writer.add_video(video, video.frames, good)
    return {"kind": "clips", "format": listing.format, "source": listing.source, "classes": list(classes), **writer.manifest()}
