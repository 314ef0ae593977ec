"""Tiny datasets in each published format, generated from one ground truth, for round-trip tests.

Every box has integer pixel corners, so that a source that converts it right gives it
back exactly (the tests allow 1e-6 px).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

W, H = 48, 36
CLASSES = ["car", "person"]


@dataclass(frozen=True)
class Box:
    name: str
    corners: tuple[int, int, int, int]  # x1, y1, x2, y2 pixels
    difficult: bool = False
    track: int | None = None


@dataclass(frozen=True)
class Truth:
    id: str  # the file stem
    split: str
    image: bytes  # JPEG
    boxes: tuple[Box, ...]
    video: str = ""
    number: int = 0


def jpeg(seed: int, w: int = W, h: int = H) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def _boxes(rng: np.random.Generator, n: int, tracks: bool = False, classes=CLASSES, flags=True) -> tuple[Box, ...]:
    out = []
    for k in range(n):
        x1, y1 = int(rng.integers(0, W - 10)), int(rng.integers(0, H - 10))
        x2, y2 = int(rng.integers(x1 + 2, W + 1)), int(rng.integers(y1 + 2, H + 1))
        name = classes[int(rng.integers(0, len(classes)))]
        out.append(Box(name, (x1, y1, x2, y2), flags and bool(rng.random() < 0.2), k if tracks else None))
    return tuple(out)


def frames(per_split: dict[str, int], seed: int = 0) -> list[Truth]:
    """Images split as asked, 0-3 boxes each (the first image of each split has none)."""
    rng = np.random.default_rng(seed)
    out = []
    for split, n in per_split.items():
        for i in range(n):
            k = len(out)
            out.append(Truth(f"{split}_{i:04d}", split, jpeg(k), _boxes(rng, 0 if i == 0 else int(rng.integers(1, 4)))))
    return out


def videos(lengths: dict[str, tuple[str, int]], seed: int = 0, first: int = 0, classes=CLASSES,
           most: int = 2, flags: bool = True) -> list[Truth]:
    """Frames of videos ``name -> (split, length)``, numbered from ``first``, with track ids.

    ``most``: objects per frame at most (1: a single-object tracking sequence)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, (split, n) in lengths.items():
        for i in range(n):
            number = first + i
            boxes = _boxes(rng, int(rng.integers(0, most + 1)), True, classes, flags)
            out.append(Truth(f"{name}_{number:06d}", split, jpeg(len(out)), boxes, name, number))
    return out


