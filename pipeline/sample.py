"""Generate the embedded default data sets (a fresh clone has no VOC and no internet).

Usage::

    python -m pipeline.sample [--params params.yaml] [--set voc.train_images=20 ...]

Reads the ``sample`` section of ``params.yaml`` and writes, from its seed alone
(byte-identical on every run, whatever the number of worker processes):

``<voc.out_dir>`` (default ``data/sample/voc``), a Pascal VOC layout::

    Annotations/<id>.xml   JPEGImages/<id>.jpg   ImageSets/Main/{train,val}.txt   classes.txt

``<ir.out_dir>`` (default ``data/sample/ir``), the same infrared videos twice::

    README.txt
    frames/   VOC layout, one grey JPEG per frame, <id> = <video>_<frame> (frame from 1,
              not zero-padded: sort numerically), plus classes.txt and degraded.txt
    video/    videos/<video>.mp4 (or .avi), annotations/<video>.txt (one object:
              "x y w h" per frame, "0 0 0 0" when absent) or annotations/<video>/gt.txt
              (MOT: frame,id,x,y,w,h,conf,class,visibility), splits.json, meta.json

Each output directory is built under a temporary name and renamed when
complete, so a killed or failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.pool
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from ssd.atomic import atomic_dir, write_json, write_text
from pipeline.config import ConfigError, load_config, load_params
from pipeline.stage import StageError, arg_parser, run
from ssd.data.synthetic import (
    IR_CLASSES,
    VOC_CLASSES,
    IrSpec,
    ObjectAnnotation,
    VocSpec,
    ir_video,
    video_splits,
    voc_image,
)

log = logging.getLogger("pipeline.sample")

# Video containers to try, best first: (fourcc, file extension).
_VIDEO_FORMATS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


@dataclass(frozen=True)
class VocParams:
    """The VOC-style image set."""

    out_dir: str = "data/sample/voc"  # output directory (dvc.yaml's outs read the same key)
    train_images: int = 2000  # enough for a from-scratch SSDLite at 160x160 to reach mAP@0.5 >= 0.6
    val_images: int = 300  # ids follow the training ones
    min_side: int = 128  # image width and height are drawn from [min_side, max_side]
    max_side: int = 224  # small: training resizes to 160x160 anyway
    max_objects: int = 6  # a non-empty image has 1..max_objects objects
    empty_fraction: float = 0.03  # share of background-only images (no objects)
    jpeg_quality: int = 90  # about what VOC's own JPEGs use

    def __post_init__(self) -> None:
        _check(self.train_images >= 0 and self.val_images >= 0, "sample.voc: image counts must be >= 0")
        _check(16 <= self.min_side <= self.max_side, "sample.voc: need 16 <= min_side <= max_side")
        _check(self.max_objects >= 1, "sample.voc.max_objects: must be >= 1")
        _check(0.0 <= self.empty_fraction <= 1.0, "sample.voc.empty_fraction: must be in [0, 1]")
        _check(1 <= self.jpeg_quality <= 100, "sample.voc.jpeg_quality: must be in [1, 100]")


@dataclass(frozen=True)
class IrParams:
    """The infrared video set."""

    out_dir: str = "data/sample/ir"  # output directory (dvc.yaml's outs read the same key)
    videos: int = 36  # a few dozen short videos
    frames: int = 48  # frames per video: several clips of 8-16 frames each
    width: int = 160  # frame size; a small thermal sensor
    height: int = 120
    max_objects: int = 3  # video i holds 1 + i % max_objects objects
    degraded_fraction: float = 0.33  # share of degraded frames in every video (noise, occlusion, ...)
    val_fraction: float = 0.25  # share of whole videos in val
    fps: int = 10  # frame rate written into the video files
    jpeg_quality: int = 95  # frames as grey JPEG

    def __post_init__(self) -> None:
        _check(self.videos >= 0, "sample.ir.videos: must be >= 0")
        _check(self.frames >= 2, "sample.ir.frames: must be >= 2")
        _check(
            self.width >= 32 and self.height >= 32 and self.width % 2 == 0 and self.height % 2 == 0,
            "sample.ir: width and height must be even and >= 32 (video encoders need even sizes)",
        )
        _check(1 <= self.max_objects <= 100, "sample.ir.max_objects: must be in [1, 100]")
        _check(0.0 <= self.degraded_fraction <= 0.9, "sample.ir.degraded_fraction: must be in [0, 0.9]")
        _check(0.0 <= self.val_fraction <= 1.0, "sample.ir.val_fraction: must be in [0, 1]")
        _check(self.fps >= 1, "sample.ir.fps: must be >= 1")
        _check(1 <= self.jpeg_quality <= 100, "sample.ir.jpeg_quality: must be in [1, 100]")


@dataclass(frozen=True)
class SampleConfig:
    """The ``sample`` section of ``params.yaml``."""

    seed: int = 0  # every image and video is a function of (seed, data set, index)
    workers: int = 2  # processes (the machine this was tuned on has 2 cores); output does not depend on it
    voc: VocParams = field(default_factory=VocParams)
    ir: IrParams = field(default_factory=IrParams)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "sample.workers: must be >= 1")
        voc, ir = Path(self.voc.out_dir).resolve(), Path(self.ir.out_dir).resolve()
        _check(
            voc != ir and voc not in ir.parents and ir not in voc.parents,
            "sample: voc.out_dir and ir.out_dir must be separate directories",
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class _Job:
    """What every work item needs (sent to the worker processes)."""

    cfg: SampleConfig
    voc_dir: Path  # temporary directories, renamed when everything is written
    ir_dir: Path
    video: tuple[str, str] = ("mp4v", ".mp4")  # (fourcc, extension) that this OpenCV can write


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__).parse_args(argv)

    def body() -> None:
        cfg = load_config(SampleConfig, load_params(args.params), "sample", args.overrides, args.params)
        write_sample(cfg)

    return run(body)


def write_sample(cfg: SampleConfig) -> None:
    """Generate both data sets and write them to ``cfg.voc.out_dir`` and ``cfg.ir.out_dir``."""
    start = time.monotonic()
    n_train, n_val = cfg.voc.train_images, cfg.voc.val_images
    splits = video_splits(cfg.seed, cfg.ir.videos, cfg.ir.val_fraction)
    # Videos first: they are the longest items, so both workers end at about the same time.
    tasks = [("ir", i, s) for i, s in enumerate(splits)]
    tasks += [("voc", i, "train" if i < n_train else "val") for i in range(n_train + n_val)]

    with atomic_dir(cfg.voc.out_dir) as voc_tmp, atomic_dir(cfg.ir.out_dir) as ir_tmp:
        for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc_tmp / d).mkdir(parents=True)
            (ir_tmp / "frames" / d).mkdir(parents=True)
        (ir_tmp / "video" / "videos").mkdir(parents=True)
        (ir_tmp / "video" / "annotations").mkdir(parents=True)
        job = _Job(cfg, voc_tmp, ir_tmp)
        voc_results: dict[int, dict] = {}
        ir_results: dict[int, dict] = {}
        with _workers(cfg.workers) as pool:
            # Probe the video writer in a worker: the parent then never uses OpenCV before forking.
            probe = pool.apply(_probe_video, (ir_tmp,)) if pool else _probe_video(ir_tmp)
            job = replace(job, video=probe)
            work = functools.partial(_work, job)
            results: Iterable = pool.imap_unordered(work, tasks, chunksize=4) if pool else map(work, tasks)
            progress = tqdm(results, total=len(tasks), desc="sample", unit="item", mininterval=0.5)
            for kind, index, result in progress:
                (ir_results if kind == "ir" else voc_results)[index] = result

        _write_voc_index(voc_tmp, [voc_results[i] for i in range(n_train + n_val)])
        _write_ir_index(job, [ir_results[i] for i in range(len(splits))])

    voc_objects = sum(r["objects"] for r in voc_results.values())
    log.info(
        "wrote %d images (%d train, %d val; %d objects, %d difficult, %d empty images) to %s",
        n_train + n_val,
        n_train,
        n_val,
        voc_objects,
        sum(r["difficult"] for r in voc_results.values()),
        sum(r["objects"] == 0 for r in voc_results.values()),
        cfg.voc.out_dir,
    )
    frames = sum(len(r["degradation"]) for r in ir_results.values())
    degraded = sum(sum(bool(k) for k in r["degradation"]) for r in ir_results.values())
    log.info(
        "wrote %d videos (%d train, %d val; %d frames, %.1f%% degraded; %s) to %s",
        len(splits),
        splits.count("train"),
        splits.count("val"),
        frames,
        100.0 * degraded / max(frames, 1),
        job.video[1],
        cfg.ir.out_dir,
    )
    log.info("done in %.1f s", time.monotonic() - start)


@contextlib.contextmanager
def _workers(n: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of ``n`` worker processes, or ``None`` (work in this process) when ``n == 1``."""
    if n == 1:
        yield None
        return
    # fork: the workers need not import anything again; spawn where there is no fork.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(n, initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _probe_video(directory: Path) -> tuple[str, str]:
    """The first of :data:`_VIDEO_FORMATS` that this OpenCV writes and reads back frame for frame."""
    frames = np.zeros((3, 32, 32), np.uint8)
    for fourcc, ext in _VIDEO_FORMATS:
        path = Path(directory) / f".probe{ext}"
        try:
            if _write_video(path, frames, fourcc, 10) and _count_frames(path) == len(frames):
                return fourcc, ext
        finally:
            path.unlink(missing_ok=True)
    raise StageError(f"OpenCV {cv2.__version__} cannot write a video as any of {_VIDEO_FORMATS}")


