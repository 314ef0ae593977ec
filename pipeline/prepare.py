"""Stage ``prepare``: convert frame and video datasets, as published, once into WebDataset shards.

Usage:
    python -m pipeline.prepare [--params params.yaml] [--set KEY=VALUE ...] [--strict]

    e.g. python -m pipeline.prepare --set voc.root=../shared/data/voc-bccd \\
             --set 'voc.splits=[train, val, test]' --set ir.enabled=false

Reads the ``prepare`` section of ``params.yaml`` (:class:`PrepareConfig`): for each
dataset, params -> a source of :mod:`ssd.data.sources` (one module per format) -> the
shared writer -> shards and manifest. It writes

- ``prepare.voc.out`` (default ``data/shards/voc/``): frame shards, one sample per image,
  from the ``prepare.voc.format`` dataset at ``prepare.voc.root``: Pascal VOC (folder names
  configurable, so ``images/`` + ``masks/`` + ``idx_427/`` converts too), COCO JSON or YOLO;
- ``prepare.ir.out`` (default ``data/shards/ir/``): clip shards, one sample per clip of
  ``clip_length`` consecutive frames of one video, from the ``prepare.ir.source`` dataset at
  ``prepare.ir.root``: VOC-layout frame sequences (ids like ``seq01_000123``), videos or
  frame folders with box lists or MOT ``gt.txt``, COCO-VID, ImageNet VID, OTB, LaSOT or
  Anti-UAV.

A new format is a new module of :mod:`ssd.data.sources` plus its entry in
:data:`FRAME_SOURCES` or :data:`CLIP_SOURCES` and its params section.

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

import json
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from pipeline.config import ConfigError, InputPath, load_config, load_params, to_dict
from pipeline.dvc_inputs import check_tracked, under_dvc
from pipeline.locks import try_lock
from pipeline.stage import StageError, arg_parser, check_replaceable, check_writable, run
from ssd.atomic import TMP_PREFIX, atomic_dir, write_json
from ssd.bounds import Count, Names, PositiveInt
from ssd.data.sources import coco, sot, vid, video, voc, voc_frames, yolo
from ssd.data.sources.clean import SizeMismatch
from ssd.data.sources.clip_writer import ClipOptions, write_clips
from ssd.data.sources.coco import CocoLayout
from ssd.data.sources.frame_writer import WriteOptions, write_frames
from ssd.data.sources.records import Listing, check_split_names, classes
from ssd.data.sources.report import Report
from ssd.data.sources.sot import AntiUavLayout, LasotLayout, OtbLayout
from ssd.data.sources.vid import VidLayout
from ssd.data.sources.yolo import YoloLayout

log = logging.getLogger("pipeline.prepare")


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class VocConfig(voc.VocLayout):
    """A frame dataset, converted to one sample per image (the VOC layout's keys are this section's own)."""

    enabled: bool = True  # false: write an empty output with a manifest that says so
    format: Literal["voc", "coco", "yolo"] = "voc"  # which reader; coco and yolo read their sub-sections
    root: InputPath = "data/sample/voc"  # dataset root (what the sample stage writes)
    out: str = "data/shards/voc"  # output directory; must match the stage's outs in dvc.yaml
    classes: Names | None = None  # null: discovered from the data (sorted); else others are skipped
    size_mismatch: SizeMismatch = "scale"  # XML size != image size: see ssd.data.sources.clean.SizeMismatch
    shard_size: PositiveInt = 500  # max samples per shard
    shard_max_bytes: PositiveInt = 256 * 1024 * 1024  # max bytes per shard (a bigger single sample gets its own)
    coco: CocoLayout = field(default_factory=CocoLayout)  # format coco: JSON per split
    yolo: YoloLayout = field(default_factory=YoloLayout)  # format yolo: images/ + labels/ + data.yaml

    def __post_init__(self) -> None:
        _check_splits(self.splits, "prepare.voc.splits")


@dataclass(frozen=True)
class IrFramesConfig(voc_frames.VocFramesLayout):
    """IR format 1: VOC-layout frame sequences, video and frame number taken from each id."""

    size_mismatch: SizeMismatch = "scale"  # XML size != image size: see ssd.data.sources.clean.SizeMismatch


IrVideoConfig = video.VideoLayout  # IR format 2: video files or frame folders with box lists or MOT gt.txt


@dataclass(frozen=True)
class IrConfig:
    """IR videos, converted to one sample per clip of consecutive frames of one video."""

    enabled: bool = True  # false: write an empty output with a manifest that says so
    # which reader: frames (VOC-layout frame sequences), video (videos + box lists or gt.txt), coco (COCO-VID
    # JSON), vid (ImageNet VID), otb, lasot, antiuav (tracking sequences); each reads its own sub-section
    source: Literal["frames", "video", "coco", "vid", "otb", "lasot", "antiuav"] = "frames"
    root: InputPath = "data/sample/ir/frames"  # the dataset, in the layout `source` reads (dvc.yaml's deps read this key)
    out: str = "data/shards/ir"  # output directory; must match the stage's outs in dvc.yaml
    classes: Names | None = None  # null: discovered from the data (sorted); else others are skipped
    clip_length: PositiveInt = 8  # frames per clip (LSTM-SSD unroll length)
    clip_stride: int | None = None  # frames between clip starts; null = clip_length (no overlap but the tail)
    max_gap: Count = 0  # missing frame numbers tolerated inside a video; a bigger jump starts a new segment
    shard_size: PositiveInt = 100  # max clips per shard
    shard_max_bytes: PositiveInt = 256 * 1024 * 1024  # max bytes per shard
    frames: IrFramesConfig = field(default_factory=IrFramesConfig)  # format 1 reader
    video: IrVideoConfig = field(default_factory=IrVideoConfig)  # format 2 reader
    coco: CocoLayout = field(default_factory=CocoLayout)  # COCO JSON whose images have video_id, frame_id
    vid: VidLayout = field(default_factory=VidLayout)  # ImageNet VID: Annotations/VID, Data/VID
    otb: OtbLayout = field(default_factory=OtbLayout)  # <seq>/img/ + groundtruth_rect.txt
    lasot: LasotLayout = field(default_factory=LasotLayout)  # <cat>/<cat>-<n>/img/ + groundtruth.txt + flags
    antiuav: AntiUavLayout = field(default_factory=AntiUavLayout)  # <seq>/IR_label.json + IR.mp4 or images

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
    try:
        check_split_names(splits)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


# ---------------------------------------------------------------------------
# Sources: params section -> listing of records


FRAME_SOURCES: dict[str, Callable[[VocConfig, Report], Listing]] = {
    "voc": lambda c, r: voc.read(Path(c.root), c, r),
    "coco": lambda c, r: coco.read(Path(c.root), c.coco, r),
    "yolo": lambda c, r: yolo.read(Path(c.root), c.yolo, r),
}
CLIP_SOURCES: dict[str, Callable[[IrConfig, Report], Listing]] = {
    "frames": lambda c, r: voc_frames.read(Path(c.root), c.frames, r),
    "video": lambda c, r: video.read(Path(c.root), c.video, r),
    "coco": lambda c, r: coco.read_videos(Path(c.root), c.coco, r),
    "vid": lambda c, r: vid.read(Path(c.root), c.vid, r),
    "otb": lambda c, r: sot.read(Path(c.root), c.otb, r, "otb"),
    "lasot": lambda c, r: sot.read(Path(c.root), c.lasot, r, "lasot"),
    "antiuav": lambda c, r: sot.read(Path(c.root), c.antiuav, r, "antiuav"),
}


def convert_voc(cfg: PrepareConfig, report: Report, out: Path) -> dict:
    """The frame dataset -> frame shards in ``out``; returns the manifest (without the report)."""
    v = cfg.voc
    listing = FRAME_SOURCES[v.format](v, report)
    opts = WriteOptions(v.shard_size, v.shard_max_bytes, cfg.workers, cfg.max_pixels, v.size_mismatch)
    return write_frames(listing, classes(v.classes, listing), out, opts, report)


def convert_ir(cfg: PrepareConfig, report: Report, out: Path) -> dict:
    """The clip dataset -> clip shards in ``out``; returns the manifest (without the report)."""
    ir = cfg.ir
    listing = CLIP_SOURCES[ir.source](ir, report)
    opts = WriteOptions(
        ir.shard_size, ir.shard_max_bytes, cfg.workers, cfg.max_pixels, ir.frames.size_mismatch, ir.video.jpeg_quality
    )
    clips = ClipOptions(ir.clip_length, ir.stride, ir.max_gap, listing.frame_split)
    if listing.frame_split > 0:
        log.warning(
            "ir: frame_split %g: the last %.0f%% of every video's frames go to val. Neighbouring frames are "
            "near-duplicates, so validation figures will be optimistic; split whole videos when there are several",
            listing.frame_split, 100 * listing.frame_split,
        )
    return write_clips(listing, classes(ir.classes, listing), out, opts, clips, report)


# ---------------------------------------------------------------------------
# Stage


def _check_written(name: str, manifest: dict, report: Report, allow_empty: bool) -> None:
    """No sample, no class or not one box, or an empty configured split, is a :class:`StageError`
    saying what was found (a dataset of background images only is a wrong class list or format)."""
    source = manifest.get("source", name)
    counts = {s: v["samples"] for s, v in manifest["splits"].items()}
    if sum(counts.values()) == 0:
        raise StageError(f"{source}: no {name} sample was written; {report.hint(source)}")
    if not manifest.get("classes"):
        raise StageError(f"{source}: no {name} class was found (an empty class list); {report.hint(source)}")
    if sum(v.get("boxes", 0) for v in manifest["splits"].values()) == 0:
        raise StageError(f"{source}: {sum(counts.values())} {name} samples but not one box; {report.hint(source)}")
    empty = [s for s, n in counts.items() if n == 0]
    if empty and not allow_empty:
        sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
        raise StageError(
            f"{source}: {name} split {empty[0]!r} would be empty (samples: {sizes}); {report.hint(source)}; "
            "fix the split lists, or set prepare.allow_empty_splits: true if an empty split is intended"
        )


def _build(name: str, out: Path, convert: Callable[[Path], dict], report: Report, allow_empty: bool = False) -> dict:
    """Run ``convert`` into a temporary directory; write the manifest last; rename into place.

    Nothing replaces the previous output unless every configured split got samples (or
    ``allow_empty``) and at least one sample was written.
    """
    for stale in out.parent.glob(f"{TMP_PREFIX}{out.name}.*") if out.parent.is_dir() else ():
        log.info("%s: removing %s left by an interrupted run", name, stale)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out) as tmp:
        manifest = convert(tmp)
        _check_written(name, manifest, report, allow_empty)
        manifest.update(report.manifest())
        write_json(tmp / "manifest.json", manifest)
    splits = ", ".join(f"{s} {v['samples']}" for s, v in manifest["splits"].items())
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    log.info("%s: wrote %s in %d shards to %s (%s)", name, splits, n_shards, out, manifest["kind"])
    log.info("%s: %s", name, report.summary())
    return manifest


def _disabled(name: str, out: Path, kind: str) -> None:
    """A disabled dataset still gets its output under DVC (DVC expects it): a manifest that says
    so. Run directly, an existing output is left as it is: ``--set ir.enabled=false`` converts the
    VOC data, it doesn't empty the IR shards."""
    if out.exists() and not under_dvc():
        log.info("%s: disabled in params; %s kept as it is", name, out)
        return
    with atomic_dir(out) as tmp:
        write_json(tmp / "manifest.json", {"kind": kind, "disabled": True, "classes": [], "splits": {}, "skipped": []})
    log.info("%s: disabled in params; wrote an empty %s", name, out)


