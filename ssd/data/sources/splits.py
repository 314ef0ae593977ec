"""Whole videos to splits: from a splits file, or by a hash of each video's name.

Clips of one video never go to two splits (neighbouring frames are near-duplicates,
so a video in both would leak the validation set into training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

from ssd.bounds import AtLeast, Below, SubPath
from ssd.data import sequences as seq
from ssd.data.sources.records import check_split_names
from ssd.data.sources.report import LISTED_VIDEO_MISSING, VIDEO_IN_TWO_SPLITS, Report
from ssd.errors import InputError


@dataclass(frozen=True)
class VideoSplits:
    """How the videos of a source without split lists of its own are split."""

    splits_file: SubPath = "splits.json"  # {"train": [names], "val": [names]} in root; used when present
    # without a splits file: share of videos (by hash of name) put in val
    val_fraction: Annotated[float, AtLeast(0), Below(1)] = 0.2
    # > 0: instead, the last share of every video's frames goes to val. Neighbouring frames are
    # near-duplicates, so validation then leaks into training: only for a dataset of one video.
    frame_split: Annotated[float, AtLeast(0), Below(1)] = 0.0


def assign_splits(
    root: Path, names: Sequence[str], cfg: VideoSplits, report: Report
) -> tuple[list[str], dict[str, str]]:
    """Split names and video -> split: from ``root/splits_file`` when present, else by hash.

    With ``frame_split`` every video is assigned to train here; the clip writer moves the
    tail of each to val (:class:`~.clip_writer.ClipOptions`).
    """
    if cfg.frame_split > 0:
        return ["train", "val"], {n: "train" for n in names}
    if (root / cfg.splits_file).is_file():
        return read_splits_file(root / cfg.splits_file, names, report)
    return ["train", "val"], seq.split_videos(names, cfg.val_fraction)


def read_splits_file(path: Path, names: Sequence[str], report: Report) -> tuple[list[str], dict[str, str]]:
    """Split names and video -> split from ``{"train": [names], "val": [names]}``."""
    try:
        listing = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read splits file ({e})") from None
    if not isinstance(listing, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v) for k, v in listing.items()
    ):
        raise InputError(f'{path}: expected {{"train": [names], "val": [names]}}')
    try:
        check_split_names(list(listing))
    except ValueError as e:
        raise InputError(f"{path} split names: {e}") from None
    assignment: dict[str, str] = {}
    available = set(names)
    for split, listed in listing.items():
        for name in listed:
            if name not in available:
                report.skip(path, LISTED_VIDEO_MISSING, f"{name!r} in {split}")
            elif name in assignment:
                if assignment[name] != split:
                    kept = assignment[name]
                    report.fix(path, VIDEO_IN_TWO_SPLITS, f"{name!r} in {kept} and {split}; kept in {kept}")
            else:
                assignment[name] = split
    return list(listing), assignment