def _write_video(path: Path, frames: np.ndarray, fourcc: str, fps: int) -> bool:
    """Write grey ``frames`` (uint8 [T, H, W]); False when the writer cannot be opened."""
    h, w = frames.shape[1:]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h), False)
    if not writer.isOpened():
        return False
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return True


def _count_frames(path: Path) -> int:
    """Frames that cv2.VideoCapture decodes from ``path`` (decoded, not the header's claim)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.isOpened():
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
    finally:
        cap.release()
    return n


def _work(job: _Job, task: tuple[str, int, str]) -> tuple[str, int, dict]:
    kind, index, split = task
    if kind == "voc":
        return kind, index, _write_voc_image(job, index, split)
    return kind, index, _write_ir_video(job, index, split)


# --------------------------------------------------------------------------- VOC


def _write_voc_image(job: _Job, index: int, split: str) -> dict:
    p = job.cfg.voc
    spec = VocSpec(
        min_side=p.min_side, max_side=p.max_side, max_objects=p.max_objects, empty_fraction=p.empty_fraction
    )
    sample = voc_image(job.cfg.seed, index, spec)
    image_id = f"{index:06d}"
    h, w = sample.image.shape[:2]
    (job.voc_dir / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(sample.image, p.jpeg_quality))
    xml = _voc_xml("synthetic-voc", f"{image_id}.jpg", w, h, 3, sample.objects)
    (job.voc_dir / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    return {
        "id": image_id,
        "split": split,
        "objects": len(sample.objects),
        "difficult": sum(o.difficult for o in sample.objects),
    }


def _write_voc_index(voc_dir: Path, results: list[dict]) -> None:
    for split in ("train", "val"):
        ids = [r["id"] for r in results if r["split"] == split]
        write_text(voc_dir / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    write_text(voc_dir / "classes.txt", "".join(f"{c}\n" for c in VOC_CLASSES))


def _voc_xml(
    folder: str, filename: str, width: int, height: int, depth: int, objects: Iterable[ObjectAnnotation]
) -> str:
    """A Pascal VOC annotation; boxes as VOC's 1-based inclusive integer corners."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "ssd-pipeline synthetic"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", depth)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = o.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(o.truncated))
        ET.SubElement(node, "difficult").text = str(int(o.difficult))
        if o.track_id is not None:
            ET.SubElement(node, "track_id").text = str(o.track_id)
        box = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = (int(round(v)) for v in o.box)  # pixel edges already: exact
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise StageError(f"cv2.imencode could not encode a {image.shape} image as JPEG")
    return buf.tobytes()


