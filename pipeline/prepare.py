"""Stage ``prepare``: convert Pascal VOC datasets and IR videos once into WebDataset shards.

Usage:
    python -m pipeline.prepare [--params params.yaml] [--set KEY=VALUE ...] [--strict]

    e.g. python -m pipeline.prepare --set voc.root=../shared/data/voc-bccd \\
             --set 'voc.splits=[train, val, test]' --set ir.enabled=false

Reads the ``prepare`` section of ``params.yaml`` (:class:`PrepareConfig`) and writes

- ``prepare.voc.out`` (default ``data/shards/voc/``): frame shards, one sample per
  image of a VOC-layout dataset (sub-directory names configurable, so that e.g.
  ``images/`` + ``masks/`` + ``idx_427/`` converts too);
- ``prepare.ir.out`` (default ``data/shards/ir/``): clip shards, one sample per
  clip of ``clip_length`` consecutive frames of one video, from IR format 1
  (VOC-layout frame sequences, ids like ``seq01_000123``) or IR format 2
  (``videos/*.mp4|avi`` or ``frames/<name>/``, with box lists or MOT ``gt.txt``).

Each output directory is built under a temporary name and renamed when
complete; each shard is written under a temporary name and renamed when
complete; ``manifest.json`` is written last. A killed run leaves nothing that
looks complete, and a rerun removes its leftovers. See ``docs/data-format.md``
for the sample and manifest format.

Bad inputs are skipped (or fixed, where the fix is safe) and reported by file
and reason in the manifest and in one summary log line per dataset; with
``--strict`` the first one stops the stage with a one-line message and exit
code 2. Inputs excluded on purpose (an id in no configured split list, a video
too short for one clip) are reported but do not stop ``--strict``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import shutil
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Sequence

import cv2
from tqdm import tqdm

from ssd.atomic import TMP_PREFIX, atomic_dir, write_json
from pipeline.config import ConfigError, load_config, load_params, to_dict
from pipeline.stage import StageError, arg_parser, check_writable, run
from ssd.bounds import AtLeast, Below, Between, Count, Names, PositiveInt
from ssd.data import annotations as ann
from ssd.data import images
from ssd.data.shards import ShardWriter

log = logging.getLogger("pipeline.prepare")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # in order of preference when one id has several
VIDEO_SUFFIXES = (".mp4", ".avi")

# Reasons reported by the stage (the parsing/box reasons live in ssd.data.annotations).
UNREADABLE_FILE = "unreadable file"
CORRUPT_IMAGE = "corrupt or truncated image"
IMAGE_TOO_LARGE = "image too large"
ANNOTATION_WITHOUT_IMAGE = "annotation without image"
IMAGE_WITHOUT_ANNOTATION = "image without annotation"
LISTED_BUT_MISSING = "listed id has no annotation and no image"
DUPLICATE_IMAGE = "another image has the same id"
NOT_IN_SPLIT = "not in any split list"
IN_TWO_SPLITS = "listed in more than one split"
VIDEO_IN_TWO_SPLITS = "video listed in more than one split"
SIZE_MISMATCH = "size in annotation disagrees with the image"
UNKNOWN_CLASS = "unknown class"
KEY_COLLISION = "sample key collides with another"
SHORT_VIDEO = "video shorter than clip_length"
IMAGE_CONVERTED = "image converted to RGB"
VIDEO_WITHOUT_ANNOTATION = "video without annotation"
ANNOTATION_WITHOUT_VIDEO = "annotation without video"
DUPLICATE_VIDEO = "video given twice"
DUPLICATE_ANNOTATION = "annotation given twice"
UNREADABLE_VIDEO = "unreadable video"
FRAME_WITHOUT_NUMBER = "frame file name has no number"
BOX_LIST_LENGTH = "box list length differs from the video's frame count"
BOX_LIST_TAIL = "lines without boxes after the last frame"
MOT_FRAMES = "gt.txt names frames the video does not have"
LISTED_VIDEO_MISSING = "video listed in splits file not found"

_PNG_COLOUR = {0: "grey-scale", 2: "RGB", 3: "palette", 4: "grey-scale+alpha", 6: "RGBA"}


# ---------------------------------------------------------------------------
# Configuration

SizeMismatch = Literal["scale", "keep", "skip"]
"""What to do when a VOC ``<size>`` disagrees with the real image (whose size is always used).

