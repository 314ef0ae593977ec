"""Detect objects in a video: an annotated video and the detections as JSON lines.

Usage::

    python -m pipeline.detect MODEL INPUT --out OUT.mp4 [--jsonl OUT.jsonl] [--score-threshold 0.3]
                              [--nms-threshold 0.45] [--device auto|cpu|cuda] [--fourcc mp4v] [--fps FPS]

``MODEL`` is any model file (:mod:`ssd.model_file`; pruned models too). ``INPUT`` is a
video file OpenCV can decode (mp4, avi, ...) or a folder of frames (jpg, jpeg, png,
bmp, tif, webp), played in the order of the number in their file names (the last run of digits:
``frame_9.png`` before ``frame_10.png``).

Each frame is converted to RGB, resized to the model's input size as the evaluation
does (:mod:`ssd.data.transforms`: antialiased, to float in [0, 1]), run through the
model and :class:`ssd.postprocess.PostProcessor` (detections scored above
``--score-threshold``), and the boxes are scaled back to the frame's pixels. A
temporal model (LSTM-SSD) carries its state from frame to frame, from a fresh state
on the first.

Outputs, each written under a temporary name in its directory and renamed when
complete:

- ``OUT``: the frames with the detections drawn (:mod:`ssd.draw`: outline, class name and
  score) and the detector's speed in frames per second (pre-processing, model and
  post-processing, smoothed) in the top-left corner; frame rate of the input video
  (``--fps`` for a folder, default 25), codec ``--fourcc`` (``mp4v`` for .mp4; ``MJPG``
  or ``XVID`` for .avi);
- ``--jsonl`` (default ``OUT`` with the suffix ``.jsonl``): one line per frame,
  ``{"frame": number, "boxes": [[x1, y1, x2, y2], ...] (pixels, edge coordinates),
  "scores": [...], "labels": [...] (1-based), "class_names": [...]}``, plus ``"file"``
  for a folder of frames. Frame numbers are the project's everywhere
  (docs/data-format.md): a video file's frames are numbered from 1, as ``prepare`` numbers
  them in the shards and MOT's ``gt.txt`` does; a folder's frames carry the number in
  their file names.

Exit codes: 0 done; 2 with a one-line message for a missing or unreadable model file,
video or frame, an empty frames folder, a codec OpenCV can't open, an ``OUT`` that is not a
video name (``.mp4``, ``.avi``, ``.mkv``, ``.mov``, ``.m4v``) or that is one of the inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import Tensor

from ssd import atomic
from ssd.data.sources.decode import cut_short
from pipeline.stage import StageError, check_writable, run

log = logging.getLogger("pipeline.detect")

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # predict's images too
#: Containers the annotated video may be written as (OpenCV's writers); any other --out name
#: would get a video stream under a name that promises something else.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v")
#: Frame rate of the output video when the input is a folder of frames.
DEFAULT_FOLDER_FPS = 25.0
#: Weight of the newest frame in the smoothed speed shown on the video.
SPEED_SMOOTHING = 0.1

_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def _natural(name: str) -> list:
    """``name`` split into text and numbers (compared as numbers): the order a person reads."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


@dataclass
class Frame:
    number: int
    """The frame number: from 1 in a video file, the number in the file name in a folder."""
    image: np.ndarray
    """uint8 ``[H, W, 3]`` BGR, as OpenCV decodes it."""
    file: str | None = None
    """The file's name, for a folder of frames."""


