"""Videos with box lists or MOT ``gt.txt``: ``videos/<name>.mp4|avi`` or ``frames/<name>/``,
``annotations/<name>.txt`` (one line of ``x y w h`` boxes per frame) or
``annotations/<name>/gt.txt``; splits from ``splits.json`` or a hash of the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

from ssd.bounds import Between, Names, SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources.decode import VIDEO_SUFFIXES
from ssd.data.sources.records import Listing, Obj, Video, read_text
from ssd.data.sources.report import (
    ANNOTATION_WITHOUT_VIDEO,
    BOX_LIST_LENGTH,
    BOX_LIST_TAIL,
    DUPLICATE_ANNOTATION,
    DUPLICATE_VIDEO,
    MOT_FRAMES,
    NOT_IN_SPLIT,
    VIDEO_WITHOUT_ANNOTATION,
    Report,
    ranges,
)
from ssd.data.sources.splits import VideoSplits, assign_splits
from ssd.errors import InputError


@dataclass(frozen=True)
class VideoLayout(VideoSplits):
    """Video files or frame folders with box lists or MOT gt.txt, no split lists."""

    videos_dir: SubPath = "videos"  # <name>.mp4|avi
    frames_dir: SubPath = "frames"  # <name>/<anything with a number>.jpg|png, ordered by that number
    annotations_dir: SubPath = "annotations"  # <name>.txt box list, or <name>/gt.txt (MOT)
    box_list_class: str = "target"  # class name of every box in a box list
    mot_classes: Names = ("target",)  # gt.txt class id k -> mot_classes[k - 1]
    # quality of frames decoded from videos and re-encoded (JPEG frames are kept)
    jpeg_quality: Annotated[int, Between(1, 100)] = 95
    # video name -> annotation name, for annotations named otherwise than their video (never guessed)
    pairs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Found:
    name: str
    kind: str  # "file" or "folder"
    path: Path
    annotation: Path
    mot: bool


def _discover(root: Path, layout: VideoLayout, report: Report) -> list[_Found]:
    if not root.is_dir():
        raise InputError(f"{root}: directory not found")
    videos_dir, frames_dir = root / layout.videos_dir, root / layout.frames_dir
    if not videos_dir.is_dir() and not frames_dir.is_dir():
        raise InputError(f"{root}: neither {layout.videos_dir}/ nor {layout.frames_dir}/ found")
    found: dict[str, tuple[str, Path]] = {}
    if frames_dir.is_dir():
        found.update((p.name, ("folder", p)) for p in sorted(frames_dir.iterdir()) if p.is_dir())
    if videos_dir.is_dir():
        for p in sorted(videos_dir.iterdir(), key=lambda p: p.name):
            if p.suffix.lower() not in VIDEO_SUFFIXES or not p.is_file():
                continue
            if p.stem in found:
                report.skip(p, DUPLICATE_VIDEO, f"{found[p.stem][1]} is used")
            else:
                found[p.stem] = ("file", p)
    annotations = _paired(_annotation_files(root / layout.annotations_dir, report), found, layout, root, report)
    out = []
    for name in sorted(set(found) | set(annotations), key=seq.natural_key):
        # Each unpaired file is reported on its side; names that differ are paired only by `pairs`.
        if name not in annotations:
            report.skip(found[name][1], VIDEO_WITHOUT_ANNOTATION)
        elif name not in found:
            report.skip(annotations[name][0], ANNOTATION_WITHOUT_VIDEO)
        else:
            out.append(_Found(name, *found[name], *annotations[name]))
    return out


def _paired(annotations: dict, found: dict, layout: VideoLayout, root: Path, report: Report) -> dict:
    """Annotations renamed to their video's name as ``layout.pairs`` says; a pair naming nothing is an
    error, and an annotation of the video's own name that the pair replaces is reported."""
    for video_name, ann_name in layout.pairs.items():
        if video_name not in found:
            raise InputError(f"{root}: pairs: no video or frame folder {video_name!r}")
        if ann_name not in annotations:
            raise InputError(f"{root}: pairs: no annotation {ann_name!r} for video {video_name!r}")
    mapped = set(layout.pairs.values())
    out = {n: a for n, a in annotations.items() if n not in mapped}  # a paired annotation goes by its video's name
    for video_name, ann_name in layout.pairs.items():
        if video_name in out and video_name != ann_name:
            report.skip(out[video_name][0], DUPLICATE_ANNOTATION, f"pairs gives {ann_name!r} for video {video_name!r}")
        out[video_name] = annotations[ann_name]
    return out


