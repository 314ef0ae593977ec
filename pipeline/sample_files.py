"""The sample's files: VOC images and annotations, the IR videos in both layouts, their indexes.

The writers :mod:`pipeline.sample` runs in its worker processes, one image or video each
(:func:`write_voc_image`, :func:`write_ir_video`), then once for the index files
(:func:`write_voc_index`, :func:`write_ir_index`). Which video container this OpenCV writes
is probed first (:func:`probe_video`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import cv2
import numpy as np

from pipeline.stage import StageError
from ssd.atomic import write_json, write_text
from ssd.data.synthetic import IR_CLASSES, VOC_CLASSES, IrSpec, ObjectAnnotation, VocSpec, ir_video, voc_image

if TYPE_CHECKING:
    from pipeline.sample import SampleConfig

# Video containers to try, best first: (fourcc, file extension).
VIDEO_FORMATS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


@dataclass(frozen=True)
class Job:
    """What every work item needs (sent to the worker processes)."""

    cfg: SampleConfig
    voc_dir: Path  # temporary directories, renamed when everything is written
    ir_dir: Path
    video: tuple[str, str] = ("mp4v", ".mp4")  # (fourcc, extension) that this OpenCV can write


def probe_video(directory: Path) -> tuple[str, str]:
    """The first of :data:`VIDEO_FORMATS` that this OpenCV writes and reads back frame for frame."""
    frames = np.zeros((3, 32, 32), np.uint8)
    for fourcc, ext in VIDEO_FORMATS:
        path = Path(directory) / f".probe{ext}"
        try:
            if _write_video(path, frames, fourcc, 10) and _count_frames(path) == len(frames):
                return fourcc, ext
        finally:
            path.unlink(missing_ok=True)
    raise StageError(f"OpenCV {cv2.__version__} cannot write a video as any of {VIDEO_FORMATS}")


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


# --------------------------------------------------------------------------- VOC


def write_voc_image(job: Job, index: int, split: str) -> dict:
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


def write_voc_index(voc_dir: Path, results: list[dict]) -> None:
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


def write_ir_video(job: Job, index: int, split: str) -> dict:
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


def write_ir_index(job: Job, results: list[dict]) -> None:
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


def _ir_readme(job: Job, results: list[dict]) -> str:
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