``scale``: the boxes are in the XML's coordinate frame (the image was resized
after annotation), so they are validated there and scaled to the image; this
is what the real data shows (ir-sirst Misc_111: XML 592x400, PNG 325x220, and
only the scaled box lands on the target). ``keep``: the boxes are in image
pixels and only the XML size is wrong (clipped like any box). ``skip``: drop
the image. All three report it.
"""


@dataclass(frozen=True)
class VocConfig:
    """A frame dataset in VOC layout, converted to one sample per image."""

    enabled: bool = True  # false: write an empty output with a manifest that says so
    root: str = "data/sample/voc"  # dataset root (what the sample stage writes)
    out: str = "data/shards/voc"  # output directory; must match the stage's outs in dvc.yaml
    annotations_dir: str = "Annotations"  # XML files, <id>.xml (ir-sirst: masks)
    images_dir: str = "JPEGImages"  # <id>.jpg|jpeg|png (ir-sirst: images)
    splits_dir: str = "ImageSets/Main"  # <split>.txt id lists (ir-sirst: idx_427)
    splits: Names = ("train", "val")  # split lists to convert; an id in several goes to the first
    classes: Names | None = None  # null: discovered from the data (sorted); else others are skipped
    size_mismatch: SizeMismatch = "scale"  # XML size != image size: see SizeMismatch
    shard_size: PositiveInt = 500  # max samples per shard
    shard_max_bytes: PositiveInt = 256 * 1024 * 1024  # max bytes per shard (a bigger single sample gets its own)

    def __post_init__(self) -> None:
        _check_splits(self.splits, "prepare.voc.splits")


@dataclass(frozen=True)
class IrFramesConfig:
    """IR format 1: VOC-layout frame sequences, video and frame number taken from each id."""

    annotations_dir: str = "Annotations"  # <id>.xml
    images_dir: str = "JPEGImages"  # <id>.jpg|jpeg|png
    splits_dir: str = "ImageSets/Main"  # <split>.txt frame id lists
    splits: Names = ("train", "val")  # a video listed in several goes to the first of these
    frame_id_pattern: str = ann.DEFAULT_FRAME_ID_PATTERN  # groups `video` and `frame`; default: <video>_<digits>
    size_mismatch: SizeMismatch = "scale"  # XML size != image size: see SizeMismatch

    def __post_init__(self) -> None:
        _check_splits(self.splits, "prepare.ir.frames.splits")
        try:
            ann.compile_frame_pattern(self.frame_id_pattern)
        except ValueError as e:
            raise ConfigError(f"prepare.ir.frames.frame_id_pattern: {e}") from None


@dataclass(frozen=True)
class IrVideoConfig:
    """IR format 2: video files or frame folders with box lists or MOT gt.txt, no split lists."""

    videos_dir: str = "videos"  # <name>.mp4|avi
    frames_dir: str = "frames"  # <name>/<anything with a number>.jpg|png, ordered by that number
    annotations_dir: str = "annotations"  # <name>.txt box list, or <name>/gt.txt (MOT)
    box_list_class: str = "target"  # class name of every box in a box list
    mot_classes: Names = ("target",)  # gt.txt class id k -> mot_classes[k - 1]
    splits_file: str = "splits.json"  # {"train": [names], "val": [names]} in root; used when present
    # without a splits file: share of videos (by hash of name) put in val
    val_fraction: Annotated[float, AtLeast(0), Below(1)] = 0.2
    # quality of frames decoded from videos and re-encoded (JPEG frames are kept)
    jpeg_quality: Annotated[int, Between(1, 100)] = 95


@dataclass(frozen=True)
class IrConfig:
    """IR videos, converted to one sample per clip of consecutive frames of one video."""

    enabled: bool = True  # false: write an empty output with a manifest that says so
    source: Literal["frames", "video"] = "frames"  # which reader: format 1 (frames) or format 2 (video)
    root: str = "data/sample/ir/frames"  # the dataset, in the layout `source` reads (dvc.yaml's deps read this key)
    out: str = "data/shards/ir"  # output directory; must match the stage's outs in dvc.yaml
    classes: Names | None = None  # null: discovered from the data (sorted); else others are skipped
    clip_length: PositiveInt = 8  # frames per clip (LSTM-SSD unroll length)
    clip_stride: int | None = None  # frames between clip starts; null = clip_length (no overlap but the tail)
    max_gap: Count = 0  # missing frame numbers tolerated inside a video; a bigger jump starts a new segment
    shard_size: PositiveInt = 100  # max clips per shard
    shard_max_bytes: PositiveInt = 256 * 1024 * 1024  # max bytes per shard
    frames: IrFramesConfig = field(default_factory=IrFramesConfig)  # format 1 reader
    video: IrVideoConfig = field(default_factory=IrVideoConfig)  # format 2 reader

    def __post_init__(self) -> None:
        if self.clip_stride is not None and not 1 <= self.clip_stride <= self.clip_length:
            raise ConfigError(
                f"prepare.ir.clip_stride: expected 1..clip_length ({self.clip_length}) so that no frame is "
                f"dropped, got {self.clip_stride}"
            )

    @property
    def stride(self) -> int:
        return self.clip_stride or self.clip_length


@dataclass(frozen=True)
class PrepareConfig:
    """The ``prepare`` section of params.yaml."""

    workers: PositiveInt = 2  # processes that read, validate and encode images (1: no pool)
    allow_empty_splits: bool = False  # true: a configured split may end up with no sample (else exit 2)
    voc: VocConfig = field(default_factory=VocConfig)  # frame dataset (SSD, SSDLite)
    ir: IrConfig = field(default_factory=IrConfig)  # clip dataset (LSTM-SSD)
    # images with more pixels are skipped and counted, read from the file's header before
    # decoding (a small PNG can hold 20000x20000 pixels: gigabytes once decoded)
    max_pixels: PositiveInt = 50_000_000


def _check_splits(splits: Sequence[str], key: str) -> None:
    for s in splits:
        if not all(c.isalnum() or c in "_-" for c in s):
            raise ConfigError(f"{key}: split name {s!r} must be letters, digits, '_' or '-'")


# ---------------------------------------------------------------------------
# Reporting


class Issues:
    """Everything skipped, fixed or converted while converting one dataset.

    ``defect=True`` marks bad input: under ``--strict`` it raises
    :class:`StageError` at once. Deliberate exclusions (``defect=False``) and
    image conversions are only recorded.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[dict] = []
        self.fixed: list[dict] = []
        self.converted: list[dict] = []

    def skip(self, file: Any, reason: str, detail: str = "", defect: bool = True) -> None:
        self._add(self.skipped, file, reason, detail, defect)

    def fix(self, file: Any, reason: str, detail: str = "", defect: bool = True) -> None:
        self._add(self.fixed, file, reason, detail, defect)

    def convert(self, file: Any, detail: str) -> None:
        self._add(self.converted, file, IMAGE_CONVERTED, detail, False)

    def _add(self, bucket: list, file: Any, reason: str, detail: str, defect: bool) -> None:
        detail = " ".join(str(detail).split())  # one line, whatever the source message was
        if self.strict and defect:
            what = f"{reason}: {detail}" if detail else reason
            raise StageError(f"{file}: {what} (--strict stops at the first bad input)")
        bucket.append({"file": str(file), "reason": reason, "detail": detail})

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            name: dict(sorted(Counter(e["reason"] for e in bucket).items()))
            for name, bucket in (("skipped", self.skipped), ("fixed", self.fixed), ("converted", self.converted))
        }

    def manifest(self) -> dict:
        counts = self.counts()
        return {
            "skipped_counts": counts["skipped"],
            "fixed_counts": counts["fixed"],
            "converted_counts": counts["converted"],
            "skipped": self.skipped,
            "fixed": self.fixed,
            "converted": self.converted,
        }

    def hint(self, root: str | Path, shown: int = 3) -> str:
        """What was skipped and why, most frequent reason first, with a few of the files."""
        by_reason: dict[str, list[str]] = {}
        for e in self.skipped:
            item = _relative(e["file"], root) + (f": {e['detail']}" if e["detail"] else "")
            by_reason.setdefault(e["reason"], []).append(item)
        if not by_reason:
            return "nothing was skipped: no input was found to convert"
        parts = []
        for reason, files in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            more = ", ..." if len(files) > shown else ""
            parts.append(f"{len(files)} {reason} ({', '.join(files[:shown])}{more})")
        return "skipped: " + "; ".join(parts)

    def summary(self) -> str:
        parts = []
        for name, c in self.counts().items():
            total = sum(c.values())
            inner = ", ".join(f"{reason}: {n}" for reason, n in c.items())
            parts.append(f"{name} {total}" + (f" ({inner})" if inner else ""))
        return "; ".join(parts)