def _annotation_files(ann_dir: Path, report: Report) -> dict[str, tuple[Path, bool]]:
    """name -> (file, is MOT): ``<name>/gt.txt`` first, then ``<name>.txt`` box lists."""
    annotations: dict[str, tuple[Path, bool]] = {}
    if not ann_dir.is_dir():
        return annotations
    for p in sorted(ann_dir.iterdir()):
        if p.is_dir() and (p / "gt.txt").is_file():
            annotations[p.name] = (p / "gt.txt", True)
    for p in sorted(ann_dir.iterdir()):
        if p.suffix.lower() == ".txt" and p.is_file():
            if p.stem in annotations:
                report.skip(p, DUPLICATE_ANNOTATION, f"{annotations[p.stem][0]} is used")
            else:
                annotations[p.stem] = (p, False)
    return annotations


def _parse(found: _Found, report: Report) -> dict | list | None:
    """The parsed box list (per line) or gt.txt (by frame number); None when unusable."""
    text = read_text(found.annotation, report)
    try:
        return None if text is None else ann.parse_mot(text) if found.mot else ann.parse_box_list(text)
    except ann.AnnotationError as e:
        report.skip(found.annotation, e.reason, e.detail)
    return None


def fit_box_list(labels: list, frames: int, file: Path, report: Report) -> list | None:
    """The box list's lines for a video of ``frames`` frames; None (skipped) if they don't fit.

    Lines without boxes after the last frame (the blank lines an editor leaves at the end
    of a file) are dropped and reported; any other difference in length skips the video.
    """
    extra = len(labels) - frames
    if extra > 0 and not any(labels[frames:]):
        report.fix(file, BOX_LIST_TAIL, f"{extra} line(s) without boxes after frame {frames} ignored", defect=False)
        return labels[:frames]
    if extra:
        report.skip(file, BOX_LIST_LENGTH, f"{len(labels)} lines, {frames} frames; video skipped")
        return None
    return labels


def mot_objects(rows: Sequence[ann.TrackBox], mot_classes: Sequence[str]) -> tuple[Obj, ...]:
    objs = []
    for r in rows:
        if 1 <= r.class_id <= len(mot_classes):
            objs.append(Obj(mot_classes[r.class_id - 1], r.box, r.difficult, r.track_id))
        else:
            objs.append(Obj(None, r.box, r.difficult, r.track_id, f"class id {r.class_id} (mot_classes has {len(mot_classes)})"))
    return tuple(objs)


class _MotLabels:
    """Labeller of a video with a gt.txt: every frame it names must exist."""

    def __init__(self, rows: dict, file: Path, classes: Sequence[str]):
        self.rows, self.file, self.classes = rows, file, classes

    def __call__(self, numbers: Sequence[int], report: Report) -> dict | None:
        extra = sorted(set(self.rows) - set(numbers))
        if extra:
            report.skip(self.file, MOT_FRAMES, f"frames {ranges(extra)}; video has {ranges(numbers)}")
            return None
        if numbers and min(numbers) == 0 and self.rows and 0 not in self.rows:
            # MOT numbers frames from 1; a folder from 0 (as many frame dumps are) with a gt.txt
            # from 1 would put every box one frame early, unnoticed unless the last frame has boxes.
            report.skip(self.file, MOT_FRAMES, "the frame files are numbered from 0 and gt.txt from 1 (MOT's "
                                               "convention): number the files from 1, or gt.txt's frames from 0")
            return None
        return {n: mot_objects(self.rows.get(n, ()), self.classes) for n in numbers}


class BoxListLabels:
    """Labeller of a video with a box list: line i is the i-th frame.

    ``tracked``: the k-th box of a line is track k (the targets of tracking sequences)."""

    def __init__(self, lines: list, file: Path, name: str, tracked: bool = False):
        self.lines, self.file, self.name, self.tracked = lines, file, name, tracked

    def __call__(self, numbers: Sequence[int], report: Report) -> dict | None:
        lines = fit_box_list(self.lines, len(numbers), self.file, report)
        if lines is None:
            return None
        return {
            n: tuple(Obj(self.name, b, track_id=k if self.tracked else None) for k, b in enumerate(boxes))
            for n, boxes in zip(numbers, lines)
        }


def read(root: Path, layout: VideoLayout, report: Report) -> Listing:
    found = _discover(root, layout, report)
    splits, assignment = assign_splits(root, [f.name for f in found], layout, report)
    videos = []
    for f in found:
        if f.name not in assignment:
            report.skip(f.path, NOT_IN_SPLIT, f"not in {layout.splits_file}", defect=False)
            continue
        labels = _parse(f, report)
        if labels is None:
            continue
        if f.mot:
            label = _MotLabels(labels, f.annotation, layout.mot_classes)
            seen = tuple(o.name for rows in labels.values() for o in mot_objects(rows, layout.mot_classes) if o.name)
        else:
            label = BoxListLabels(labels, f.annotation, layout.box_list_class)
            seen = (layout.box_list_class,) if any(labels) else ()
        container = (f.kind, str(f.path))
        videos.append(Video(f.name, assignment[f.name], str(f.path), (), container, label, str(f.annotation), seen))
    return Listing("clips", str(root), "video", splits, videos, frame_split=layout.frame_split)
