"""Single-object tracking sequences in their published layouts, read as they come (no renaming).

- **OTB**: ``<seq>/img/0001.jpg`` + ``<seq>/groundtruth_rect.txt`` (``x,y,w,h`` per
  line, comma, tab or space separated; ``groundtruth_rect.<k>.txt`` for a sequence
  with several targets).
- **LaSOT**: ``<category>/<category>-<n>/img/00000001.jpg`` + ``groundtruth.txt``, with
  ``full_occlusion.txt`` and ``out_of_view.txt`` (0/1 per frame): a frame whose target
  is fully occluded or out of view has no box. The class is the category.
- **Anti-UAV** (the challenge's IR format): ``<seq>/IR_label.json`` with ``exist`` (0/1
  per frame) and ``gt_rect`` (``[x, y, w, h]`` per frame), frames in ``<seq>/IR.mp4`` or
  as images in ``<seq>/``: a frame where the target does not exist has no box.

Boxes are pixel corners as the tracking toolkits read them (no 1-based shift). Frames
are ordered by the number in their file names (a video file's from 1). Line ``i`` of
a box list is the ``i``-th frame; a list of another length skips the sequence, except
for lines without boxes after the last frame. Splits: whole sequences, from
``splits.json`` or a hash of the name (:mod:`.splits`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ssd.bounds import SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources.decode import IMAGE_SUFFIXES
from ssd.data.sources.records import Frame, Listing, Obj, Video, read_text
from ssd.data.sources.report import (
    BOX_LIST_LENGTH,
    FRAME_WITHOUT_NUMBER,
    NOT_IN_SPLIT,
    UNREADABLE_VIDEO,
    VIDEO_WITHOUT_ANNOTATION,
    Report,
)
from ssd.data.sources.splits import VideoSplits, assign_splits
from ssd.data.sources.video import BoxListLabels, fit_box_list
from ssd.errors import InputError

MALFORMED_FLAGS = "malformed per-frame flags"
MALFORMED_LABEL_JSON = "malformed Anti-UAV label file"


@dataclass(frozen=True)
class OtbLayout(VideoSplits):
    images_dir: SubPath = "img"  # in each sequence folder
    class_name: str = "target"  # the class of every box


@dataclass(frozen=True)
class LasotLayout(VideoSplits):
    images_dir: SubPath = "img"  # in each sequence folder; the class is the name before the last '-'


@dataclass(frozen=True)
class AntiUavLayout(VideoSplits):
    label_file: SubPath = "IR_label.json"  # in each sequence folder
    video_file: SubPath = "IR.mp4"  # in each sequence folder; without it, the images in the folder are the frames
    class_name: str = "uav"


Lines = list[list[tuple[float, ...]]]  # boxes per frame, in frame order


def _box_list(path: Path, report: Report) -> Lines | None:
    text = read_text(path, report)
    try:
        return None if text is None else ann.parse_box_list(text)
    except ann.AnnotationError as e:
        report.skip(path, e.reason, e.detail)
        return None


def _image_files(folder: Path, report: Report) -> list[tuple[int, Path]]:
    """(number, file) of the images in ``folder``, by the number in their names."""
    numbered = []
    for p in sorted(folder.iterdir(), key=lambda p: seq.natural_key(p.name)):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            number = seq.trailing_number(p.stem)
            if number is None:
                report.skip(p, FRAME_WITHOUT_NUMBER)
            else:
                numbered.append((number, p))
    return sorted(numbered, key=lambda t: t[0])


def _objects(boxes: Sequence[tuple[float, ...]], name: str) -> tuple[Obj, ...]:
    return tuple(Obj(name, box, track_id=k) for k, box in enumerate(boxes))


def _sequence(name: str, split: str, images: Path, lines: Lines, file: Path, cls: str, report: Report) -> Video | None:
    """A sequence whose frames are the image files in ``images``, line ``i`` of ``lines`` the ``i``-th."""
    files = _image_files(images, report) if images.is_dir() else []
    if not files:
        report.skip(images, UNREADABLE_VIDEO, "no numbered image files")
        return None
    fitted = fit_box_list(lines, len(files), file, report)
    if fitted is None:
        return None
    frames = tuple(
        Frame(f"{name}/{p.stem}", str(p), _objects(boxes, cls), str(file), number=n, where=f"frame {n}, ")
        for (n, p), boxes in zip(files, fitted)
    )
    return Video(name, split, str(images), frames)


def _merge(per_target: list[Lines]) -> Lines:
    """Several targets' box lists (same length) -> one list of every target's boxes per frame."""
    return [[b for lines in per_target for b in lines[i]] for i in range(len(per_target[0]))]


def _otb(folder: Path, split: str, layout: OtbLayout, report: Report) -> Video | None:
    files = sorted(folder.glob("groundtruth_rect*.txt"), key=lambda p: seq.natural_key(p.name))
    lists = [_box_list(p, report) for p in files]
    if any(lines is None for lines in lists):
        return None
    if len({len(lines) for lines in lists}) > 1:
        sizes = ", ".join(f"{p.name} {len(lines)}" for p, lines in zip(files, lists))
        report.skip(folder, BOX_LIST_LENGTH, f"the targets' box lists differ in length ({sizes})")
        return None
    return _sequence(folder.name, split, folder / layout.images_dir, _merge(lists), files[0], layout.class_name, report)


def _flags(path: Path, report: Report) -> list[bool] | None:
    """A LaSOT flag file: 0/1 per frame, comma or line separated; a missing file flags nothing."""
    if not path.is_file():
        return []
    text = read_text(path, report)
    if text is None:
        return None
    values = [v for v in re.split(r"[\s,]+", text.strip()) if v]
    if not all(v in ("0", "1") for v in values):
        report.skip(path, MALFORMED_FLAGS, "expected 0 or 1 per frame")
        return None
    return [v == "1" for v in values]


def _lasot(folder: Path, split: str, layout: LasotLayout, report: Report) -> Video | None:
    gt = folder / "groundtruth.txt"
    lines = _box_list(gt, report)
    hidden = [_flags(folder / f, report) for f in ("full_occlusion.txt", "out_of_view.txt")]
    if lines is None or any(h is None for h in hidden):
        return None
    for flags, f in zip(hidden, ("full_occlusion.txt", "out_of_view.txt")):
        if flags and len(flags) != len(lines):
            report.skip(folder / f, MALFORMED_FLAGS, f"{len(flags)} flags for {len(lines)} lines of groundtruth.txt")
            return None
        lines = [[] if flags and flags[i] else boxes for i, boxes in enumerate(lines)]
    cls = folder.name.rsplit("-", 1)[0]
    return _sequence(folder.name, split, folder / layout.images_dir, lines, gt, cls, report)


def _antiuav_lines(path: Path, report: Report) -> Lines | None:
    text = read_text(path, report)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        report.skip(path, MALFORMED_LABEL_JSON, f"not valid JSON ({e})")
        return None
    exist, rects = (data.get("exist"), data.get("gt_rect")) if isinstance(data, dict) else (None, None)
    if not isinstance(exist, list) or not isinstance(rects, list) or len(exist) != len(rects):
        report.skip(path, MALFORMED_LABEL_JSON, "expected lists 'exist' and 'gt_rect' of the same length")
        return None
    lines: Lines = []
    for i, (e, r) in enumerate(zip(exist, rects)):
        ok = isinstance(r, list) and len(r) == 4 and all(isinstance(v, (int, float)) for v in r)
        if e and not ok:
            report.skip(path, MALFORMED_LABEL_JSON, f"frame {i + 1}: exist is 1 but gt_rect is {r!r}")
            return None
        # exist 1 with a box of no size is passed on: the box cleaning reports it (zero-area, inverted).
        lines.append([(r[0], r[1], r[0] + r[2], r[1] + r[3])] if e else [])
    return lines


def _antiuav(folder: Path, split: str, layout: AntiUavLayout, report: Report) -> Video | None:
    label = folder / layout.label_file
    lines = _antiuav_lines(label, report)
    if lines is None:
        return None
    video = folder / layout.video_file
    if not video.is_file():
        return _sequence(folder.name, split, folder, lines, label, layout.class_name, report)
    labeller = BoxListLabels(lines, label, layout.class_name, tracked=True)
    names = (layout.class_name,) if any(lines) else ()
    return Video(folder.name, split, str(video), (), ("file", str(video)), labeller, str(label), names)


READERS = {"otb": (_otb, "groundtruth_rect*.txt"), "lasot": (_lasot, "groundtruth.txt"), "antiuav": (_antiuav, None)}


def read(root: Path, layout: OtbLayout | LasotLayout | AntiUavLayout, report: Report, fmt: str) -> Listing:
    """The sequences under ``root`` (found by their annotation file, at any depth) as videos."""
    if not root.is_dir():
        raise InputError(f"{root}: directory not found")
    reader, pattern = READERS[fmt]
    pattern = pattern or layout.label_file
    folders = sorted({p.parent for p in root.rglob(pattern)}, key=lambda p: seq.natural_key(p.name))
    if fmt == "otb":  # an OTB-like folder with frames but no box list is worth a report
        for img in sorted(root.glob(f"*/{layout.images_dir}")):
            if img.parent not in folders:
                report.skip(img.parent, VIDEO_WITHOUT_ANNOTATION, f"no {pattern}")
    splits, assignment = assign_splits(root, [f.name for f in folders], layout, report)
    videos = []
    for folder in folders:
        if folder.name not in assignment:
            report.skip(folder, NOT_IN_SPLIT, f"not in {layout.splits_file}", defect=False)
            continue
        v = reader(folder, assignment[folder.name], layout, report)
        if v is not None:
            videos.append(v)
    return Listing("clips", str(root), fmt, splits, videos, frame_split=layout.frame_split)
