"""Parsing and cleanup of detection annotations, as pure functions over text.

No file I/O here: callers read the bytes, these functions interpret them. What
is understood:

- Pascal VOC XML (:func:`parse_voc_xml`): image size and objects with name,
  ``bndbox`` and ``difficult``.
- IR box lists (:func:`parse_box_list`): one line per frame, ``x y w h`` per
  object (whitespace- or comma-separated floats); an empty line, a line of
  zeros or a NaN means "no object in this frame".
- MOT-style ``gt.txt`` (:func:`parse_mot`): ``frame,id,x,y,w,h,conf,class,visibility``.
- Frame ids, videos, clips and splits are :mod:`ssd.data.sequences`'.
- Box validation (:func:`clean_box`).

Coordinates: every box returned here is ``(x1, y1, x2, y2)`` in **pixels** of
the image as stored, corners as floats, so a box covering a whole W x H image
is ``(0, 0, W, H)``. Pascal VOC's 1-based inclusive corners are converted as
``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (by :func:`clean_box`,
which also validates them in the source's own terms first).

Box cleanup policy (:func:`clean_box`), checked in this order on the source's
own corners:

- **inverted** (``x2 < x1`` or ``y2 < y1``): skipped, never swapped, since an
  inverted box is usually a typo in one coordinate rather than swapped corners;
- **zero-area** (``x2 == x1`` or ``y2 == y1``): skipped. For VOC this means
  ``xmin == xmax``: the inclusive convention would read it as a one-pixel
  line, but annotation tools write it for a click without a drag;
- **partly outside the image**: clipped to the image and kept (reported as
  clipped);
- **nothing left after clipping** (entirely outside): skipped.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Sequence

Box = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` corners in pixels."""

# Reasons: short fixed categories, so that reports can be counted by reason.
MALFORMED_XML = "malformed XML"
MISSING_BNDBOX = "missing bndbox"
NON_NUMERIC_COORDINATE = "non-numeric coordinate"
MALFORMED_BOX_LIST = "malformed box list"
MALFORMED_MOT = "malformed gt.txt"
BAD_FRAME_ID = "id does not match the frame id pattern"
INVERTED_BOX = "inverted box"
ZERO_AREA_BOX = "zero-area box"
BOX_CLIPPED = "box clipped to the image"
BOX_OUTSIDE = "box outside the image"
DUPLICATE_FRAME = "duplicate frame number"


class AnnotationError(ValueError):
    """An annotation that cannot be used at all.

    ``reason`` is a short fixed category (one of this module's constants),
    ``detail`` a one-line explanation; ``str(e)`` joins them.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ---------------------------------------------------------------------------
# Pascal VOC XML


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: ``bndbox`` as written in the file (1-based ``xmin, ymin, xmax, ymax``).

    ``track_id`` comes from an optional ``<track_id>`` (or ImageNet VID's ``<trackid>``) element, None without one.
    """

    name: str
    bndbox: Box
    difficult: bool
    track_id: int | None = None


@dataclass(frozen=True)
class VocRecord:
    """One VOC annotation file. ``width``/``height`` are None where ``<size>`` is absent or unusable."""

    filename: str | None
    width: int | None
    height: int | None
    objects: tuple[VocObject, ...]


