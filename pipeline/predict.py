"""Run a detector on photos or a video: annotated copies and a COCO-format detections file.

Usage::

    python -m pipeline.predict MODEL INPUT... --out OUT [--json DETECTIONS.json] [--score-threshold 0.3]
                               [--nms-threshold 0.45] [--batch-size 8] [--device auto|cpu|cuda]

``INPUT`` is any mix of image files, folders of images (any names and sizes; the
files with an image suffix, in name order, not recursing), and glob patterns
(quoted, so the shell leaves them: ``'photos/**/*.jpg'``); or one video file.
``MODEL`` is any model file (:mod:`ssd.model_file`).

What is written follows ``OUT``:

- a folder (a name without a suffix, or an existing folder): one annotated copy of
  every image, under the image's own name;
- an image name (``.jpg``, ``.png``, ...), for a single input image: its annotated copy;
- a video name (``.mp4``, ``.avi``, ...), for a video input: the annotated video, as
  ``pipeline.detect`` writes it (with its per-frame ``.jsonl`` beside it).

Anything else is refused before work starts, as is an output that would overwrite an
input. ``--json`` (default ``OUT/detections.json`` for a folder, ``OUT`` with the
suffix ``.json`` otherwise) gets the detections in the COCO results format: a list of
``{"image_id", "file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score"}``
with boxes in the image's pixels, ``image_id`` the image's position in the input order
(from 1) or the video's frame number, ``category_id`` the model's 1-based label.

Each image is resized to the model's input as the evaluation does and run in batches
of ``--batch-size``; a temporal model (LSTM-SSD) sees each photo as the first frame of
a video. A file that can't be read or decoded (or whose JPEG data is corrupt) is
skipped and counted, with the reason in the log.

Exit codes: 0 done (some files may have been skipped: the log says which); 2 with a
one-line message when no input could be read, an input is missing, or ``OUT`` doesn't
fit the input.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from pipeline.detect import VIDEO_SUFFIXES, _check_outputs, _device, preprocess
from pipeline.stage import StageError, check_writable, run
from ssd import atomic

log = logging.getLogger("pipeline.predict")

#: Files of a folder (or glob) that are taken as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Names of JPEG files OpenCV doesn't write by that name: their annotated copies are encoded as .jpg.
_JPEG_ALIASES = (".jfif",)


@dataclass
class Inputs:
    images: list[Path]
    video: Path | None = None


def collect_inputs(specs: list[str]) -> Inputs:
    """The images (or the one video) the ``INPUT`` arguments name; :class:`StageError` for a missing one."""
    images: list[Path] = []
    videos: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            found = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise StageError(f"{path}: no images in the folder (expected {', '.join(IMAGE_SUFFIXES)} files)")
            others = [p.suffix.lower() or "(none)" for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
            if others:  # said, not dropped silently (a .heic from a phone, say)
                log.warning("%s: %d files are not taken (not %s: %s)", path, len(others), "/".join(IMAGE_SUFFIXES),
                            ", ".join(sorted(set(others))))
            images += found
        elif path.is_file():
            (videos if path.suffix.lower() in VIDEO_SUFFIXES else images).append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise StageError(f"{spec}: no image matches the pattern")
            images += found
        else:
            raise StageError(f"{spec}: no such image, video or folder")
    if videos and (len(videos) > 1 or images):
        raise StageError(f"{videos[0]}: a video is predicted on its own; give one video, or images")
    return Inputs(images=list(dict.fromkeys(images)), video=videos[0] if videos else None)


def plan_outputs(inputs: Inputs, out: Path, json_path: str | None) -> tuple[str, Path]:
    """``(kind, json file)``: kind is "folder", "image" or "video"; :class:`StageError` when OUT doesn't fit."""
    suffix = out.suffix.lower()
    if inputs.video is not None:
        if suffix not in VIDEO_SUFFIXES:
            raise StageError(f"--out {out}: a video in, an annotated video out; name it {', '.join(VIDEO_SUFFIXES)}")
        kind = "video"
    elif suffix in IMAGE_SUFFIXES:
        if len(inputs.images) != 1:
            raise StageError(f"--out {out}: one image name for {len(inputs.images)} images; give a folder")
        kind = "image"
    elif suffix in VIDEO_SUFFIXES:
        raise StageError(f"--out {out}: images in, annotated images out; give a folder (or an image name for one image)")
    elif suffix and not out.is_dir():
        raise StageError(f"--out {out}: not a folder, image or video name")
    else:
        kind = "folder"
    default = out / "detections.json" if kind == "folder" else out.with_suffix(".json")
    return kind, Path(json_path) if json_path else default