# ---------------------------------------------------------------------------
# Images (run in worker processes: top-level functions, plain arguments)


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a shard, or the reason it is not."""

    data: bytes = b""  # bytes to store
    ext: str = ""  # "jpg" or "png"
    width: int = 0
    height: int = 0
    conversion: str | None = None  # what was converted, if anything
    error: tuple[str, str] | None = None  # (reason, detail)


def load_image(path: str, jpeg_quality: int | None = None, max_pixels: int | None = None) -> LoadedImage:
    """Read, validate and if needed convert one image file.

    JPEG files are kept byte for byte (they are decoded only to check them
    and to read their real size). ``jpeg_quality=None`` (frame shards): an
    8-bit RGB PNG is kept as it is; any other PNG (grey-scale, palette,
    RGBA/grey+alpha - alpha dropped, 16-bit - scaled to 8) or other decodable
    format is converted to an 8-bit RGB PNG. With ``jpeg_quality`` (clip
    shards, whose members are all JPEG) everything but a JPEG is encoded as a
    JPEG of that quality. Sizes are those of the pixel data as stored
    (EXIF orientation ignored, as loaders must ignore it too). An image of more than
    ``max_pixels`` pixels (read from its header, before decoding) and a JPEG whose decoder
    reports damaged data are errors.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return LoadedImage(error=(UNREADABLE_FILE, e.strerror or str(e)))
    return _image_from_bytes(data, jpeg_quality, max_pixels)


def _image_from_bytes(data: bytes, jpeg_quality: int | None, max_pixels: int | None = None) -> LoadedImage:
    if not data:
        return LoadedImage(error=(CORRUPT_IMAGE, "empty file"))
    size = images.header_size(data) if max_pixels is not None else None
    if size is not None and size[0] * size[1] > max_pixels:
        return LoadedImage(error=(IMAGE_TOO_LARGE, f"{size[0]}x{size[1]} is over prepare.max_pixels ({max_pixels})"))
    try:
        pixels, damage = images.decode_checked(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        return LoadedImage(error=(CORRUPT_IMAGE, str(e).strip().splitlines()[-1]))
    if pixels is None:
        return LoadedImage(error=(CORRUPT_IMAGE, f"cannot be decoded ({len(data)} bytes)"))
    if damage:
        return LoadedImage(error=(CORRUPT_IMAGE, f"the decoder reports damaged data: {damage}"))
    height, width = pixels.shape[:2]
    if data[:3] == b"\xff\xd8\xff":
        return LoadedImage(data, "jpg", width, height)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25:
        depth, colour = data[24], data[25]
        if jpeg_quality is None and depth == 8 and colour == 2:
            return LoadedImage(data, "png", width, height)
        source = f"PNG {_PNG_COLOUR.get(colour, f'colour type {colour}')} {depth}-bit"
    else:
        source = "non-JPEG/PNG image"
    if jpeg_quality is None:
        ok, buf = cv2.imencode(".png", pixels)
        target = "RGB PNG"
    else:
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        target = f"RGB JPEG (quality {jpeg_quality})"
    if not ok:  # pragma: no cover - encoding a decoded 8-bit image does not fail
        return LoadedImage(error=(CORRUPT_IMAGE, "could not be re-encoded"))
    ext = "png" if jpeg_quality is None else "jpg"
    return LoadedImage(buf.tobytes(), ext, width, height, conversion=f"{source} -> {target}")


@dataclass(frozen=True)
class _DecodedVideo:
    """Frames of one format-2 video: ``(frame number, id, image, file)`` in order, plus per-frame problems."""

    frames: tuple[tuple[int, str, LoadedImage, str], ...] = ()
    numbers: tuple[int, ...] = ()  # every frame number the source has, readable or not
    problems: tuple[tuple[str, str, str], ...] = ()  # (file, reason, detail) of frames left out
    error: tuple[str, str] | None = None  # the whole video is unusable


def _decode_video(task: tuple[str, str, str, int, int]) -> _DecodedVideo:
    """Worker: a video file (frames numbered 1..N) or a frame folder (numbers from file names)."""
    kind, path, name, quality, max_pixels = task
    if kind == "folder":
        return _decode_folder(Path(path), quality, max_pixels)
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            return _DecodedVideo(error=(UNREADABLE_VIDEO, "cannot be opened"))
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > max_pixels:
            return _DecodedVideo(error=(IMAGE_TOO_LARGE, f"frames of {width}x{height} are over prepare.max_pixels"))
        frames = []
        while True:
            ok, pixels = capture.read()
            if not ok:
                break
            ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            height, width = pixels.shape[:2]
            number = len(frames) + 1
            image = LoadedImage(buf.tobytes(), "jpg", width, height)
            frames.append((number, f"{name}_{number:06d}", image, path))
    finally:
        capture.release()
    if not frames:
        return _DecodedVideo(error=(UNREADABLE_VIDEO, "no frame could be decoded"))
    return _DecodedVideo(tuple(frames), tuple(n for n, _, _, _ in frames))


def _decode_folder(folder: Path, quality: int, max_pixels: int) -> _DecodedVideo:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: ann.natural_key(p.name),
    )
    problems = []
    numbered: dict[int, Path] = {}
    for p in files:
        number = ann.trailing_number(p.stem)
        if number is None:
            problems.append((str(p), FRAME_WITHOUT_NUMBER, ""))
        elif number in numbered:
            problems.append((str(p), ann.DUPLICATE_FRAME, f"frame {number} is also {numbered[number].name}"))
        else:
            numbered[number] = p
    if not numbered:
        return _DecodedVideo(problems=tuple(problems), error=(UNREADABLE_VIDEO, "no numbered frame files"))
    frames = []
    for number in sorted(numbered):
        p = numbered[number]
        image = load_image(str(p), quality, max_pixels)
        if image.error:
            problems.append((str(p), *image.error))
        else:
            frames.append((number, p.stem, image, str(p)))
    return _DecodedVideo(tuple(frames), tuple(sorted(numbered)), tuple(problems))


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the worker processes already fill the cores
    # Ctrl-C reaches the whole process group. Only the main process acts on it: it stops
    # the pool (Pool.terminate). A worker killed by it could die holding the pool's task
    # queue lock, and terminate() would then wait for that lock forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered, lazy ``map`` over a pool of ``workers`` processes (plain ``map`` for 1)."""
    if workers <= 1:
        yield map
        return
    # fork: quick to start, and safe here because with a pool the parent does no OpenCV work
    # of its own (a child forked from a process whose OpenCV threads ran could wait on them).
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker) as pool:  # __exit__ terminates the workers
        yield lambda fn, items: pool.imap(fn, items, chunksize=4)


