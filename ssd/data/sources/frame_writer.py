"""Frame records -> frame shards: one sample per image (see ``docs/data-format.md``)."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ssd.data.shards import ShardWriter
from ssd.data.sources.clean import SizeMismatch, clean_frame
from ssd.data.sources.decode import ordered_map, run_task
from ssd.data.sources.records import Frame, Listing, sample_key
from ssd.data.sources.report import KEY_COLLISION, Report


@dataclass(frozen=True)
class WriteOptions:
    """How records become shards, whatever their format."""

    shard_size: int = 500  # max samples per shard
    shard_max_bytes: int = 256 * 1024 * 1024  # max bytes per shard (a bigger single sample gets its own)
    workers: int = 2  # processes that read, validate and encode images (1: no pool)
    max_pixels: int = 50_000_000  # bigger images are skipped, read from the header before decoding
    size_mismatch: SizeMismatch = "scale"  # an annotation's stated size differs from the image's
    jpeg_quality: int = 95  # clip shards: quality of frames that are not JPEG files already


def sample_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def write_frames(listing: Listing, classes: Sequence[str], out: Path, opts: WriteOptions, report: Report) -> dict:
    """Write ``listing``'s frames to shards in ``out``; returns the manifest (without the report)."""
    class_index = {c: i for i, c in enumerate(classes)}
    stats = {s: Counter() for s in listing.splits}
    keys: dict[tuple[str, str], str] = {}
    frames: list[Frame] = listing.items
    with contextlib.ExitStack() as stack:
        imap = stack.enter_context(ordered_map(opts.workers))
        writers = {
            s: stack.enter_context(ShardWriter(out, s, opts.shard_size, opts.shard_max_bytes)) for s in listing.splits
        }
        loaded = imap(run_task, (("image", f.image, None, opts.max_pixels) for f in frames))
        bar = tqdm(zip(frames, loaded), total=len(frames), desc=listing.format, unit="img", disable=None, leave=False)
        for frame, image in bar:
            if image.error:
                report.skip(frame.image, *image.error)
                continue
            if image.conversion:
                report.convert(frame.image, image.conversion)
            objs = clean_frame(frame, image, opts.size_mismatch, class_index, report)
            if objs is None:
                continue
            key = sample_key(frame.id)
            # Per split: YOLO and COCO name images by their path inside the split's folder, so
            # images/train/0001.jpg and images/val/0001.jpg are two images with one id.
            if (frame.split, key) in keys:
                report.skip(frame.file, KEY_COLLISION, f"key {key!r} is already {keys[frame.split, key]!r}")
                continue
            keys[frame.split, key] = frame.id
            sample = {"id": frame.id, "width": image.width, "height": image.height}
            sample.update(boxes=objs["boxes"], labels=objs["labels"], difficult=objs["difficult"])
            writers[frame.split].write(key, {image.ext: image.data, "json": sample_json(sample)})
            stats[frame.split].update(samples=1, frames=1, boxes=len(objs["boxes"]))
    splits = {}
    for s in listing.splits:
        st = stats[s]
        splits[s] = {"samples": st["samples"], "frames": st["frames"], "boxes": st["boxes"], "shards": writers[s].shards,
                     "sha256": writers[s].sha256}
    # No "format" key (clip manifests have one). The shards' SHA-256 make the manifest change with
    # any byte of the data (a corrected box keeps every shard's size), which a resume checks.
    return {"kind": "frames", "source": listing.source, "classes": list(classes), "splits": splits}