def write_coco(root: Path, truth: list[Truth], with_videos: bool = False) -> None:
    """``annotations/instances_<split>.json`` + ``images/<split>/<id>.jpg``; crowd boxes for difficult."""
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    for split in dict.fromkeys(t.split for t in truth):
        images, anns, vids = [], [], {}
        for t in (t for t in truth if t.split == split):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "images" / split / f"{t.id}.jpg").write_bytes(t.image)
            image = {"id": len(images) + 1, "file_name": f"{t.id}.jpg", "width": W, "height": H}
            if with_videos:
                vids.setdefault(t.video, len(vids) + 1)
                image.update(video_id=vids[t.video], frame_id=t.number)
            images.append(image)
            for b in t.boxes:
                x1, y1, x2, y2 = b.corners
                a = {"id": len(anns) + 1, "image_id": image["id"], "category_id": CLASSES.index(b.name) + 1,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(b.difficult)}
                if b.track is not None:
                    a["instance_id"] = b.track
                anns.append(a)
        data = {"images": images, "annotations": anns, "categories": cats}
        if with_videos:
            data["videos"] = [{"id": i, "name": n} for n, i in vids.items()]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def write_yolo(root: Path, truth: list[Truth]) -> None:
    """``data.yaml`` + ``images/<split>/<id>.jpg`` + ``labels/<split>/<id>.txt`` (none for box-less images)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n" + "".join(
        f"  {i}: {c}\n" for i, c in enumerate(CLASSES)))
    for t in truth:
        for d in ("images", "labels"):
            (root / d / t.split).mkdir(parents=True, exist_ok=True)
        (root / "images" / t.split / f"{t.id}.jpg").write_bytes(t.image)
        if not t.boxes:
            continue
        lines = []
        for b in t.boxes:
            x1, y1, x2, y2 = b.corners
            cx, cy, w, h = (x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H
            lines.append(f"{CLASSES.index(b.name)} {cx!r} {cy!r} {w!r} {h!r}\n")
        (root / "labels" / t.split / f"{t.id}.txt").write_text("".join(lines))


def _xml(t: Truth, synsets: dict[str, str]) -> str:
    parts = [f"<annotation><filename>{t.number:06d}</filename><size><width>{W}</width><height>{H}</height></size>"]
    for b in t.boxes:
        x1, y1, x2, y2 = b.corners
        box = f"<xmax>{x2}</xmax><xmin>{x1}</xmin><ymax>{y2}</ymax><ymin>{y1}</ymin>"
        parts.append(f"<object><trackid>{b.track}</trackid><name>{synsets[b.name]}</name><bndbox>{box}</bndbox>"
                     "<occluded>0</occluded><generated>0</generated></object>")
    return "".join(parts) + "</annotation>"


def write_vid(root: Path, truth: list[Truth], synsets: dict[str, str]) -> None:
    """ImageNet VID: train snippets under a chunk folder, val snippets directly; <frame:06d>.xml/.JPEG."""
    for t in truth:
        rel = Path(t.split) / ("ILSVRC2015_VID_train_0000" if t.split == "train" else "") / t.video
        for d in ("Annotations/VID", "Data/VID"):
            (root / d / rel).mkdir(parents=True, exist_ok=True)
        (root / "Annotations/VID" / rel / f"{t.number:06d}.xml").write_text(_xml(t, synsets))
        (root / "Data/VID" / rel / f"{t.number:06d}.JPEG").write_bytes(t.image)


def _xywh(b: Box) -> list[int]:
    x1, y1, x2, y2 = b.corners
    return [x1, y1, x2 - x1, y2 - y1]


def _splits_file(root: Path, truth: list[Truth]) -> None:
    splits: dict[str, list[str]] = {}
    for t in truth:
        if t.video not in splits.setdefault(t.split, []):
            splits[t.split].append(t.video)
    (root / "splits.json").write_text(json.dumps(splits))


def write_otb(root: Path, truth: list[Truth], sep: str = ",") -> None:
    """OTB: <seq>/img/<number:04d>.jpg + groundtruth_rect.txt (a frame without the target: NaN)."""
    for video in dict.fromkeys(t.video for t in truth):
        (root / video / "img").mkdir(parents=True, exist_ok=True)
        lines = []
        for t in (t for t in truth if t.video == video):
            (root / video / "img" / f"{t.number:04d}.jpg").write_bytes(t.image)
            lines.append(sep.join(str(v) for v in _xywh(t.boxes[0])) if t.boxes else sep.join(["NaN"] * 4))
        (root / video / "groundtruth_rect.txt").write_text("\n".join(lines) + "\n")
    _splits_file(root, truth)


def write_lasot(root: Path, truth: list[Truth]) -> None:
    """LaSOT: <cat>/<video>/img/<number:08d>.jpg; a frame without the target keeps a stale box in
    groundtruth.txt and is flagged, alternately, in full_occlusion.txt or out_of_view.txt."""
    for video in dict.fromkeys(t.video for t in truth):
        seq = root / video.rsplit("-", 1)[0] / video
        (seq / "img").mkdir(parents=True, exist_ok=True)
        lines, occluded, out = [], [], []
        for i, t in enumerate(t for t in truth if t.video == video):
            (seq / "img" / f"{t.number:08d}.jpg").write_bytes(t.image)
            lines.append(",".join(str(v) for v in (_xywh(t.boxes[0]) if t.boxes else [3, 4, 10, 10])))
            occluded.append("1" if not t.boxes and i % 2 == 0 else "0")
            out.append("1" if not t.boxes and i % 2 == 1 else "0")
        (seq / "groundtruth.txt").write_text("\n".join(lines) + "\n")
        (seq / "full_occlusion.txt").write_text(",".join(occluded) + "\n")
        (seq / "out_of_view.txt").write_text(",".join(out) + "\n")
    _splits_file(root, truth)


def write_antiuav(root: Path, truth: list[Truth], as_video: bool = False) -> None:
    """Anti-UAV: <seq>/IR_label.json (exist, gt_rect) with <seq>/<number:06d>.jpg, or <seq>/IR.mp4."""
    for video in dict.fromkeys(t.video for t in truth):
        (root / video).mkdir(parents=True, exist_ok=True)
        frames = [t for t in truth if t.video == video]
        label = {"exist": [int(bool(t.boxes)) for t in frames], "gt_rect": [_xywh(t.boxes[0]) if t.boxes else [] for t in frames]}
        (root / video / "IR_label.json").write_text(json.dumps(label))
        if as_video:
            writer = cv2.VideoWriter(str(root / video / "IR.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (W, H))
            for t in frames:
                writer.write(cv2.imdecode(np.frombuffer(t.image, np.uint8), cv2.IMREAD_COLOR))
            writer.release()
        else:
            for t in frames:
                (root / video / f"{t.number:06d}.jpg").write_bytes(t.image)
    _splits_file(root, truth)
