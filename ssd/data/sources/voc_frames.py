"""Frame sequences in VOC layout: ids like ``seq01_000123`` name the video and the frame number.

Same folders as :mod:`.voc`; a whole video goes to the first split that lists any of
its frames (reported when its frames are in several).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssd.bounds import Names, SubPath
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data.sources import voc
from ssd.data.sources.records import Listing, Video, check_split_names
from ssd.data.sources.report import VIDEO_IN_TWO_SPLITS, Report


@dataclass(frozen=True)
class VocFramesLayout:
    """VOC-layout frame sequences; the video and the frame number are taken from each id."""

    annotations_dir: SubPath = "Annotations"  # <id>.xml
    images_dir: SubPath = "JPEGImages"  # <id>.jpg|jpeg|png
    splits_dir: SubPath = "ImageSets/Main"  # <split>.txt frame id lists
    splits: Names = ("train", "val")  # a video listed in several goes to the first of these
    frame_id_pattern: str = seq.DEFAULT_FRAME_ID_PATTERN  # groups `video` and `frame`; default: <video>_<digits>

    def __post_init__(self) -> None:
        check_split_names(self.splits)
        try:
            seq.compile_frame_pattern(self.frame_id_pattern)
        except ValueError as e:
            raise ValueError(f"frame_id_pattern: {e}") from None


def read(root: Path, layout: VocFramesLayout, report: Report) -> Listing:
    pattern = seq.compile_frame_pattern(layout.frame_id_pattern)
    pairs = voc.scan(root, layout.annotations_dir, layout.images_dir, layout.splits_dir, layout.splits, report)
    by_video: dict[str, list] = {}
    for pair in pairs:
        try:
            video, number = seq.split_frame_id(pair.id, pattern)
        except ann.AnnotationError as e:
            report.skip(pair.xml, e.reason, e.detail)
            continue
        record = voc.parse_xml(pair.xml, report)
        if record is not None:
            by_video.setdefault(video, []).append((number, pair, record))
    videos = []
    for name in sorted(by_video, key=seq.natural_key):
        entries = sorted(by_video[name], key=lambda e: (e[0], seq.natural_key(e[1].id)))
        named = [s for s in layout.splits if any(s in pair.splits for _, pair, _ in entries)]
        first_xml = entries[0][1].xml
        if len(named) > 1:
            detail = f"video {name!r} has frames in {', '.join(named)}; the whole video goes to {named[0]}"
            report.fix(first_xml, VIDEO_IN_TWO_SPLITS, detail)
        frames = []
        for number, pair, record in entries:
            if frames and frames[-1].number == number:
                report.skip(pair.xml, ann.DUPLICATE_FRAME, f"frame {number} of video {name!r} is also {frames[-1].id!r}")
                continue
            frames.append(voc.frame(pair, record, number=number))
        videos.append(Video(name, named[0], str(first_xml), tuple(frames)))
    return Listing("clips", str(root), "frames", list(layout.splits), videos)