def _check_outputs(cfg: PrepareConfig) -> None:
    """Each ``out`` is replaced whole: it must hold no dataset root nor the other output, and an
    existing one must be a prepared dataset (its manifest), never a folder of the user's."""
    sections = {"voc": cfg.voc, "ir": cfg.ir}
    roots = {f"prepare.{n}.root": s.root for n, s in sections.items() if s.enabled}
    for name, section in sections.items():
        other = "ir" if name == "voc" else "voc"
        check_replaceable(section.out, f"prepare.{name}.out", lambda p: (p / "manifest.json").is_file(),
                          "a prepared dataset (it has no manifest.json)",
                          {**roots, f"prepare.{other}.out": sections[other].out})


@contextmanager
def _alone_in(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (the outputs' parent) while the block runs; a
    :class:`StageError` when another prepare holds it. Two prepares into one folder removed each
    other's temporary folder as one left by an interrupted run. The lock is on the folder itself,
    so no lock file is left beside the outputs; a file system without locks runs unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lock = try_lock(fd)
    except BlockingIOError:
        os.close(fd)
        raise StageError(f"{folder}: another prepare is writing its datasets here; wait for it to end") from None
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def prepare(cfg: PrepareConfig, strict: bool = False) -> dict[str, dict]:
    """Convert the configured datasets; returns their manifests by name (``voc``, ``ir``)."""
    check_writable(Path(cfg.voc.out).parent, Path(cfg.ir.out).parent)
    parents = sorted({Path(cfg.voc.out).parent.resolve(), Path(cfg.ir.out).parent.resolve()})  # one lock a folder
    with ExitStack() as held:
        for folder in parents:
            held.enter_context(_alone_in(folder))
        return _prepare(cfg, strict)


def _prepare(cfg: PrepareConfig, strict: bool) -> dict[str, dict]:
    _check_outputs(cfg)
    manifests = {}
    for name, section, convert, kind in (("voc", cfg.voc, convert_voc, "frames"), ("ir", cfg.ir, convert_ir, "clips")):
        out = Path(section.out)
        if not section.enabled:
            _disabled(name, out, kind)
            continue
        report = Report(strict)
        manifests[name] = _build(
            name, out, lambda tmp: convert(cfg, report, tmp), report, cfg.allow_empty_splits  # noqa: B023 - called at once
        )
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input (exit code 2)")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(PrepareConfig, load_params(args.params), "prepare", args.overrides, args.params)
        check_tracked(cfg, "prepare")
        log.info("prepare: %s", json.dumps(to_dict(cfg)))
        prepare(cfg, strict=args.strict)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