# ---------------------------------------------------------------------------
# VOC layout (frame datasets and IR format 1)


@dataclass(frozen=True)
class _Source:
    """One id of a VOC-layout dataset with both files present."""

    id: str
    splits: tuple[str, ...]  # split lists naming it, in configured order
    xml: Path
    image: Path


@dataclass(frozen=True)
class _Object:
    """One object before validation against the real image size."""

    name: str | None  # None: unknown class id (reported with `unknown`)
    corners: tuple[float, ...]
    difficult: bool
    track_id: int | None = None
    unknown: str = ""  # description of an unmapped class id


def _scan_voc_layout(
    root: Path, annotations_dir: str, images_dir: str, splits_dir: str, splits: Sequence[str], issues: Issues
) -> list[_Source]:
    """Pair annotations, images and split lists; report every id that cannot be converted."""
    ann_dir, img_dir = root / annotations_dir, root / images_dir
    for d in (root, ann_dir, img_dir):
        if not d.is_dir():
            raise StageError(f"{d}: directory not found")
    xmls = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file()}
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir(), key=lambda p: (_suffix_rank(p), p.name)):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in images:
            issues.skip(p, DUPLICATE_IMAGE, f"{images[p.stem].name} is used")
        else:
            images[p.stem] = p
    listed: dict[str, list[str]] = {}
    list_file: dict[str, Path] = {}
    for split in splits:
        path = root / splits_dir / f"{split}.txt"
        try:
            text = ann.decode_list_file(path.read_bytes())
        except FileNotFoundError:
            raise StageError(f"{path}: split list not found (split {split!r} is configured)") from None
        except OSError as e:
            raise StageError(f"{path}: cannot read split list ({e.strerror})") from None
        for line, first in ann.parse_id_list(text):
            id_ = line if line in xmls or line in images else first
            named = listed.setdefault(id_, [])
            if split not in named:
                named.append(split)
            list_file.setdefault(id_, path)
    sources = []
    for id_ in sorted(set(xmls) | set(images) | set(listed), key=ann.natural_key):
        xml, image, named = xmls.get(id_), images.get(id_), listed.get(id_)
        if xml is None and image is None:
            issues.skip(list_file[id_], LISTED_BUT_MISSING, id_)
        elif image is None:
            issues.skip(xml, ANNOTATION_WITHOUT_IMAGE)
        elif xml is None:
            issues.skip(image, IMAGE_WITHOUT_ANNOTATION)
        elif not named:
            issues.skip(xml, NOT_IN_SPLIT, f"configured splits: {', '.join(splits)}", defect=False)
        else:
            sources.append(_Source(id_, tuple(named), xml, image))
    return sources


def _suffix_rank(p: Path) -> int:
    s = p.suffix.lower()
    return IMAGE_SUFFIXES.index(s) if s in IMAGE_SUFFIXES else len(IMAGE_SUFFIXES)


def _parse_xml(path: Path, issues: Issues) -> ann.VocRecord | None:
    try:
        return ann.parse_voc_xml(path.read_bytes())
    except OSError as e:
        issues.skip(path, UNREADABLE_FILE, e.strerror or str(e))
    except ann.AnnotationError as e:
        issues.skip(path, e.reason, e.detail)
    return None


def _voc_objects(record: ann.VocRecord) -> list[_Object]:
    return [_Object(o.name, o.bndbox, o.difficult, o.track_id) for o in record.objects]


@dataclass(frozen=True)
class _BoxFrame:
    """The coordinate frame the boxes of one annotation are in, and the scale to the image."""

    width: float
    height: float
    sx: float = 1.0
    sy: float = 1.0


def _annotation_frame(
    record: ann.VocRecord | None, image: LoadedImage, mode: SizeMismatch, file: Path, issues: Issues
) -> _BoxFrame | None:
    """The image's own frame, unless the XML states another size (then per ``mode``; None: skip)."""
    own = _BoxFrame(image.width, image.height)
    if record is None or record.width is None or record.height is None:
        return own
    if (record.width, record.height) == (image.width, image.height):
        return own
    said = f"annotation says {record.width}x{record.height}, image is {image.width}x{image.height}"
    if mode == "skip":
        issues.skip(file, SIZE_MISMATCH, said)
        return None
    if mode == "keep":
        issues.fix(file, SIZE_MISMATCH, f"{said}; used the image size, boxes unchanged")
        return own
    sx, sy = image.width / record.width, image.height / record.height
    issues.fix(file, SIZE_MISMATCH, f"{said}; used the image size, boxes scaled by {sx:.4g} x {sy:.4g}")
    return _BoxFrame(record.width, record.height, sx, sy)