# --------------------------------------------------------------------------- IR


def _write_ir_video(job: _Job, index: int, split: str) -> dict:
    p = job.cfg.ir
    spec = IrSpec(
        width=p.width,
        height=p.height,
        frames=p.frames,
        max_objects=p.max_objects,
        degraded_fraction=p.degraded_fraction,
    )
    video = ir_video(job.cfg.seed, index, spec)
    name = video.name
    frames_dir = job.ir_dir / "frames"
    for t, (frame, objects) in enumerate(zip(video.frames, video.objects), 1):
        frame_id = f"{name}_{t}"
        (frames_dir / "JPEGImages" / f"{frame_id}.jpg").write_bytes(_jpeg(frame, p.jpeg_quality))
        xml = _voc_xml("synthetic-ir", f"{frame_id}.jpg", p.width, p.height, 1, objects)
        (frames_dir / "Annotations" / f"{frame_id}.xml").write_text(xml, encoding="utf-8")

    fourcc, ext = job.video
    video_dir = job.ir_dir / "video"
    path = video_dir / "videos" / f"{name}{ext}"
    if not _write_video(path, video.frames, fourcc, p.fps):
        raise StageError(f"{path}: cv2.VideoWriter ({fourcc}) did not open")
    decoded = _count_frames(path)
    if decoded != len(video.frames):
        raise StageError(f"{path}: wrote {len(video.frames)} frames, cv2.VideoCapture reads back {decoded}")

    tracks = {o.track_id: o.name for objects in video.objects for o in objects}
    n_tracks = 1 + index % p.max_objects  # tracks that never enter the frame have no boxes at all
    if n_tracks == 1:
        annotation = f"annotations/{name}.txt"
        lines = []
        for objects in video.objects:
            if objects:
                x1, y1, x2, y2 = objects[0].box
                lines.append(f"{x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}\n")
            else:
                lines.append("0 0 0 0\n")
        (video_dir / annotation).write_text("".join(lines), encoding="utf-8")
    else:
        annotation = f"annotations/{name}/gt.txt"
        lines = []
        for t, objects in enumerate(video.objects, 1):
            for o in sorted(objects, key=lambda o: o.track_id):
                x1, y1, x2, y2 = o.box
                box = f"{x1:.1f},{y1:.1f},{x2 - x1:.1f},{y2 - y1:.1f}"
                cls = IR_CLASSES.index(o.name) + 1
                lines.append(f"{t},{o.track_id},{box},1,{cls},{o.visibility:.3f}\n")
        (video_dir / annotation).parent.mkdir()
        (video_dir / annotation).write_text("".join(lines), encoding="utf-8")
    return {
        "name": name,
        "split": split,
        "frames": len(video.frames),
        "file": f"videos/{name}{ext}",
        "annotations": annotation,
        "format": "xywh" if n_tracks == 1 else "mot",
        "tracks": {str(k): tracks[k] for k in sorted(tracks)},
        "degradation": list(video.degradation),
    }


