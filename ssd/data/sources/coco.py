"""COCO JSON: ``images``, ``annotations`` (``bbox`` = ``[x, y, w, h]`` pixels), ``categories``.

As published by thermal detection sets such as FLIR ADAS (one JSON per split). One
file per split, its path a pattern with ``{split}``; an image's ``file_name`` is
relative to ``images_dir`` (also a pattern). ``iscrowd`` boxes are kept as *difficult*
(excluded from mAP, as COCO's own evaluation ignores them).

Clip datasets: images that carry ``video_id`` and ``frame_id`` (or ``frame_index``;
the COCO-VID layout of video detection and tracking sets) are grouped into videos by
``video_id``, named by ``videos[].name`` where given, and ordered by frame id; the
annotations' ``instance_id`` or ``track_id`` become track ids.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ssd.bounds import Inside, Names, SplitPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources.records import Frame, Listing, Obj, Video, check_split_names, read_required
from ssd.data.sources.decode import IMAGE_SUFFIXES
from ssd.data.sources.report import ANNOTATION_WITHOUT_IMAGE, DUPLICATE_IMAGE, IMAGE_WITHOUT_ANNOTATION, Report
from ssd.errors import InputError

MALFORMED_ENTRY = "malformed COCO entry"
NOT_IN_VIDEO = "image has no video_id or frame_id"


@dataclass(frozen=True)
class CocoLayout:
    """Where a COCO dataset's files are: ``{split}`` in either path is replaced by each split name."""

    annotations: SplitPath = "annotations/instances_{split}.json"  # one COCO JSON per split
    images_dir: SplitPath = "images/{split}"  # each image's file_name is relative to this
    splits: Names = ("train", "val")  # split names, one annotation file each

    def __post_init__(self) -> None:
        check_split_names(self.splits)


@dataclass(frozen=True)
class _Image:
    id: int
    file: str
    path: Path
    size: tuple[float, float] | None
    video: object = None
    frame: int | None = None


def _load(path: Path) -> dict:
    raw = read_required(path, "COCO annotation file")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise InputError(f"{path}: expected a COCO object with lists 'images' and 'annotations'")
    return data


def _categories(data: dict, path: Path) -> dict[int, str]:
    names = {}
    for c in data.get("categories") or []:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not str(c.get("name", "")).strip():
            raise InputError(f"{path}: category {c!r} needs an integer 'id' and a 'name'")
        names[c["id"]] = str(c["name"]).strip()
    return names


def _images(data: dict, path: Path, images_dir: Path, report: Report) -> dict[int, _Image]:
    images: dict[int, _Image] = {}
    for i, im in enumerate(data["images"]):
        file = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(file, str) or not isinstance(im.get("id"), int):
            report.skip(path, MALFORMED_ENTRY, f"images[{i}]: needs an integer 'id' and a 'file_name'")
            continue
        if Inside().problem(file):  # a file outside the dataset: DVC, which tracks the root, would miss it
            report.skip(path, MALFORMED_ENTRY, f"images[{i}]: file_name {file!r} leaves the images folder")
            continue
        if im["id"] in images:
            report.skip(path, DUPLICATE_IMAGE, f"images[{i}]: id {im['id']} is also {images[im['id']].file}")
            continue
        w, h = im.get("width"), im.get("height")
        size = (w, h) if all(isinstance(v, (int, float)) and v > 0 for v in (w, h)) else None
        frame = im.get("frame_id", im.get("frame_index"))
        frame = frame if isinstance(frame, int) and not isinstance(frame, bool) else None
        images[im["id"]] = _Image(im["id"], file, images_dir / file, size, im.get("video_id"), frame)
    return images


def _object(a: dict, categories: dict[int, str]) -> Obj | None:
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return None
    if not all(math.isfinite(v) for v in box):
        return None
    x, y, w, h = (float(v) for v in box)
    cat = a.get("category_id")
    name = categories.get(cat) if isinstance(cat, int) else None
    track = a.get("instance_id", a.get("track_id"))
    track = track if isinstance(track, int) and not isinstance(track, bool) else None
    unknown = "" if name else f"category_id {cat!r} is not in categories"
    return Obj(name, (x, y, x + w, y + h), bool(a.get("iscrowd", 0)), track, unknown)