def _clean_objects(
    objects: Sequence[_Object],
    frame: _BoxFrame,
    voc: bool,
    class_index: dict[str, int],
    file: Path,
    where: str,
    issues: Issues,
) -> dict[str, list]:
    """Validate one image's objects in their coordinate ``frame``: boxes, labels, difficult, track ids.

    Boxes are validated and clipped in the annotation's own frame, then scaled to the image.
    """
    size = f"{frame.width:g}x{frame.height:g}"
    out: dict[str, list] = {"boxes": [], "labels": [], "difficult": [], "track_ids": []}
    for i, obj in enumerate(objects):
        what = f"{where}object {i}"
        if obj.name is None:
            issues.skip(file, UNKNOWN_CLASS, f"{what}: {obj.unknown}")
            continue
        if obj.name not in class_index:
            issues.skip(file, UNKNOWN_CLASS, f"{what}: {obj.name!r} (known: {', '.join(class_index)})")
            continue
        check = ann.clean_box(obj.corners, frame.width, frame.height, voc=voc)
        corners = " ".join(f"{v:g}" for v in obj.corners)
        if check.box is None:
            issues.skip(file, check.reason, f"{what} ({obj.name!r}) [{corners}] in {size}")
            continue
        if check.reason:
            issues.fix(file, check.reason, f"{what} ({obj.name!r}) [{corners}] in {size}")
        x1, y1, x2, y2 = check.box
        # Rounded so that a scaled box does not carry float noise into the JSON.
        out["boxes"].append([round(v, 4) for v in (x1 * frame.sx, y1 * frame.sy, x2 * frame.sx, y2 * frame.sy)])
        out["labels"].append(class_index[obj.name])
        out["difficult"].append(obj.difficult)
        out["track_ids"].append(obj.track_id)
    return out


def _classes(configured: Sequence[str] | None, seen: Iterable[str]) -> list[str]:
    return list(configured) if configured is not None else sorted(set(seen))


def _key(text: str) -> str:
    """A WebDataset key: no dots (WebDataset splits at the first), no slashes, no spaces."""
    return "".join("_" if c in "./\\" or c.isspace() else c for c in text)


def _sample_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def convert_frames(cfg: VocConfig, workers: int, issues: Issues, out: Path, max_pixels: int) -> dict:
    """VOC layout -> frame shards in ``out``; returns the manifest (without the issue lists)."""
    root = Path(cfg.root)
    sources = _scan_voc_layout(root, cfg.annotations_dir, cfg.images_dir, cfg.splits_dir, cfg.splits, issues)
    items = []
    for src in sources:
        record = _parse_xml(src.xml, issues)
        if record is None:
            continue
        if len(src.splits) > 1:
            issues.fix(src.xml, IN_TWO_SPLITS, f"listed in {', '.join(src.splits)}; kept in {src.splits[0]}")
        items.append((src, src.splits[0], record))
    classes = _classes(cfg.classes, (o.name for _, _, r in items for o in r.objects))
    class_index = {c: i for i, c in enumerate(classes)}
    stats = {s: Counter() for s in cfg.splits}
    keys: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        imap = stack.enter_context(_mapper(workers))
        writers = {
            s: stack.enter_context(ShardWriter(out, s, cfg.shard_size, cfg.shard_max_bytes)) for s in cfg.splits
        }
        images = imap(functools.partial(load_image, max_pixels=max_pixels), [str(src.image) for src, _, _ in items])
        for (src, split, record), image in tqdm(
            zip(items, images), total=len(items), desc="voc", unit="img", disable=None, leave=False
        ):
            if image.error:
                issues.skip(src.image, *image.error)
                continue
            if image.conversion:
                issues.convert(src.image, image.conversion)
            frame = _annotation_frame(record, image, cfg.size_mismatch, src.xml, issues)
            if frame is None:
                continue
            objs = _clean_objects(_voc_objects(record), frame, True, class_index, src.xml, "", issues)
            key = _key(src.id)
            if key in keys:
                issues.skip(src.xml, KEY_COLLISION, f"key {key!r} is already {keys[key]!r}")
                continue
            keys[key] = src.id
            sample = {
                "id": src.id,
                "width": image.width,
                "height": image.height,
                "boxes": objs["boxes"],
                "labels": objs["labels"],
                "difficult": objs["difficult"],
            }
            writers[split].write(key, {image.ext: image.data, "json": _sample_json(sample)})
            stats[split].update(samples=1, frames=1, boxes=len(objs["boxes"]))
    return {
        "kind": "frames",
        "source": str(root),
        "classes": classes,
        "splits": {
            s: {
                "samples": stats[s]["samples"],
                "frames": stats[s]["frames"],
                "boxes": stats[s]["boxes"],
                "shards": writers[s].shards,
            }
            for s in cfg.splits
        },
    }


# ---------------------------------------------------------------------------
# Clips (IR formats 1 and 2)


@dataclass(frozen=True)
class _FrameRef:
    """One frame of a video before its image is read."""

    number: int
    id: str
    objects: tuple[_Object, ...]
    file: Path  # the annotation file, for reports
    where: str  # prefix for reports, e.g. "frame 12, "
    voc: bool  # corners are VOC 1-based
    record: ann.VocRecord | None = None  # for the XML size check


@dataclass(frozen=True)
class _VideoRef:
    """One video to clip: its split, its frames in order, where to report it."""

    name: str
    split: str
    file: Path
    frames: tuple[_FrameRef, ...]


