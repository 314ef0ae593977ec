"""Pascal VOC layout: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt``.

:func:`read` lists a frame dataset (one sample per image). The folder names are
options, so other VOC-like layouts convert too (ir-sirst: ``images/`` + ``masks/`` +
``idx_427/``). :func:`scan` pairs the three parts and is also used by
:mod:`.voc_frames` (frame sequences in this layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ssd.bounds import Names, SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources.decode import IMAGE_SUFFIXES
from ssd.data.sources.records import Frame, Listing, Obj, read_required
from ssd.data.sources.report import (
    ANNOTATION_WITHOUT_IMAGE,
    DUPLICATE_IMAGE,
    IMAGE_WITHOUT_ANNOTATION,
    IN_TWO_SPLITS,
    LISTED_BUT_MISSING,
    NOT_IN_SPLIT,
    UNREADABLE_FILE,
    Report,
)
from ssd.errors import InputError


@dataclass(frozen=True)
class Pair:
    """One id of a VOC-layout dataset with both files present."""

    id: str
    splits: tuple[str, ...]  # split lists naming it, in configured order
    xml: Path
    image: Path


def scan(
    root: Path, annotations_dir: str, images_dir: str, splits_dir: str, splits: Sequence[str], report: Report
) -> list[Pair]:
    """Pair annotations, images and split lists; report every id that cannot be converted."""
    ann_dir, img_dir = root / annotations_dir, root / images_dir
    for d in (root, ann_dir, img_dir):
        if not d.is_dir():
            raise InputError(f"{d}: directory not found")
    xmls = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file()}
    images = _images_by_stem(img_dir, report)
    listed, list_file = _split_lists(root / splits_dir, splits, lambda i: i in xmls or i in images)
    pairs = []
    for id_ in sorted(set(xmls) | set(images) | set(listed), key=seq.natural_key):
        xml, image, named = xmls.get(id_), images.get(id_), listed.get(id_)
        if xml is None and image is None:
            report.skip(list_file[id_], LISTED_BUT_MISSING, id_)
        elif image is None:
            report.skip(xml, ANNOTATION_WITHOUT_IMAGE)
        elif xml is None:
            report.skip(image, IMAGE_WITHOUT_ANNOTATION)
        elif not named:
            report.skip(xml, NOT_IN_SPLIT, f"configured splits: {', '.join(splits)}", defect=False)
        else:
            pairs.append(Pair(id_, tuple(named), xml, image))
    return pairs


def _images_by_stem(img_dir: Path, report: Report) -> dict[str, Path]:
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir(), key=lambda p: (rank.get(p.suffix.lower(), len(rank)), p.name)):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in images:
            report.skip(p, DUPLICATE_IMAGE, f"{images[p.stem].name} is used")
        else:
            images[p.stem] = p
    return images


def _split_lists(folder: Path, splits: Sequence[str], known) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """id -> the splits naming it (in configured order), and id -> the first list naming it."""
    listed: dict[str, list[str]] = {}
    list_file: dict[str, Path] = {}
    for split in splits:
        path = folder / f"{split}.txt"
        text = ann.decode_list_file(read_required(path, "split list", f" (split {split!r} is configured)"))
        for line, first in ann.parse_id_list(text):
            id_ = line if known(line) else first
            named = listed.setdefault(id_, [])
            if split not in named:
                named.append(split)
            list_file.setdefault(id_, path)
    return listed, list_file


def parse_xml(path: Path, report: Report) -> ann.VocRecord | None:
    """The parsed annotation, or None (reported) when it can't be read or parsed."""
    try:
        return ann.parse_voc_xml(path.read_bytes())
    except OSError as e:
        report.skip(path, UNREADABLE_FILE, e.strerror or str(e))
    except ann.AnnotationError as e:
        report.skip(path, e.reason, e.detail)
    return None


def frame(
    pair: Pair, record: ann.VocRecord, split: str = "", number: int = 0, voc: bool = True, rename: dict | None = None
) -> Frame:
    """The frame record of one VOC-style annotation; its stated size is checked against the image.

    ``voc``: the corners are VOC's 1-based ones (ImageNet VID's are not); ``rename`` maps class names."""
    rename = rename or {}
    objects = tuple(Obj(rename.get(o.name, o.name), o.bndbox, o.difficult, o.track_id) for o in record.objects)
    declared = None if record.width is None or record.height is None else (record.width, record.height)
    return Frame(pair.id, str(pair.image), objects, str(pair.xml), split, number, voc=voc, declared_size=declared)


@dataclass(frozen=True)
class VocLayout:
    """Where the three parts of a VOC-layout dataset are, and which split lists to read."""

    annotations_dir: SubPath = "Annotations"  # XML files, <id>.xml (ir-sirst: masks)
    images_dir: SubPath = "JPEGImages"  # <id>.jpg|jpeg|png (ir-sirst: images)
    splits_dir: SubPath = "ImageSets/Main"  # <split>.txt id lists (ir-sirst: idx_427)
    splits: Names = ("train", "val")  # split lists to convert; an id in several goes to the first


def read(root: Path, layout: VocLayout, report: Report) -> Listing:
    """A VOC-layout frame dataset: one frame per id listed in a configured split."""
    frames = []
    for pair in scan(root, layout.annotations_dir, layout.images_dir, layout.splits_dir, layout.splits, report):
        record = parse_xml(pair.xml, report)
        if record is None:
            continue
        if len(pair.splits) > 1:
            report.fix(pair.xml, IN_TWO_SPLITS, f"listed in {', '.join(pair.splits)}; kept in {pair.splits[0]}")
        frames.append(frame(pair, record, pair.splits[0]))
    return Listing("frames", str(root), "voc", list(layout.splits), frames)
