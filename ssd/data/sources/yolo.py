"""YOLO txt: ``images/<split>/*.jpg`` with ``labels/<split>/*.txt`` of the same relative name.

Each label line is ``class cx cy w h``, normalised to the image's width and height
(a segmentation line, ``class x1 y1 x2 y2 ...``, gives its polygon's bounding box);
class names come from the dataset's YAML (``names``: a list, or ``{id: name}``). An
image without a label file is a background image, as YOLO trainers read it (counted
in the report); a label file without an image is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import yaml

from ssd.bounds import Names, SplitPath, SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources.decode import IMAGE_SUFFIXES
from ssd.data.sources.records import Frame, Listing, Obj, check_split_names, read_required
from ssd.data.sources.report import ANNOTATION_WITHOUT_IMAGE, DUPLICATE_IMAGE, UNREADABLE_FILE, Report
from ssd.errors import InputError

MALFORMED_LABEL = "malformed YOLO label"
BACKGROUND_IMAGE = "image without label file: kept as a background image"


@dataclass(frozen=True)
class YoloLayout:
    """Where a YOLO dataset's files are: ``{split}`` in the folders is replaced by each split name."""

    data_yaml: SubPath = "data.yaml"  # the dataset's YAML, for `names`
    images_dir: SplitPath = "images/{split}"  # images, in sub-folders or not
    labels_dir: SplitPath = "labels/{split}"  # <same relative path as the image>.txt
    splits: Names = ("train", "val")  # split names, one images folder each

    def __post_init__(self) -> None:
        check_split_names(self.splits)


def dataset_yaml(path: Path) -> tuple[list[str], bool]:
    """The ``names`` of a YOLO dataset YAML, by class id, and whether it is a pose dataset
    (``kpt_shape``: each label line is a box followed by keypoints, not a polygon)."""
    raw = read_required(path, "dataset YAML", " (it names the classes)")
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read the dataset YAML ({e})") from None
    return _names(data, path), isinstance(data, dict) and data.get("kpt_shape") is not None


def _names(data: object, path: Path) -> list[str]:
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise InputError(f"{path}: names: class ids must be 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise InputError(f"{path}: expected 'names' as a list of class names or {{id: name}}")
    names = [n.strip() for n in names]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # its later id's boxes would all go to the first id's class
        raise InputError(f"{path}: names: {twice!r} is given twice (ids {names.index(twice)} and "
                         f"{names.index(twice, names.index(twice) + 1)})")
    return names


def parse_label(text: str, names: Sequence[str], pose: bool = False) -> tuple[Obj, ...]:
    """The objects of one label file, corners as fractions of the image; AnnotationError if malformed.
    ``pose``: lines are ``class cx cy w h`` and keypoints (read: the box)."""
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls, values = int(fields[0]), [float(f) for f in fields[1:]]
        except ValueError:
            raise ann.AnnotationError(MALFORMED_LABEL, f"line {lineno}: {line.strip()!r}") from None
        if len(values) == 4 or (pose and len(values) > 4):
            cx, cy, w, h = values[:4]
            corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        elif len(values) >= 6 and len(values) % 2 == 0:  # a polygon: its bounding box
            xs, ys = values[0::2], values[1::2]
            corners = (min(xs), min(ys), max(xs), max(ys))
        else:
            raise ann.AnnotationError(MALFORMED_LABEL, f"line {lineno}: expected class cx cy w h, got {line.strip()!r}")
        if not all(v == v and abs(v) != float("inf") for v in corners):
            raise ann.AnnotationError(MALFORMED_LABEL, f"line {lineno}: non-finite value in {line.strip()!r}")
        known = 0 <= cls < len(names)
        unknown = "" if known else f"class id {cls} (the dataset YAML names {len(names)})"
        objects.append(Obj(names[cls] if known else None, corners, unknown=unknown))
    return tuple(objects)


def _files(folder: Path, suffixes: Sequence[str], report: Report) -> dict[str, Path]:
    """Relative path without suffix -> file, for the files under ``folder`` with one of ``suffixes``;
    of two with one relative path (``a.jpg``, ``a.png``) the earlier suffix is kept, the other reported."""
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()),
                   key=lambda p: (p.with_suffix(""), suffixes.index(p.suffix.lower()), p.suffix))
    found: dict[str, Path] = {}
    for p in files:
        rel = str(PurePosixPath(p.relative_to(folder).as_posix()).with_suffix(""))
        if rel in found:
            report.skip(p, DUPLICATE_IMAGE, f"{found[rel].name} is used")
        else:
            found[rel] = p
    return found


def read(root: Path, layout: YoloLayout, report: Report) -> Listing:
    names, pose = dataset_yaml(root / layout.data_yaml)
    frames = []
    for split in layout.splits:
        img_dir, lbl_dir = root / layout.images_dir.format(split=split), root / layout.labels_dir.format(split=split)
        for folder, key in ((img_dir, "images_dir"), (lbl_dir, "labels_dir")):
            if not folder.is_dir():  # a missing labels folder would make every image a background image
                raise InputError(f"{folder}: directory not found (split {split!r} is configured; yolo.{key})")
        images, labels = _files(img_dir, IMAGE_SUFFIXES, report), _files(lbl_dir, (".txt",), report)
        if images and not labels:
            raise InputError(f"{lbl_dir}: no label file (.txt) for the {len(images)} images of split {split!r}; "
                             "check yolo.labels_dir")
        for rel in sorted(set(labels) - set(images), key=seq.natural_key):
            report.skip(labels[rel], ANNOTATION_WITHOUT_IMAGE, f"no image {rel}.* in {img_dir}")
        for rel in sorted(images, key=seq.natural_key):
            label = labels.get(rel)
            if label is None:
                report.fix(images[rel], BACKGROUND_IMAGE, f"no {rel}.txt in {lbl_dir}", defect=False)
                objects: tuple[Obj, ...] = ()
            else:
                try:
                    objects = parse_label(label.read_text(encoding="utf-8-sig"), names, pose)
                except OSError as e:
                    report.skip(label, UNREADABLE_FILE, e.strerror or str(e))
                    continue
                except UnicodeDecodeError as e:
                    report.skip(label, MALFORMED_LABEL, f"not UTF-8 text (byte {e.start})")
                    continue
                except ann.AnnotationError as e:
                    report.skip(label, e.reason, e.detail)
                    continue
            file = str(label or images[rel])
            frames.append(Frame(rel, str(images[rel]), objects, file, split, normalized=True))
    return Listing("frames", str(root), "yolo", list(layout.splits), frames, names)