class _ClipWriter:
    """Cuts videos into clips and writes them; keeps the manifest's counts."""

    def __init__(
        self,
        cfg: IrConfig,
        splits: Sequence[str],
        class_index: dict[str, int],
        issues: Issues,
        out: Path,
        size_mismatch: SizeMismatch = "scale",
    ):
        self.cfg = cfg
        self.size_mismatch = size_mismatch
        self.class_index = class_index
        self.issues = issues
        self.out = out
        self.splits = list(splits)
        self.writers: dict[str, ShardWriter] = {}
        self.stats = {s: Counter() for s in splits}
        self.videos: dict[str, list[str]] = {s: [] for s in splits}
        self.keys: dict[str, str] = {}
        self.track_ids = False

    def open(self, stack: contextlib.ExitStack) -> None:
        for s in self.splits:
            writer = ShardWriter(self.out, s, self.cfg.shard_size, self.cfg.shard_max_bytes)
            self.writers[s] = stack.enter_context(writer)

    def add_video(self, video: _VideoRef, images: Sequence[tuple[_FrameRef, LoadedImage]]) -> None:
        """Write the clips of one video from its readable frames (in frame order)."""
        frames = []
        for ref, image in images:
            frame = _annotation_frame(ref.record, image, self.size_mismatch, ref.file, self.issues)
            if frame is None:
                continue
            objs = _clean_objects(ref.objects, frame, ref.voc, self.class_index, ref.file, ref.where, self.issues)
            frames.append((ref, image, objs))
        segments = self._segments(video.name, frames)
        # Track ids are stored for every clip of a video whose source has any, so that
        # one video's clips all look alike (an object without one gets null).
        tracked = any(o.track_id is not None for ref in video.frames for o in ref.objects)
        self.track_ids |= tracked
        L, stride = self.cfg.clip_length, self.cfg.stride
        written = False
        for index, seg in enumerate(segments):
            span = f"video {video.name!r} frames {seg[0][0].number}..{seg[-1][0].number}"
            if len(seg) < L:
                self.issues.skip(video.file, SHORT_VIDEO, f"{span}: {len(seg)} frames < {L}", defect=False)
                continue
            starts = ann.clip_starts(len(seg), L, stride)
            st = self.stats[video.split]
            for start in starts:
                clip = seg[start : start + L]
                key = _key(f"{video.name}_{clip[0][0].number:06d}")
                if key in self.keys:
                    self.issues.skip(video.file, KEY_COLLISION, f"{span}: key {key!r} is also {self.keys[key]!r}")
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
                    "boxes": [o["boxes"] for _, _, o in clip],
                    "labels": [o["labels"] for _, _, o in clip],
                    "difficult": [o["difficult"] for _, _, o in clip],
                }
                if tracked:
                    sample["track_ids"] = [o["track_ids"] for _, _, o in clip]
                members["json"] = _sample_json(sample)
                self.writers[video.split].write(key, members)
                st.update(samples=1, frame_slots=L)
                written = True
            st.update(
                frames=len(seg),
                segments=1,
                boxes=sum(len(o["boxes"]) for _, _, o in seg),
                frames_covered_twice=len(starts) * L - len(seg),
            )
        if written:
            self.videos[video.split].append(video.name)

    def _segments(self, name: str, frames: list) -> list[list]:
        """Split a video at gaps larger than max_gap and where the frame size changes."""
        runs, _ = ann.group_videos(((name, f[0].number, f) for f in frames), self.cfg.max_gap)
        out = []
        for run_ in runs:
            current: list = []
            for f in run_.items:
                if current and (f[1].width, f[1].height) != (current[-1][1].width, current[-1][1].height):
                    out.append(current)
                    current = []
                current.append(f)
            out.append(current)
        return out

    def manifest(self) -> dict:
        splits = {}
        for s in self.splits:
            st = self.stats[s]
            splits[s] = {
                "samples": st["samples"],
                "frames": st["frames"],
                "frame_slots": st["frame_slots"],
                "frames_covered_twice": st["frames_covered_twice"],
                "boxes": st["boxes"],
                "videos": len(self.videos[s]),
                "segments": st["segments"],
                "video_names": self.videos[s],
                "num_shards": len(self.writers[s].shards),
                "shards": self.writers[s].shards,
            }
        return {
            "clip_length": self.cfg.clip_length,
            "clip_stride": self.cfg.stride,
            "max_gap": self.cfg.max_gap,
            "has_track_ids": self.track_ids,
            "frames_covered_twice": sum(self.stats[s]["frames_covered_twice"] for s in self.splits),
            "splits": splits,
        }


def convert_ir_frames(cfg: IrConfig, workers: int, issues: Issues, out: Path, max_pixels: int) -> dict:
    """IR format 1 (VOC-layout frame sequences) -> clip shards in ``out``."""
    fc = cfg.frames
    root = Path(cfg.root)
    pattern = ann.compile_frame_pattern(fc.frame_id_pattern)
    sources = _scan_voc_layout(root, fc.annotations_dir, fc.images_dir, fc.splits_dir, fc.splits, issues)
    by_video: dict[str, list[tuple[int, _Source, ann.VocRecord]]] = {}
    for src in sources:
        try:
            video, number = ann.split_frame_id(src.id, pattern)
        except ann.AnnotationError as e:
            issues.skip(src.xml, e.reason, e.detail)
            continue
        record = _parse_xml(src.xml, issues)
        if record is not None:
            by_video.setdefault(video, []).append((number, src, record))
    videos: list[_VideoRef] = []
    for name in sorted(by_video, key=ann.natural_key):
        entries = sorted(by_video[name], key=lambda e: (e[0], ann.natural_key(e[1].id)))
        named = [s for s in fc.splits if any(s in src.splits for _, src, _ in entries)]
        if len(named) > 1:
            issues.fix(
                entries[0][1].xml,
                VIDEO_IN_TWO_SPLITS,
                f"video {name!r} has frames in {', '.join(named)}; the whole video goes to {named[0]}",
            )
        refs = []
        for number, src, record in entries:
            if refs and refs[-1].number == number:
                issues.skip(src.xml, ann.DUPLICATE_FRAME, f"frame {number} of video {name!r} is also {refs[-1].id!r}")
                continue
            refs.append(_FrameRef(number, src.id, tuple(_voc_objects(record)), src.xml, "", True, record))
        videos.append(_VideoRef(name, named[0], entries[0][1].xml, tuple(refs)))
    image_of = {src.id: src.image for src in sources}
    classes = _classes(cfg.classes, (o.name for v in videos for f in v.frames for o in f.objects))
    clips = _ClipWriter(cfg, fc.splits, {c: i for i, c in enumerate(classes)}, issues, out, fc.size_mismatch)
    flat = [(v, f) for v in videos for f in v.frames]
    with contextlib.ExitStack() as stack:
        imap = stack.enter_context(_mapper(workers))
        clips.open(stack)
        loaded = imap(_load_clip_frame, [(str(image_of[f.id]), cfg.video.jpeg_quality, max_pixels) for _, f in flat])
        current: _VideoRef | None = None
        good: list = []
        for (video, ref), image in tqdm(
            zip(flat, loaded), total=len(flat), desc="ir", unit="frame", disable=None, leave=False
        ):
            if current is not None and video is not current:
                clips.add_video(current, good)
                good = []
            current = video
            if image.error:
                issues.skip(image_of[ref.id], *image.error)
                continue
            if image.conversion:
                issues.convert(image_of[ref.id], image.conversion)
            good.append((ref, image))
        if current is not None:
            clips.add_video(current, good)
    return {"kind": "clips", "format": "frames", "source": str(root), "classes": classes, **clips.manifest()}


