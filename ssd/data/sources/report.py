"""What one conversion skipped, fixed or converted, and why: the manifest's report.

Every source and writer reports bad input here instead of raising, so that one bad
file costs one sample, not the run. ``strict=True`` turns the first *defect* (bad
input, as opposed to an exclusion on purpose) into an :class:`~ssd.errors.InputError`.
Reasons are short fixed categories so that reports can be counted by reason; the
parsing and box reasons live in :mod:`ssd.data.annotations`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ssd.errors import InputError

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


class Report:
    """Everything skipped, fixed or converted while converting one dataset.

    ``defect=True`` marks bad input: with ``strict`` it raises :class:`InputError` at
    once. Deliberate exclusions (``defect=False``) and image conversions are only
    recorded.
    """

    def __init__(self, strict: bool = False) -> None:
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
            raise InputError(f"{file}: {what} (--strict stops at the first bad input)")
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
            item = relative(e["file"], root) + (f": {e['detail']}" if e["detail"] else "")
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


def relative(file: str, root: str | Path) -> str:
    try:
        return str(Path(file).relative_to(root))
    except ValueError:
        return str(file)


def ranges(numbers) -> str:
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