def parse_voc_xml(text: str | bytes) -> VocRecord:
    """Parse a Pascal VOC annotation.

    Raises :class:`AnnotationError` with reason :data:`MALFORMED_XML` (not XML,
    or no ``<annotation>`` root, or an object without a name),
    :data:`MISSING_BNDBOX` (an ``<object>`` without ``<bndbox>`` or one of its
    four corners), or :data:`NON_NUMERIC_COORDINATE` (a corner that is not a
    finite number). The whole file is rejected in these cases: keeping the
    other objects would leave an unlabelled object in the image, which trains
    the detector to call it background.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise AnnotationError(MALFORMED_XML, str(e)) from None
    if root.tag != "annotation":
        raise AnnotationError(MALFORMED_XML, f"root element is <{root.tag}>, expected <annotation>")
    width = _positive_int(root.findtext("size/width"))
    height = _positive_int(root.findtext("size/height"))
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AnnotationError(MALFORMED_XML, f"object {i} has no <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(MISSING_BNDBOX, f"object {i} ({name!r}) has no <bndbox>")
        corners = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            raw = bndbox.findtext(tag)
            if raw is None:
                raise AnnotationError(MISSING_BNDBOX, f"object {i} ({name!r}) <bndbox> has no <{tag}>")
            value = _finite_float(raw)
            if value is None:
                raise AnnotationError(
                    NON_NUMERIC_COORDINATE, f"object {i} ({name!r}) <{tag}> is {raw.strip()!r}"
                )
            corners.append(value)
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
        track = (obj.findtext("track_id") or obj.findtext("trackid") or "").strip()  # trackid: ImageNet VID
        track_id = int(track) if track.lstrip("-").isdigit() else None
        objects.append(VocObject(name, tuple(corners), difficult, track_id))  # type: ignore[arg-type]
    filename = root.findtext("filename")
    return VocRecord(filename.strip() if filename else None, width, height, tuple(objects))


# ---------------------------------------------------------------------------
# Split lists


def decode_list_file(data: bytes) -> str:
    """The text of a split list or similar id list, as file names are decoded.

    UTF-8 with an optional byte-order mark (which Windows editors write, and which would
    otherwise stick to the first id); bytes that are not UTF-8 are kept as Python keeps them
    in file names (``surrogateescape``), so an id matches the file it names whatever its bytes.
    """
    return data.decode("utf-8-sig", errors="surrogateescape")


def parse_id_list(text: str) -> list[tuple[str, str]]:
    """The ids of a VOC split list: per entry ``(whole line, first field)``, both stripped.

    A line is an id, or an id and a flag (VOC's per-class lists: ``000005 -1``); blank lines
    and ``#`` comments are skipped. Which of the two is the id depends on the files present
    (an id may contain a space), so both are returned for the caller to match.
    """
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((stripped, stripped.split()[0]))
    return out


# ---------------------------------------------------------------------------
# IR box lists and MOT gt.txt

_SEPARATORS = re.compile(r"[\s,]+")


def parse_box_list(text: str) -> list[list[Box]]:
    """Parse an IR box list: line ``k`` holds the boxes of the ``k``-th frame.

    Each line is ``x y w h`` (or several such groups of four), separated by
    whitespace and/or commas; ``x, y`` is the top-left corner in pixels. An
    empty line, a group of four zeros, or a group with a NaN is "no object".
    A final newline does not start another frame (``"a\\nb\\n"`` is two frames).
    Returned boxes are corners ``(x, y, x + w, y + h)``, not yet validated
    (see :func:`clean_box`).

    Raises :class:`AnnotationError` (:data:`MALFORMED_BOX_LIST`) for a
    non-numeric value or a count that is not a multiple of four.
    """
    frames: list[list[Box]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = [f for f in _SEPARATORS.split(line.strip()) if f]
        if len(fields) % 4:
            raise AnnotationError(MALFORMED_BOX_LIST, f"line {lineno}: expected x y w h, got {line.strip()!r}")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise AnnotationError(MALFORMED_BOX_LIST, f"line {lineno}: non-numeric value in {line.strip()!r}") from None
        boxes = []
        for j in range(0, len(values), 4):
            x, y, w, h = values[j : j + 4]
            if any(math.isnan(v) for v in (x, y, w, h)) or (x == y == w == h == 0):
                continue
            if any(math.isinf(v) for v in (x, y, w, h)):
                raise AnnotationError(MALFORMED_BOX_LIST, f"line {lineno}: infinite value in {line.strip()!r}")
            boxes.append((x, y, x + w, y + h))
        frames.append(boxes)
    return frames


@dataclass(frozen=True)
class TrackBox:
    """One row of a MOT ``gt.txt``: corners, 1-based class id, track id.

    ``difficult`` is True where the row's ``conf`` column is 0, which in MOT
    ground truth means "ignore this box in evaluation".
    """

    box: Box
    class_id: int
    track_id: int
    difficult: bool


def parse_mot(text: str) -> dict[int, list[TrackBox]]:
    """Parse a MOT-style ``gt.txt``: ``frame,id,x,y,w,h[,conf[,class[,visibility]]]`` per line.

    Returns ``{frame number: [TrackBox, ...]}`` (frames without rows are
    absent: they have no objects). ``conf`` defaults to 1 and ``class`` to 1
    when the columns are missing; ``visibility`` is not used. Blank lines are
    ignored. Raises :class:`AnnotationError` (:data:`MALFORMED_MOT`) for fewer
    than six fields, a non-numeric or non-finite value, a negative frame, or a frame, track
    or class id that is not a whole number.
    """
    out: dict[int, list[TrackBox]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f for f in _SEPARATORS.split(line.strip()) if f]
        if len(fields) < 6:
            raise AnnotationError(MALFORMED_MOT, f"line {lineno}: expected at least frame,id,x,y,w,h")
        try:
            values = [float(f) for f in fields[:8]]
        except ValueError:
            raise AnnotationError(MALFORMED_MOT, f"line {lineno}: non-numeric value in {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise AnnotationError(MALFORMED_MOT, f"line {lineno}: non-finite value in {line.strip()!r}")
        frame, track, x, y, w, h = values[:6]
        if frame < 0 or frame != int(frame):
            raise AnnotationError(MALFORMED_MOT, f"line {lineno}: frame {fields[0]!r} is not a frame number")
        conf = values[6] if len(values) > 6 else 1.0
        class_id = values[7] if len(values) > 7 else 1.0
        for what, value in (("track id", track), ("class id", class_id)):
            if value != int(value):  # truncating 1.7 to class 1 would label the box silently
                raise AnnotationError(MALFORMED_MOT, f"line {lineno}: {what} {value:g} is not a whole number")
        box = TrackBox((x, y, x + w, y + h), int(class_id), int(track), conf == 0)
        out.setdefault(int(frame), []).append(box)
    return out


# ---------------------------------------------------------------------------
# Boxes


@dataclass(frozen=True)
class BoxCheck:
    """Outcome of :func:`clean_box`: ``box`` is None when the box is skipped.

    ``reason`` is None for a clean box, :data:`BOX_CLIPPED` for a kept box
    that was clipped, and :data:`INVERTED_BOX`, :data:`ZERO_AREA_BOX` or
    :data:`BOX_OUTSIDE` for a skipped one.
    """

    box: Box | None
    reason: str | None


def clean_box(corners: Sequence[float], width: float, height: float, *, voc: bool = False) -> BoxCheck:
    """Validate source ``corners`` and return a pixel box clipped to ``width`` x ``height``.

    ``voc=True``: ``corners`` are VOC ``xmin, ymin, xmax, ymax`` (1-based,
    inclusive) and are converted to ``(xmin - 1, ymin - 1, xmax, ymax)``;
    otherwise they are already ``(x1, y1, x2, y2)`` pixels. Inverted and
    zero-area are judged on the source corners (see the module docstring).
    """
    a1, b1, a2, b2 = (float(v) for v in corners)
    if a2 < a1 or b2 < b1:
        return BoxCheck(None, INVERTED_BOX)
    if a2 == a1 or b2 == b1:
        return BoxCheck(None, ZERO_AREA_BOX)
    x1, y1, x2, y2 = (a1 - 1.0, b1 - 1.0, a2, b2) if voc else (a1, b1, a2, b2)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        return BoxCheck(None, BOX_OUTSIDE)
    box = (cx1, cy1, cx2, cy2)
    return BoxCheck(box, None if box == (x1, y1, x2, y2) else BOX_CLIPPED)


def _positive_int(raw: str | None) -> int | None:
    value = _finite_float(raw) if raw is not None else None
    if value is None or value <= 0 or value != int(value):
        return None
    return int(value)


def _finite_float(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None