def _write_ir_index(job: _Job, results: list[dict]) -> None:
    p = job.cfg.ir
    frames_dir, video_dir = job.ir_dir / "frames", job.ir_dir / "video"
    for split in ("train", "val"):
        ids = [f"{r['name']}_{t}" for r in results if r["split"] == split for t in range(1, r["frames"] + 1)]
        write_text(frames_dir / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    write_text(frames_dir / "classes.txt", "".join(f"{c}\n" for c in IR_CLASSES))
    degraded = [
        f"{r['name']}_{t} {kind}\n" for r in results for t, kind in enumerate(r["degradation"], 1) if kind
    ]
    write_text(frames_dir / "degraded.txt", "".join(degraded))

    write_json(
        video_dir / "splits.json",
        {split: [r["name"] for r in results if r["split"] == split] for split in ("train", "val")},
    )
    meta: dict[str, Any] = {
        "classes": list(IR_CLASSES),
        "fps": p.fps,
        "width": p.width,
        "height": p.height,
        "videos": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in results},
    }
    write_json(video_dir / "meta.json", meta)
    write_text(job.ir_dir / "README.txt", _ir_readme(job, results))


def _ir_readme(job: _Job, results: list[dict]) -> str:
    p = job.cfg.ir
    ext = job.video[1]
    return f"""Synthetic infrared videos (generated by `python -m pipeline.sample`, seed {job.cfg.seed}).

{len(results)} grey-scale videos of {p.frames} frames, {p.width}x{p.height} pixels, {p.fps} fps.
Classes (class ids 1..3 in MOT files): {", ".join(f"{i}={c}" for i, c in enumerate(IR_CLASSES, 1))}.
About {p.degraded_fraction:.0%} of the frames of every video are degraded (heavy noise, an object
behind a cold occluder, washed-out contrast, dark / garbage / frozen frames); objects keep
their true boxes in them. Whole videos are assigned to train or val.

The same videos and boxes are stored in two layouts.

frames/  Pascal VOC layout, one image per frame
  JPEGImages/<video>_<n>.jpg    grey JPEG; n = frame number from 1, NOT zero-padded
                                (sort numerically: <video>_2 comes before <video>_10)
  Annotations/<video>_<n>.xml   VOC XML: 1-based inclusive integer corners, depth 1,
                                difficult always 0, plus <track_id> per object
  ImageSets/Main/train.txt, val.txt   frame ids, video by video, frames in order
  classes.txt                   class names in label order
  degraded.txt                  "<frame id> <kind>" for every degraded frame
  Video names contain '_' and '-': split a frame id at its LAST '_'.

video/   video files with box lists
  videos/<video>{ext}             the frames, {job.video[0]} codec (lossy)
  annotations/<video>.txt       videos with one object: one line per frame,
                                "x y w h" (pixels, top-left corner and size), or
                                "0 0 0 0" when the object is out of view
  annotations/<video>/gt.txt    videos with several objects, MOT style:
                                frame,id,x,y,w,h,conf,class,visibility
                                (frame from 1, conf always 1, visibility in [0, 1])
  splits.json                   {{"train": [videos], "val": [videos]}}
  meta.json                     classes, fps, size, and per video: split, frames, file,
                                annotations, format (xywh | mot), tracks {{id: class}},
                                degradation (per frame, "" when clean)
"""


if __name__ == "__main__":
    raise SystemExit(main())
