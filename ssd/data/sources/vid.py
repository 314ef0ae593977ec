"""ImageNet VID (ILSVRC2015), the benchmark of the LSTM-SSD paper: every snippet is a video.

Layout, as published::

    Annotations/VID/<split>/[<chunk>/]<snippet>/<frame>.xml   # VOC-style XML with <trackid>
    Data/VID/<split>/[<chunk>/]<snippet>/<frame>.JPEG

The split is the folder (``train``, ``val``): VID's own split. Frame numbers are the
file names (``000000`` is frame 0). Boxes are pixel corners as written (the devkit's
and the public converters' reading: no 1-based shift). Class names are the synset ids,
or with ``readable_names`` the 30 VID class names. The ``ImageSets/VID`` lists sample
frames for still-image training and are not needed to cut clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssd.bounds import Names, SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources import voc
from ssd.data.sources.decode import IMAGE_SUFFIXES
from ssd.data.sources.records import Frame, Listing, Video, check_split_names
from ssd.data.sources.report import ANNOTATION_WITHOUT_IMAGE, IMAGE_WITHOUT_ANNOTATION, Report
from ssd.errors import InputError

# The 30 VID classes: WordNet synset -> name (the dataset's published class list).
SYNSETS = {
    "n02691156": "airplane", "n02419796": "antelope", "n02131653": "bear", "n02834778": "bicycle",
    "n01503061": "bird", "n02924116": "bus", "n02958343": "car", "n02402425": "cattle",
    "n02084071": "dog", "n02121808": "domestic_cat", "n02503517": "elephant", "n02118333": "fox",
    "n02510455": "giant_panda", "n02342885": "hamster", "n02374451": "horse", "n02129165": "lion",
    "n01674464": "lizard", "n02484322": "monkey", "n03790512": "motorcycle", "n02324045": "rabbit",
    "n02509815": "red_panda", "n02411705": "sheep", "n01726692": "snake", "n02355227": "squirrel",
    "n02129604": "tiger", "n04468005": "train", "n01662784": "turtle", "n04530566": "watercraft",
    "n02062744": "whale", "n02391049": "zebra",
}  # fmt: skip


@dataclass(frozen=True)
class VidLayout:
    """ImageNet VID's folders and which of its splits to convert."""

    annotations_dir: SubPath = "Annotations/VID"  # <split>/.../<snippet>/<frame>.xml
    images_dir: SubPath = "Data/VID"  # <split>/.../<snippet>/<frame>.JPEG
    splits: Names = ("train", "val")  # sub-folders of both, each a split
    readable_names: bool = True  # true: airplane, ...; false: the synset ids (n02691156, ...)

    def __post_init__(self) -> None:
        check_split_names(self.splits)


def _snippets(folder: Path) -> list[Path]:
    """Every folder under ``folder`` that holds XML files, in natural order."""
    found = {p.parent for p in folder.rglob("*.xml")}
    return sorted(found, key=lambda p: seq.natural_key(str(p.relative_to(folder))))


def _frames(xml_dir: Path, img_dir: Path, rename: dict[str, str], report: Report) -> list[Frame]:
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if img_dir.is_dir() else {}
    xmls = {p.stem: p for p in xml_dir.iterdir() if p.suffix.lower() == ".xml"}
    for stem in sorted(set(images) - set(xmls), key=seq.natural_key):
        report.skip(images[stem], IMAGE_WITHOUT_ANNOTATION)
    frames = []
    for stem in sorted(xmls, key=seq.natural_key):
        number = seq.trailing_number(stem)
        if stem not in images:
            report.skip(xmls[stem], ANNOTATION_WITHOUT_IMAGE, f"no {stem}.JPEG in {img_dir}")
            continue
        if number is None:
            report.skip(xmls[stem], ann.BAD_FRAME_ID, "the file name has no frame number")
            continue
        record = voc.parse_xml(xmls[stem], report)
        if record is None:
            continue
        pair = voc.Pair(f"{xml_dir.name}/{stem}", (), xmls[stem], images[stem])
        frames.append(voc.frame(pair, record, number=number, voc=False, rename=rename))
    return frames


def read(root: Path, layout: VidLayout, report: Report) -> Listing:
    rename = SYNSETS if layout.readable_names else {}
    videos = []
    for split in layout.splits:
        ann_split, img_split = root / layout.annotations_dir / split, root / layout.images_dir / split
        if not ann_split.is_dir():
            raise InputError(f"{ann_split}: directory not found (split {split!r} is configured)")
        for snippet in _snippets(ann_split):
            rel = snippet.relative_to(ann_split)
            frames = _frames(snippet, img_split / rel, rename, report)
            if frames:
                videos.append(Video(snippet.name, split, str(snippet), tuple(frames)))
    declared = list(SYNSETS.values()) if layout.readable_names else None
    return Listing("clips", str(root), "vid", list(layout.splits), videos, declared)