def _image_targets(inputs: Inputs, kind: str, out: Path) -> list[Path]:
    """Where each image's annotated copy goes; two inputs of one name, or an input overwritten: refused."""
    if kind == "image":
        return [out]
    seen: dict[str, Path] = {}
    for p in inputs.images:
        if p.name in seen:
            raise StageError(f"{p}: the same name as {seen[p.name]}; their annotated copies would collide in {out}")
        seen[p.name] = p
    targets = [out / p.name for p in inputs.images]
    for source, target in zip(inputs.images, targets):
        if not cv2.haveImageWriter("x" + encoded_as(target)):  # found out after the images before it were written
            raise StageError(f"{source}: OpenCV can't write a {target.suffix} image for its annotated copy; convert it "
                             "to .jpg or .png first")
        if target.exists() and target.resolve() == source.resolve():
            raise StageError(f"--out {out}: is the folder of the input {source}; choose another folder")
    return targets


def encoded_as(target: Path) -> str:
    """The suffix the annotated copy is encoded by (OpenCV's encoder is chosen by suffix)."""
    suffix = target.suffix.lower()
    return ".jpg" if suffix in _JPEG_ALIASES else (suffix or ".png")


def _read(path: Path) -> tuple[np.ndarray | None, str | None]:
    """``(RGB image, None)`` or ``(None, why it can't be used)``."""
    from ssd.data.images import read_image_file

    bgr, why = read_image_file(path)
    return (None, why) if bgr is None else (cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None)


def _batches(paths: list[Path], size: int) -> Iterator[list[tuple[int, Path, np.ndarray]]]:
    """Readable images in batches of ``size``: ``(index in the input order, path, RGB)``; skips are logged."""
    batch = []
    for index, path in enumerate(paths):
        rgb, why = _read(path)
        if rgb is None:
            log.warning("skipped %s: %s", path, why)
            continue
        batch.append((index, path, rgb))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def coco_records(image_id: int, file_name: str, boxes: list, scores: list, labels: list,
                 names: list[str]) -> list[dict]:
    """One image's detections in the COCO results format (``bbox`` ``[x, y, w, h]`` in pixels);
    ``boxes`` xyxy pixels, ``names`` the class name of each detection."""
    return [
        {"image_id": image_id, "file_name": file_name, "category_id": int(k), "category_name": name,
         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(s, 5)}
        for (x1, y1, x2, y2), s, k, name in zip(boxes, scores, labels, names)
    ]


def _names(class_names: list[str], labels: list[int]) -> list[str]:
    return [class_names[k - 1] if 1 <= k <= len(class_names) else str(k) for k in labels]


