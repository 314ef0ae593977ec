"""The common records every source yields and every writer reads.

A source reads its format's annotations (never the pixels) and returns a
:class:`Listing`: the splits and, per split, either :class:`Frame` records (a frame
dataset, one sample per image) or :class:`Video` records (a clip dataset, videos
whose frames are cut into clips). The writers (:mod:`.frame_writer`,
:mod:`.clip_writer`) read the images, validate the boxes against the real image
size and write the shards, so every format gets the same checks and reports.

Boxes here are as the source states them: ``corners`` ``(x1, y1, x2, y2)`` in pixels
of the annotation's own coordinate frame (``voc=True``: Pascal VOC's 1-based
inclusive corners, converted by :func:`ssd.data.annotations.clean_box`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from ssd.data.sources.report import UNREADABLE_FILE, Report
from ssd.errors import InputError


@dataclass(frozen=True)
class Obj:
    """One annotated object before validation against the real image size."""

    name: str | None  # None: a class id the source can't name (reported with `unknown`)
    corners: tuple[float, ...]
    difficult: bool = False  # VOC difficult, COCO iscrowd, MOT ignore: kept, excluded from mAP
    track_id: int | None = None
    unknown: str = ""  # description of an unmapped class id


@dataclass(frozen=True)
class Frame:
    """One image and its objects."""

    id: str  # the source's id of the image (the sample key is made from it)
    image: str  # path of the image file
    objects: tuple[Obj, ...]
    file: str  # the annotation file, named in reports
    split: str = ""  # frame datasets: the split it goes to (videos carry theirs)
    number: int = 0  # frame number within its video (clip datasets)
    where: str = ""  # prefix for reports, e.g. "frame 12, "
    voc: bool = False  # corners are VOC 1-based inclusive
    declared_size: tuple[float, float] | None = None  # (W, H) the annotation states, checked against the image
    normalized: bool = False  # corners are fractions of the image's width and height (YOLO)


Labeller = Callable[[Sequence[int], Report], "dict[int, tuple[Obj, ...]] | None"]
"""For a video decoded whole: objects by frame number, given the frame numbers the
decoder found; None when the annotations don't fit the video (reported)."""


@dataclass(frozen=True)
class Video:
    """One video of a clip dataset: frames with their own image files, or a container.

    A container (a video file, or a folder of numbered frames whose numbers come from
    the file names) is decoded whole in a worker; its objects come from ``label`` once
    its frame numbers are known.
    """

    name: str
    split: str
    file: str  # named in reports about the whole video
    frames: tuple[Frame, ...] = ()  # in frame order, when each frame is an image file
    container: tuple[Literal["file", "folder"], str] | None = None
    label: Labeller | None = None  # with a container
    annotation: str = ""  # with a container: the annotation file, named in reports
    names: tuple[str, ...] = ()  # with a container: the class names its annotations use


@dataclass
class Listing:
    """What a source found: the split names, in order, and the records."""

    kind: Literal["frames", "clips"]
    source: str  # the dataset root, for the manifest and reports
    format: str
    splits: list[str]
    items: list  # list[Frame] for frames, list[Video] for clips
    declared: list[str] | None = None  # the class list the format itself declares (COCO, YOLO), in its order
    frame_split: float = 0.0  # clips: the share of each video's last frames that goes to val (see splits.py)

    def class_names(self) -> Iterator[str]:
        """Every class name the annotations use (with repeats)."""
        for item in self.items:
            if isinstance(item, Video):
                yield from item.names
                frames = item.frames
            else:
                frames = (item,)
            for f in frames:
                yield from (o.name for o in f.objects if o.name is not None)


def classes(configured: Sequence[str] | None, listing: Listing) -> list[str]:
    """The configured class list, else the one the format declares, else the names used, sorted."""
    if configured is not None:
        return list(configured)
    if listing.declared is not None:
        return list(listing.declared)
    return sorted(set(listing.class_names()))


def sample_key(text: str) -> str:
    """A WebDataset key: no dots (WebDataset splits at the first), no slashes, no spaces."""
    return "".join("_" if c in "./\\" or c.isspace() else c for c in text)


def check_split_names(splits: Sequence[str]) -> None:
    """ValueError unless every split name is letters, digits, '_' or '-' (they name shard files)."""
    for s in splits:
        if not s or not all(c.isalnum() or c in "_-" for c in s):
            raise ValueError(f"split name {s!r} must be letters, digits, '_' or '-'")


def read_required(path: Path, what: str, why: str = "") -> bytes:
    """The bytes of a file the conversion cannot do without (a split list, a COCO JSON, a dataset
    YAML): a one-line :class:`InputError` naming it, ``what`` it is and ``why`` it is needed, when
    missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found{why}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_text(path: Path, report: Report) -> str | None:
    """An annotation file's text (a byte-order mark dropped, undecodable bytes replaced), or
    None when it can't be read (reported: the item it annotates is skipped)."""
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        report.skip(path, UNREADABLE_FILE, e.strerror or str(e))
        return None
