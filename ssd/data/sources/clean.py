"""One image's objects checked against the image as it really is: size, boxes, classes.

Shared by the frame and clip writers, so every source format gets the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from ssd.data import annotations as ann
from ssd.data.sources.decode import LoadedImage
from ssd.data.sources.records import Frame, Obj
from ssd.data.sources.report import SIZE_MISMATCH, UNKNOWN_CLASS, Report

SizeMismatch = Literal["scale", "keep", "skip"]
"""What to do when an annotation's stated size disagrees with the real image (whose size is always used).

``scale``: the boxes are in the annotation's coordinate frame (the image was resized
after annotation), so they are validated there and scaled to the image; this is what
real data shows (ir-sirst Misc_111: XML 592x400, PNG 325x220, and only the scaled box
lands on the target). ``keep``: the boxes are in image pixels and only the stated size
is wrong (clipped like any box). ``skip``: drop the image. All three report it.
"""


@dataclass(frozen=True)
class BoxFrame:
    """The coordinate frame the boxes of one annotation are in, and the scale to the image."""

    width: float
    height: float
    sx: float = 1.0
    sy: float = 1.0


def box_frame(
    declared: tuple[float, float] | None, image: LoadedImage, mode: SizeMismatch, file: str, report: Report
) -> BoxFrame | None:
    """The image's own frame, unless the annotation states another size (then per ``mode``; None: skip)."""
    own = BoxFrame(image.width, image.height)
    if declared is None or tuple(declared) == (image.width, image.height):
        return own
    said = f"annotation says {declared[0]:g}x{declared[1]:g}, image is {image.width}x{image.height}"
    if mode == "skip":
        report.skip(file, SIZE_MISMATCH, said)
        return None
    if mode == "keep":
        report.fix(file, SIZE_MISMATCH, f"{said}; used the image size, boxes unchanged")
        return own
    sx, sy = image.width / declared[0], image.height / declared[1]
    report.fix(file, SIZE_MISMATCH, f"{said}; used the image size, boxes scaled by {sx:.4g} x {sy:.4g}")
    return BoxFrame(declared[0], declared[1], sx, sy)


def clean_objects(
    objects: Sequence[Obj], frame: BoxFrame, voc: bool, class_index: dict[str, int], file: str, where: str, report: Report
) -> dict[str, list]:
    """Validate one image's objects in their coordinate ``frame``: boxes, labels, difficult, track ids.

    Boxes are validated and clipped in the annotation's own frame, then scaled to the image.
    """
    size = f"{frame.width:g}x{frame.height:g}"
    out: dict[str, list] = {"boxes": [], "labels": [], "difficult": [], "track_ids": []}
    for i, obj in enumerate(objects):
        what = f"{where}object {i}"
        if obj.name is None:
            report.skip(file, UNKNOWN_CLASS, f"{what}: {obj.unknown}")
            continue
        if obj.name not in class_index:
            report.skip(file, UNKNOWN_CLASS, f"{what}: {obj.name!r} (known: {', '.join(class_index)})")
            continue
        check = ann.clean_box(obj.corners, frame.width, frame.height, voc=voc)
        corners = " ".join(f"{v:g}" for v in obj.corners)
        if check.box is None:
            report.skip(file, check.reason, f"{what} ({obj.name!r}) [{corners}] in {size}")
            continue
        if check.reason:
            report.fix(file, check.reason, f"{what} ({obj.name!r}) [{corners}] in {size}")
        x1, y1, x2, y2 = check.box
        # Rounded so that a scaled box does not carry float noise into the JSON.
        out["boxes"].append([round(v, 4) for v in (x1 * frame.sx, y1 * frame.sy, x2 * frame.sx, y2 * frame.sy)])
        out["labels"].append(class_index[obj.name])
        out["difficult"].append(obj.difficult)
        out["track_ids"].append(obj.track_id)
    return out


def clean_frame(
    frame: Frame, image: LoadedImage, mode: SizeMismatch, class_index: dict[str, int], report: Report
) -> dict[str, list] | None:
    """A frame's objects checked against its loaded image; None when the frame is skipped."""
    if frame.normalized:  # validated as fractions, then scaled to the image's pixels
        coords: BoxFrame | None = BoxFrame(1.0, 1.0, image.width, image.height)
    else:
        coords = box_frame(frame.declared_size, image, mode, frame.file, report)
    if coords is None:
        return None
    return clean_objects(frame.objects, coords, frame.voc, class_index, frame.file, frame.where, report)