class VideoSource:
    """The frames of a video file; opening checks that the first frame decodes."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise StageError(f"{path}: video not found")
        self.path = path
        with _native_stderr_captured():  # FFmpeg's own complaints; our message says it in one line
            self._capture = cv2.VideoCapture(str(path))
            ok, first = self._capture.read() if self._capture.isOpened() else (False, None)
        if not ok or first is None:
            self._capture.release()
            raise StageError(f"{path}: not a readable video (OpenCV can't decode a frame of it)")
        self._first = first
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and fps > 0 else DEFAULT_FOLDER_FPS
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.length = count if count > 0 else None  # a container's count can be missing or wrong
        self.size = (first.shape[1], first.shape[0])

    def __iter__(self) -> Iterator[Frame]:
        try:
            image, number = self._first, 1
            while image is not None:
                yield Frame(number, image)
                ok, image = self._capture.read()
                image = image if ok else None
                number += 1
        finally:
            self._capture.release()
        read = number - 1
        if self.length and cut_short(self.length, read):
            raise StageError(f"{self.path}: the video ended after {read} of the {self.length} frames its container "
                             "lists (truncated or damaged); nothing was written")


class FolderSource:
    """The frames of a folder, in the order of the last number in their file names."""

    def __init__(self, path: Path, fps: float | None):
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
        if not files:
            raise StageError(f"{path}: no frames in the folder (expected {', '.join(FRAME_SUFFIXES)} files)")
        numbered = []
        for p in files:
            match = _LAST_NUMBER.search(p.stem)
            if match is None:
                raise StageError(f"{p}: no frame number in the file name (frames are ordered by it)")
            numbered.append((int(match.group(1)), p.name, p))
        numbered.sort()
        for (n, _, first), (m, _, second) in zip(numbered, numbered[1:]):
            if n == m:  # two videos' frames in one folder (a VOC JPEGImages folder): their order is unknown
                raise StageError(f"{path}: {first.name} and {second.name} both have frame number {n}; "
                                 "give a folder of one video's frames")
            if _natural(second.stem) < _natural(first.stem):  # cam_12-01-00 after cam_12-00-59
                raise StageError(f"{path}: by the last number in their names {first.name} comes before "
                                 f"{second.name}, which is not the names' own order (timestamps?); number the "
                                 "frames with one running number")
        self.numbers = [n for n, _, _ in numbered]
        self.files = [p for _, _, p in numbered]
        self.fps = float(fps) if fps else DEFAULT_FOLDER_FPS
        self.length = len(self.files)
        self._first = _read_image(self.files[0])
        self.size = (self._first.shape[1], self._first.shape[0])

    def __iter__(self) -> Iterator[Frame]:
        for index, p in enumerate(self.files):
            image = self._first if index == 0 else _read_image(p)
            if (image.shape[1], image.shape[0]) != self.size:
                raise StageError(
                    f"{p}: frame is {image.shape[1]}x{image.shape[0]}, the first frame {self.size[0]}x{self.size[1]}"
                )
            yield Frame(self.numbers[index], image, p.name)


def _read_image(path: Path) -> np.ndarray:
    from ssd.data.images import read_image_file

    image, why = read_image_file(path)
    if image is None:
        raise StageError(f"{path}: {why}")
    return image


def open_source(path: Path, fps: float | None) -> VideoSource | FolderSource:
    if path.is_dir():
        return FolderSource(path, fps)
    if not path.exists():
        raise StageError(f"{path}: no such video file or frames folder")
    source = VideoSource(path)
    if fps:
        source.fps = float(fps)
    return source


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Send what native code (OpenCV, FFmpeg) writes to file descriptor 2 into a list instead."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def atomic_video_writer(path: Path, fourcc: str, fps: float, size: tuple[int, int]) -> Iterator[cv2.VideoWriter]:
    """A ``cv2.VideoWriter`` on a temporary sibling of ``path`` (same suffix, so OpenCV picks the
    same container), renamed over ``path`` when the block succeeds and removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{atomic.TMP_PREFIX}{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    writer = None
    try:
        with _native_stderr_captured() as native:
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*fourcc), fps, size)
            opened = writer.isOpened()
        if not opened:
            other = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
            hint = f"try --fourcc {other}" if fourcc != other else "try another --fourcc or an .avi output with MJPG"
            raise StageError(
                f"{path}: OpenCV can't open a video writer with fourcc {fourcc!r} for a {path.suffix or 'suffix-less'} "
                f"file (codec missing from this OpenCV build?); {hint}"
            )
        for line in "".join(native).splitlines():  # e.g. "fallback to use tag 'mp4v'": worth knowing
            if line.strip():
                log.warning("OpenCV: %s", line.strip())
        yield writer
        writer.release()
        writer = None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def preprocess(rgb: np.ndarray, size: int, device: torch.device) -> Tensor:
    """uint8 ``[H, W, 3]`` RGB -> float ``Tensor[1, 3, size, size]`` in [0, 1], resized as the
    evaluation transform resizes (antialiased bilinear on the uint8 image)."""
    from torchvision.transforms.v2 import functional as F

    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    image = F.resize(image, [size, size], antialias=True)
    return image.to(device=device, dtype=torch.float32).div_(255)