def predict_images(args: argparse.Namespace, inputs: Inputs, targets: list[Path], json_path: Path) -> int:
    from tqdm.auto import tqdm

    from ssd.draw import draw_detections
    from ssd.model_file import load_model_file
    from ssd.postprocess import PostprocessConfig, PostProcessor

    device = _device(args.device)
    model, info = load_model_file(args.model, map_location=device)
    class_names = list(info.get("class_names", []))
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=args.score_threshold,
                                                         nms_threshold=args.nms_threshold)).to(device)
    records: list[dict] = []
    done = 0
    with tqdm(total=len(inputs.images), unit="image", desc="predict", dynamic_ncols=True) as progress, \
            torch.inference_mode():
        for batch in _batches(inputs.images, args.batch_size):
            images = torch.cat([preprocess(rgb, model.image_size, device) for _, _, rgb in batch])
            found = post(*model(images)[:2])  # LSTM-SSD also returns its state (from a fresh one)
            for (index, path, rgb), det in zip(batch, found):
                h, w = rgb.shape[:2]
                boxes = (det["boxes"].cpu() * torch.tensor([w, h, w, h])).tolist()
                scores, labels = det["scores"].cpu().tolist(), det["labels"].cpu().tolist()
                records += coco_records(index + 1, str(path), boxes, scores, labels, _names(class_names, labels))
                drawn = draw_detections(rgb, boxes, labels, scores, class_names, score_threshold=0.0)
                target = targets[index]
                ok, encoded = cv2.imencode(encoded_as(target), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise StageError(f"{target}: OpenCV can't encode a {target.suffix} image")
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_bytes(target, encoded.tobytes())
                done += 1
            progress.update(len(batch))
        progress.update(len(inputs.images) - progress.n)
    skipped = len(inputs.images) - done
    if done == 0:
        raise StageError(f"none of the {len(inputs.images)} images could be read (the log above says why)")
    atomic.write_json(json_path, records)
    where = targets[0] if len(targets) == 1 else targets[0].parent
    log.info("wrote %d annotated images to %s and %d detections to %s%s", done, where, len(records), json_path,
             f"; skipped {skipped} unreadable files" if skipped else "")
    return 0


def predict_video(args: argparse.Namespace, video: Path, json_path: Path) -> int:
    from pipeline.detect import detect

    jsonl = Path(args.out).with_suffix(".jsonl")
    detect(argparse.Namespace(model=args.model, input=str(video), out=args.out, jsonl=str(jsonl),
                              score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                              device=args.device, fourcc="mp4v", fps=None))
    records: list[dict] = []
    for line in jsonl.read_text().splitlines():
        frame = json.loads(line)
        records += coco_records(frame["frame"], video.name, frame["boxes"], frame["scores"], frame["labels"],
                                frame["class_names"])
    atomic.write_json(json_path, records)
    log.info("wrote %d detections to %s", len(records), json_path)
    return 0


def predict(args: argparse.Namespace) -> int:
    if not 0.0 <= args.score_threshold < 1.0:
        raise StageError(f"--score-threshold {args.score_threshold}: expected a value in [0, 1)")
    if not 0.0 <= args.nms_threshold <= 1.0:
        raise StageError(f"--nms-threshold {args.nms_threshold}: expected a value in [0, 1]")
    if args.batch_size < 1:
        raise StageError(f"--batch-size {args.batch_size}: expected at least 1")
    inputs = collect_inputs(args.input)
    out = Path(args.out)
    kind, json_path = plan_outputs(inputs, out, args.json)
    sources = {"model file": Path(args.model)}
    if inputs.video is not None:
        sources["input"] = inputs.video
        # The annotated video, its per-frame .jsonl beside it and --json must be three files.
        _check_outputs({"--out": out, "the per-frame file": out.with_suffix(".jsonl"), "--json": json_path}, sources)
        return predict_video(args, inputs.video, json_path)
    targets = _image_targets(inputs, kind, out)
    sources.update({f"image {p}": p for p in inputs.images})
    _check_outputs({"--json": json_path} if kind == "folder" else {"--out": out, "--json": json_path}, sources)
    check_writable(out if kind == "folder" else out.parent)
    return predict_images(args, inputs, targets, json_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a detector on images or a video: annotated copies and "
                                                 "COCO-format detections.")
    parser.add_argument("model", help="model file (models/*.pt)")
    parser.add_argument("input", nargs="+", help="images, folders of images, glob patterns, or one video")
    parser.add_argument("--out", required=True, help="a folder (images), an image name (one image) or a video name")
    parser.add_argument("--json", default=None, help="detections file (default: OUT/detections.json or OUT.json)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="detections scored above this are kept and drawn (default: %(default)s)")
    parser.add_argument("--nms-threshold", type=float, default=0.45,
                        help="IoU above which NMS suppresses a box of the same class (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default: %(default)s)")
    args = parser.parse_args(argv)
    return run(lambda: predict(args))


if __name__ == "__main__":
    raise SystemExit(main())