def _load_clip_frame(task: tuple[str, int, int]) -> LoadedImage:
    return load_image(*task)


@dataclass(frozen=True)
class _VideoSource:
    name: str
    kind: Literal["file", "folder"]
    path: Path
    annotation: Path
    mot: bool


def _discover_videos(root: Path, vc: IrVideoConfig, issues: Issues) -> list[_VideoSource]:
    if not root.is_dir():
        raise StageError(f"{root}: directory not found")
    videos_dir, frames_dir, ann_dir = root / vc.videos_dir, root / vc.frames_dir, root / vc.annotations_dir
    if not videos_dir.is_dir() and not frames_dir.is_dir():
        raise StageError(f"{root}: neither {vc.videos_dir}/ nor {vc.frames_dir}/ found")
    found: dict[str, tuple[str, Path]] = {}
    if frames_dir.is_dir():
        for p in sorted(frames_dir.iterdir()):
            if p.is_dir():
                found[p.name] = ("folder", p)
    if videos_dir.is_dir():
        for p in sorted(videos_dir.iterdir(), key=lambda p: p.name):
            if p.suffix.lower() not in VIDEO_SUFFIXES or not p.is_file():
                continue
            if p.stem in found:
                issues.skip(p, DUPLICATE_VIDEO, f"{found[p.stem][1]} is used")
            else:
                found[p.stem] = ("file", p)
    annotations: dict[str, tuple[Path, bool]] = {}
    if ann_dir.is_dir():
        for p in sorted(ann_dir.iterdir()):
            if p.is_dir() and (p / "gt.txt").is_file():
                annotations[p.name] = (p / "gt.txt", True)
        for p in sorted(ann_dir.iterdir()):
            if p.suffix.lower() == ".txt" and p.is_file():
                if p.stem in annotations:
                    issues.skip(p, DUPLICATE_ANNOTATION, f"{annotations[p.stem][0]} is used")
                else:
                    annotations[p.stem] = (p, False)
    out = []
    for name in sorted(set(found) | set(annotations), key=ann.natural_key):
        if name not in annotations:
            issues.skip(found[name][1], VIDEO_WITHOUT_ANNOTATION)
        elif name not in found:
            issues.skip(annotations[name][0], ANNOTATION_WITHOUT_VIDEO)
        else:
            kind, path = found[name]
            out.append(_VideoSource(name, kind, path, *annotations[name]))  # type: ignore[arg-type]
    return out


def _video_splits(
    root: Path, vc: IrVideoConfig, sources: list[_VideoSource], issues: Issues
) -> tuple[list[str], dict[str, str]]:
    """Split names and video -> split, from the splits file when present, else by hash."""
    path = root / vc.splits_file
    names = [s.name for s in sources]
    if not path.is_file():
        return ["train", "val"], ann.split_videos(names, vc.val_fraction)
    try:
        listing = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: cannot read splits file ({e})") from None
    if not isinstance(listing, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v) for k, v in listing.items()
    ):
        raise StageError(f'{path}: expected {{"train": [names], "val": [names]}}')
    try:
        _check_splits(list(listing), f"{path} split names")
    except ConfigError as e:
        raise StageError(str(e)) from None
    assignment: dict[str, str] = {}
    available = set(names)
    for split, listed in listing.items():
        for name in listed:
            if name not in available:
                issues.skip(path, LISTED_VIDEO_MISSING, f"{name!r} in {split}")
            elif name in assignment:
                if assignment[name] != split:
                    kept = assignment[name]
                    issues.fix(path, VIDEO_IN_TWO_SPLITS, f"{name!r} in {kept} and {split}; kept in {kept}")
            else:
                assignment[name] = split
    return list(listing), assignment


def _video_annotations(src: _VideoSource, issues: Issues) -> dict | list | None:
    """The parsed box list (per line) or gt.txt (by frame number); None when unusable."""
    try:
        text = src.annotation.read_text(encoding="utf-8-sig", errors="replace")
        return ann.parse_mot(text) if src.mot else ann.parse_box_list(text)
    except OSError as e:
        issues.skip(src.annotation, UNREADABLE_FILE, e.strerror or str(e))
    except ann.AnnotationError as e:
        issues.skip(src.annotation, e.reason, e.detail)
    return None


def _fit_box_list(labels: list, frames: int, file: Path, issues: Issues) -> list | None:
    """The box list's lines for a video of ``frames`` frames; None (skipped) if they don't fit.

    Lines without boxes after the last frame (the blank lines an editor leaves at the end
    of a file) are dropped and reported; any other difference in length skips the video.
    """
    extra = len(labels) - frames
    if extra > 0 and not any(labels[frames:]):
        issues.fix(file, BOX_LIST_TAIL, f"{extra} line(s) without boxes after frame {frames} ignored", defect=False)
        return labels[:frames]
    if extra:
        issues.skip(file, BOX_LIST_LENGTH, f"{len(labels)} lines, {frames} frames; video skipped")
        return None
    return labels


def _mot_objects(rows: Sequence[ann.TrackBox], mot_classes: Sequence[str]) -> tuple[_Object, ...]:
    objs = []
    for r in rows:
        if 1 <= r.class_id <= len(mot_classes):
            objs.append(_Object(mot_classes[r.class_id - 1], r.box, r.difficult, r.track_id))
        else:
            unknown = f"class id {r.class_id} (mot_classes has {len(mot_classes)})"
            objs.append(_Object(None, r.box, r.difficult, r.track_id, unknown))
    return tuple(objs)