def _speed_overlay(rgb: np.ndarray, fps: float) -> None:
    """Write ``"12.3 fps"`` on a dark tag in the top-left corner of ``rgb`` (in place)."""
    text = f"{fps:.1f} fps"
    scale = max(0.3, min(rgb.shape[:2]) / 600)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    rgb[: h + base + 4, : w + 4] = (0, 0, 0)
    cv2.putText(rgb, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _check_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Outputs must differ from each other and from every input (an input folder's frames
    included), and their folders must be writable."""
    def same(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))

    def frame_of(path: Path, folder: Path) -> bool:
        return folder.is_dir() and same(path.parent, folder) and path.suffix.lower() in FRAME_SUFFIXES

    flags = list(outputs)
    for i, flag in enumerate(flags):
        path = outputs[flag]
        if path.is_dir():  # found out only when the finished file was renamed into place
            raise StageError(f"{flag} {path}: is a folder; give a file name")
        for other in flags[:i]:
            if same(path, outputs[other]):
                raise StageError(f"{flag} {path}: the same file as {other}")
        for what, source in inputs.items():
            if same(path, source) or (frame_of(path, source) and path.exists()):
                raise StageError(f"{flag} {path}: is the input {what} (or a file in it); choose another name")
        check_writable(path.parent)


def detect(args: argparse.Namespace) -> int:
    from ssd.draw import draw_detections
    from ssd.model_file import load_model_file
    from ssd.postprocess import PostprocessConfig, PostProcessor

    if len(args.fourcc) != 4:
        raise StageError(f"--fourcc {args.fourcc!r}: a codec code has 4 characters (e.g. mp4v, MJPG)")
    if not 0.0 <= args.score_threshold < 1.0:
        raise StageError(f"--score-threshold {args.score_threshold}: expected a value in [0, 1)")
    if not 0.0 <= args.nms_threshold <= 1.0:
        raise StageError(f"--nms-threshold {args.nms_threshold}: expected a value in [0, 1]")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise StageError(f"--fps {args.fps:g}: expected a positive frame rate")
    out = Path(args.out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise StageError(f"--out {out}: detect writes an annotated video; name it {', '.join(VIDEO_SUFFIXES)}")
    jsonl = Path(args.jsonl) if args.jsonl else out.with_suffix(".jsonl")
    _check_outputs({"--out": out, "--jsonl": jsonl}, {"input": Path(args.input), "model file": Path(args.model)})
    device = _device(args.device)
    source = open_source(Path(args.input), args.fps)
    model, info = load_model_file(args.model, map_location=device)  # a bad file: InputError, one line from stage.run
    class_names = list(info.get("class_names", []))
    size = int(model.image_size)
    temporal = bool(getattr(model, "is_temporal", False))
    postprocess = PostProcessor(
        model.priors, PostprocessConfig(score_threshold=args.score_threshold, nms_threshold=args.nms_threshold)
    ).to(device)
    width, height = source.size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)

    from tqdm.auto import tqdm

    frames = detections = 0
    busy = 0.0  # seconds spent in pre-processing, model and post-processing
    smoothed: float | None = None  # seconds per frame, as shown on the video
    with atomic_video_writer(out, args.fourcc, source.fps, source.size) as writer, \
            atomic.atomic_open(jsonl, "w") as lines, \
            tqdm(total=source.length, unit="frame", desc=out.name, dynamic_ncols=True) as progress, \
            torch.inference_mode():
        state = None  # LSTM-SSD: a fresh video starts from the zero state
        for frame in source:
            rgb = cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB)
            t0 = time.perf_counter()
            images = preprocess(rgb, size, device)
            if temporal:
                logits, deltas, state = model(images, state=state)
            else:
                logits, deltas = model(images)
            found = postprocess(logits, deltas)[0]
            boxes = (found["boxes"].cpu() * scale).tolist()  # normalised -> the frame's pixels
            scores = found["scores"].cpu().tolist()
            labels = found["labels"].cpu().tolist()
            elapsed = time.perf_counter() - t0
            busy += elapsed
            smoothed = elapsed if smoothed is None else (1 - SPEED_SMOOTHING) * smoothed + SPEED_SMOOTHING * elapsed

            drawn = draw_detections(rgb, boxes, labels, scores, class_names, score_threshold=0.0)
            _speed_overlay(drawn, 1.0 / max(smoothed, 1e-9))
            writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            record = {
                "frame": frame.number,
                **({"file": frame.file} if frame.file is not None else {}),
                "boxes": [[round(v, 2) for v in box] for box in boxes],
                "scores": [round(s, 5) for s in scores],
                "labels": labels,
                "class_names": [class_names[k - 1] if 1 <= k <= len(class_names) else str(k) for k in labels],
            }
            lines.write(json.dumps(record) + "\n")
            frames += 1
            detections += len(labels)
            progress.update(1)
    log.info(
        "wrote %s (%d frames, %dx%d, %.3g fps) and %s (%d detections); detector speed %.1f frames/s on %s",
        out, frames, width, height, source.fps, jsonl, detections, frames / max(busy, 1e-9), device,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect objects in a video; write an annotated video and JSON lines.")
    parser.add_argument("model", help="model file (models/*.pt)")
    parser.add_argument("input", help="video file (mp4, avi, ...) or folder of numbered frames")
    parser.add_argument("--out", required=True, help="annotated video to write (e.g. out.mp4)")
    parser.add_argument("--jsonl", default=None, help="detections, one JSON line per frame (default: OUT.jsonl)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="detections scored above this are kept and drawn (default: %(default)s)")
    parser.add_argument("--nms-threshold", type=float, default=0.45,
                        help="IoU above which NMS suppresses a box of the same class (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default: %(default)s)")
    parser.add_argument("--fourcc", default="mp4v", help="output codec (default: %(default)s; MJPG for .avi)")
    parser.add_argument("--fps", type=float, default=None,
                        help=f"output frame rate (default: the video's; {DEFAULT_FOLDER_FPS:g} for a folder)")
    args = parser.parse_args(argv)
    return run(lambda: detect(args))


if __name__ == "__main__":
    raise SystemExit(main())