def _split(root: Path, layout: CocoLayout, split: str, report: Report, declared: dict) -> tuple[list[_Image], dict, Path, dict]:
    """The images of one split that exist on disk, their objects by image id, the file and its data."""
    path = root / layout.annotations.format(split=split)
    data = _load(path)
    categories = _categories(data, path)
    images = _images(data, path, root / layout.images_dir.format(split=split), report)
    objects: dict[int, list[Obj]] = {i: [] for i in images}
    for i, a in enumerate(data["annotations"]):
        image_id = a.get("image_id") if isinstance(a, dict) else None
        if image_id not in images:
            report.skip(path, ANNOTATION_WITHOUT_IMAGE, f"annotations[{i}]: image_id {image_id!r} is not in images")
            continue
        obj = _object(a, categories)
        if obj is None:
            report.skip(path, ann.NON_NUMERIC_COORDINATE, f"annotations[{i}]: bbox {a.get('bbox')!r}")
            continue
        objects[image_id].append(obj)
    found = []
    for im in images.values():
        if im.path.is_file():
            found.append(im)
        else:
            report.skip(path, ANNOTATION_WITHOUT_IMAGE, f"image {im.id}: {im.path} not found")
    listed = {os.path.normpath(im.path) for im in images.values()}
    _report_unlisted(root / layout.images_dir.format(split=split), listed, path, report)
    declared.update(categories)
    return found, objects, path, data


def _report_unlisted(images_dir: Path, listed: set[str], path: Path, report: Report) -> None:
    """Image files in the images folder that the JSON doesn't list: skipped, as VOC skips an image
    without an annotation (some exporters leave background images out of the JSON)."""
    if not images_dir.is_dir():
        return
    for p in sorted(images_dir.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and os.path.normpath(p) not in listed and p.is_file():
            report.skip(p, IMAGE_WITHOUT_ANNOTATION, f"not in {path.name}")


def _names(categories: dict[int, str]) -> list[str]:
    """Category names in id order (a name given to two ids counts once)."""
    return list(dict.fromkeys(categories[i] for i in sorted(categories)))


def _frame(im: _Image, objects: dict, path: Path, split: str = "", number: int = 0) -> Frame:
    """The frame record of one image; its id is the file name without the extension."""
    id_ = str(PurePosixPath(im.file).with_suffix(""))
    where = f"image {im.id} ({im.file}), "
    return Frame(id_, str(im.path), tuple(objects[im.id]), str(path), split, number, where, declared_size=im.size)


def read(root: Path, layout: CocoLayout, report: Report) -> Listing:
    """A frame dataset: every image of every split's JSON, one sample each."""
    frames: list[Frame] = []
    declared: dict[int, str] = {}
    for split in layout.splits:
        found, objects, path, _ = _split(root, layout, split, report, declared)
        frames += [_frame(im, objects, path, split) for im in sorted(found, key=lambda im: seq.natural_key(im.file))]
    return Listing("frames", str(root), "coco", list(layout.splits), frames, _names(declared))


def read_videos(root: Path, layout: CocoLayout, report: Report) -> Listing:
    """A clip dataset: the images grouped into videos by ``video_id``, in frame order."""
    videos = []
    declared: dict[int, str] = {}
    for split in layout.splits:
        found, objects, path, data = _split(root, layout, split, report, declared)
        names = {v.get("id"): str(v.get("name", v.get("id"))) for v in data.get("videos") or [] if isinstance(v, dict)}
        by_video: dict = {}
        for im in found:
            if im.video is None or im.frame is None:
                report.skip(path, NOT_IN_VIDEO, f"image {im.id} ({im.file})")
                continue
            by_video.setdefault(im.video, []).append(im)
        for vid in sorted(by_video, key=lambda v: seq.natural_key(names.get(v, str(v)))):
            ims = sorted(by_video[vid], key=lambda im: im.frame)
            name = names.get(vid, str(vid))
            frames = []
            for im in ims:
                if frames and frames[-1].number == im.frame:
                    detail = f"image {im.id}: frame {im.frame} of video {name!r} is also {frames[-1].id!r}"
                    report.skip(path, ann.DUPLICATE_FRAME, detail)
                    continue
                frames.append(_frame(im, objects, path, number=im.frame))
            videos.append(Video(name, split, str(path), tuple(frames)))
    return Listing("clips", str(root), "coco", list(layout.splits), videos, _names(declared))