def convert_ir_video(cfg: IrConfig, workers: int, issues: Issues, out: Path, max_pixels: int) -> dict:
    """IR format 2 (video files or frame folders, box lists or MOT gt.txt) -> clip shards in ``out``."""
    vc, root = cfg.video, Path(cfg.root)
    sources = _discover_videos(root, vc, issues)
    splits, assignment = _video_splits(root, vc, sources, issues)
    todo = []
    for src in sources:
        if src.name not in assignment:
            issues.skip(src.path, NOT_IN_SPLIT, f"not in {vc.splits_file}", defect=False)
            continue
        labels = _video_annotations(src, issues)
        if labels is not None:
            todo.append((src, labels))
    seen = []
    for src, labels in todo:
        if src.mot:
            seen += [o.name for rows in labels.values() for o in _mot_objects(rows, vc.mot_classes) if o.name]
        elif any(labels):
            seen.append(vc.box_list_class)
    classes = _classes(cfg.classes, seen)
    clips = _ClipWriter(cfg, splits, {c: i for i, c in enumerate(classes)}, issues, out)
    tasks = [(s.kind, str(s.path), s.name, vc.jpeg_quality, max_pixels) for s, _ in todo]
    with contextlib.ExitStack() as stack:
        imap = stack.enter_context(_mapper(workers))
        clips.open(stack)
        for (src, labels), decoded in tqdm(
            zip(todo, imap(_decode_video, tasks)), total=len(todo), desc="ir", unit="video", disable=None, leave=False
        ):
            for file, reason, detail in decoded.problems:
                issues.skip(file, reason, detail)
            if decoded.error:
                issues.skip(src.path, *decoded.error)
                continue
            if src.mot:
                extra = sorted(set(labels) - set(decoded.numbers))
                if extra:
                    detail = f"frames {_ranges(extra)}; video has {_ranges(decoded.numbers)}"
                    issues.skip(src.annotation, MOT_FRAMES, detail)
                    continue
                objects_of = {n: _mot_objects(labels.get(n, ()), vc.mot_classes) for n in decoded.numbers}
            else:
                labels = _fit_box_list(labels, len(decoded.numbers), src.annotation, issues)
                if labels is None:
                    continue
                objects_of = {
                    n: tuple(_Object(vc.box_list_class, b, False) for b in boxes)
                    for n, boxes in zip(decoded.numbers, labels)
                }
            refs = [
                _FrameRef(n, id_, objects_of[n], src.annotation, f"frame {n}, ", False)
                for n, id_, _, _ in decoded.frames
            ]
            for _, _, image, file in decoded.frames:
                if image.conversion:
                    issues.convert(file, image.conversion)
            video = _VideoRef(src.name, assignment[src.name], src.path, tuple(refs))
            clips.add_video(video, [(ref, image) for ref, (_, _, image, _) in zip(refs, decoded.frames)])
    return {"kind": "clips", "format": "video", "source": cfg.root, "classes": classes, **clips.manifest()}


def _ranges(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 7] -> "1-3, 7"``."""
    parts, start, prev = [], None, None
    for n in numbers:
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = n
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Stage


def _relative(file: str, root: str | Path) -> str:
    try:
        return str(Path(file).relative_to(root))
    except ValueError:
        return str(file)


def _check_written(name: str, manifest: dict, issues: Issues, allow_empty: bool) -> None:
    """No sample at all, or an empty configured split, is a :class:`StageError` saying what was found."""
    source = manifest.get("source", name)
    counts = {s: v["samples"] for s, v in manifest["splits"].items()}
    if sum(counts.values()) == 0:
        raise StageError(f"{source}: no {name} sample was written; {issues.hint(source)}")
    empty = [s for s, n in counts.items() if n == 0]
    if empty and not allow_empty:
        sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise StageError(
            f"{source}: {name} split {empty[0]!r} would be empty (samples: {sizes}); {issues.hint(source)}; "
            "fix the split lists, or set prepare.allow_empty_splits: true if an empty split is intended"
        )


def _build(name: str, out: Path, convert: Callable[[Path], dict], issues: Issues, allow_empty: bool = False) -> dict:
    """Run ``convert`` into a temporary directory; write the manifest last; rename into place.

    Nothing replaces the previous output unless every configured split got samples (or
    ``allow_empty``) and at least one sample was written.
    """
    for stale in out.parent.glob(f"{TMP_PREFIX}{out.name}.*") if out.parent.is_dir() else ():
        log.info("%s: removing %s left by an interrupted run", name, stale)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out) as tmp:
        manifest = convert(tmp)
        _check_written(name, manifest, issues, allow_empty)
        manifest.update(issues.manifest())
        write_json(tmp / "manifest.json", manifest)
    splits = ", ".join(f"{s} {v['samples']}" for s, v in manifest["splits"].items())
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    log.info("%s: wrote %s in %d shards to %s (%s)", name, splits, n_shards, out, manifest["kind"])
    log.info("%s: %s", name, issues.summary())
    return manifest


def _disabled(name: str, out: Path, kind: str) -> None:
    """A disabled dataset still gets its output (DVC expects it): a manifest that says so."""
    with atomic_dir(out) as tmp:
        write_json(tmp / "manifest.json", {"kind": kind, "disabled": True, "classes": [], "splits": {}, "skipped": []})
    log.info("%s: disabled in params; wrote an empty %s", name, out)


def prepare(cfg: PrepareConfig, strict: bool = False) -> dict[str, dict]:
    """Convert the configured datasets; returns their manifests by name (``voc``, ``ir``)."""
    check_writable(Path(cfg.voc.out).parent, Path(cfg.ir.out).parent)
    manifests = {}
    if cfg.voc.enabled:
        issues = Issues(strict)
        manifests["voc"] = _build(
            "voc", Path(cfg.voc.out), lambda tmp: convert_frames(cfg.voc, cfg.workers, issues, tmp, cfg.max_pixels), issues,
            cfg.allow_empty_splits,
        )
    else:
        _disabled("voc", Path(cfg.voc.out), "frames")
    if cfg.ir.enabled:
        issues = Issues(strict)
        convert = convert_ir_frames if cfg.ir.source == "frames" else convert_ir_video
        manifests["ir"] = _build(
            "ir", Path(cfg.ir.out), lambda tmp: convert(cfg.ir, cfg.workers, issues, tmp, cfg.max_pixels), issues,
            cfg.allow_empty_splits,
        )
    else:
        _disabled("ir", Path(cfg.ir.out), "clips")
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input (exit code 2)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(PrepareConfig, load_params(args.params), "prepare", args.overrides, args.params)
        log.info("prepare: %s", json.dumps(to_dict(cfg)))
        prepare(cfg, strict=args.strict)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
