"""Reading images and videos for the shards, in worker processes.

Everything here runs in a pool worker: top-level functions with plain, picklable
arguments that return the bytes to store or the reason there are none (never raise
for bad input). :func:`ordered_map` runs them with a bounded number of results in
flight, so memory does not grow with the size of the dataset.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2

from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.data import images
from ssd.data.sources.report import (
    CORRUPT_IMAGE,
    FRAME_WITHOUT_NUMBER,
    IMAGE_TOO_LARGE,
    UNREADABLE_FILE,
    UNREADABLE_VIDEO,
)
from ssd.data.workers import opencv_one_thread

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # in order of preference when one id has several
VIDEO_SUFFIXES = (".mp4", ".avi")

_PNG_COLOUR = {0: "grey-scale", 2: "RGB", 3: "palette", 4: "grey-scale+alpha", 6: "RGBA"}


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a shard, or the reason it is not."""

    data: bytes = b""  # bytes to store
    ext: str = ""  # "jpg" or "png"
    width: int = 0
    height: int = 0
    conversion: str | None = None  # what was converted, if anything
    error: tuple[str, str] | None = None  # (reason, detail)


def load_image(path: str, jpeg_quality: int | None = None, max_pixels: int | None = None) -> LoadedImage:
    """Read, validate and if needed convert one image file.

    JPEG files are kept byte for byte (they are decoded only to check them
    and to read their real size). ``jpeg_quality=None`` (frame shards): an
    8-bit RGB PNG is kept as it is; any other PNG (grey-scale, palette,
    RGBA/grey+alpha - alpha dropped, 16-bit - scaled to 8) or other decodable
    format is converted to an 8-bit RGB PNG. With ``jpeg_quality`` (clip
    shards, whose members are all JPEG) everything but a JPEG is encoded as a
    JPEG of that quality. Sizes are those of the pixel data as stored
    (EXIF orientation ignored, as loaders must ignore it too). An image of more than
    ``max_pixels`` pixels (read from its header, before decoding) and a JPEG whose decoder
    reports damaged data are errors.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return LoadedImage(error=(UNREADABLE_FILE, e.strerror or str(e)))
    return image_from_bytes(data, jpeg_quality, max_pixels)


def image_from_bytes(data: bytes, jpeg_quality: int | None, max_pixels: int | None = None) -> LoadedImage:
    """:func:`load_image` for bytes already read."""
    if not data:
        return LoadedImage(error=(CORRUPT_IMAGE, "empty file"))
    size = images.header_size(data) if max_pixels is not None else None
    if size is not None and size[0] * size[1] > max_pixels:
        return LoadedImage(error=(IMAGE_TOO_LARGE, f"{size[0]}x{size[1]} is over prepare.max_pixels ({max_pixels})"))
    try:
        pixels, damage = images.decode_checked(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        return LoadedImage(error=(CORRUPT_IMAGE, str(e).strip().splitlines()[-1]))
    if pixels is None:
        return LoadedImage(error=(CORRUPT_IMAGE, f"cannot be decoded ({len(data)} bytes)"))
    if damage:
        return LoadedImage(error=(CORRUPT_IMAGE, f"the decoder reports damaged data: {damage}"))
    height, width = pixels.shape[:2]
    if data[:3] == b"\xff\xd8\xff":
        return LoadedImage(data, "jpg", width, height)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25:
        depth, colour = data[24], data[25]
        if jpeg_quality is None and depth == 8 and colour == 2:
            return LoadedImage(data, "png", width, height)
        source = f"PNG {_PNG_COLOUR.get(colour, f'colour type {colour}')} {depth}-bit"
    else:
        source = "non-JPEG/PNG image"
    if jpeg_quality is None:
        ok, buf = cv2.imencode(".png", pixels)
        target = "RGB PNG"
    else:
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        target = f"RGB JPEG (quality {jpeg_quality})"
    if not ok:  # pragma: no cover - encoding a decoded 8-bit image does not fail
        return LoadedImage(error=(CORRUPT_IMAGE, "could not be re-encoded"))
    ext = "png" if jpeg_quality is None else "jpg"
    return LoadedImage(buf.tobytes(), ext, width, height, conversion=f"{source} -> {target}")


@dataclass(frozen=True)
class DecodedVideo:
    """Frames of a video decoded whole: ``(frame number, id, image, file)`` in order, plus per-frame problems."""

    frames: tuple[tuple[int, str, LoadedImage, str], ...] = ()
    numbers: tuple[int, ...] = ()  # every frame number the source has, readable or not
    problems: tuple[tuple[str, str, str], ...] = ()  # (file, reason, detail) of frames left out
    error: tuple[str, str] | None = None  # the whole video is unusable


def decode_video(kind: str, path: str, name: str, quality: int, max_pixels: int) -> DecodedVideo:
    """A video file (frames numbered 1..N) or a frame folder (numbers from file names)."""
    if kind == "folder":
        return _decode_folder(Path(path), quality, max_pixels)
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            return DecodedVideo(error=(UNREADABLE_VIDEO, "cannot be opened"))
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if width * height > max_pixels:
            return DecodedVideo(error=(IMAGE_TOO_LARGE, f"frames of {width}x{height} are over prepare.max_pixels"))
        frames = []
        while True:
            ok, pixels = capture.read()
            if not ok:
                break
            ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            height, width = pixels.shape[:2]
            number = len(frames) + 1
            image = LoadedImage(buf.tobytes(), "jpg", width, height)
            frames.append((number, f"{name}_{number:06d}", image, path))
    finally:
        capture.release()
    if not frames:
        return DecodedVideo(error=(UNREADABLE_VIDEO, "no frame could be decoded"))
    if cut_short(listed, len(frames)):  # its annotations would be matched to the frames that remain
        return DecodedVideo(error=(UNREADABLE_VIDEO, f"ended after {len(frames)} of the {listed} frames its "
                                                     "container lists (truncated or damaged)"))
    return DecodedVideo(tuple(frames), tuple(n for n, _, _, _ in frames))


def cut_short(listed: int, read: int) -> bool:
    """Whether a video that decoded ``read`` frames, of the ``listed`` its container lists (0:
    unknown), was cut short. A file cut short (a copy interrupted, a recording that crashed)
    decodes up to the cut and then reads as ended, while its container still lists every frame;
    counts that FFmpeg estimates from the duration (Matroska, WebM) can be off by a frame or two,
    hence the margin."""
    return listed > 0 and listed - read > max(2, listed // 100)


def _decode_folder(folder: Path, quality: int, max_pixels: int) -> DecodedVideo:
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: seq.natural_key(p.name),
    )
    problems = []
    numbered: dict[int, Path] = {}
    for p in files:
        number = seq.trailing_number(p.stem)
        if number is None:
            problems.append((str(p), FRAME_WITHOUT_NUMBER, ""))
        elif number in numbered:
            problems.append((str(p), ann.DUPLICATE_FRAME, f"frame {number} is also {numbered[number].name}"))
        else:
            numbered[number] = p
    if not numbered:
        return DecodedVideo(problems=tuple(problems), error=(UNREADABLE_VIDEO, "no numbered frame files"))
    frames = []
    for number in sorted(numbered):
        p = numbered[number]
        image = load_image(str(p), quality, max_pixels)
        if image.error:
            problems.append((str(p), *image.error))
        else:
            frames.append((number, p.stem, image, str(p)))
    return DecodedVideo(tuple(frames), tuple(sorted(numbered)), tuple(problems))


def run_task(task: tuple) -> LoadedImage | DecodedVideo:
    """Worker entry: ``("image", path, quality, max_pixels)`` or ``("video", kind, path, name, quality, max_pixels)``.

    Looked up by name at call time, so that a test can replace :func:`load_image`.
    """
    if task[0] == "image":
        return load_image(*task[1:])
    return decode_video(*task[1:])


def _init_worker() -> None:
    # OpenCV runs one thread per worker: set in the parent around the fork (ordered_map); a call
    # of cv2.setNumThreads here could wait for ever (ssd.data.workers says why).
    # Ctrl-C reaches the whole process group. Only the main process acts on it: it stops
    # the pool (Pool.terminate). A worker killed by it could die holding the pool's task
    # queue lock, and terminate() would then wait for that lock forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def ordered_map(workers: int, window: int = 0) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered, lazy ``map`` over a pool of ``workers`` processes (plain ``map`` for 1).

    At most ``window`` (default ``4 * workers``) results are in flight or waiting: unlike
    ``Pool.imap``, whose results pile up when the consumer is slower than the workers, a
    conversion's memory does not grow with the number of images or videos.
    """
    if workers <= 1:
        yield map
        return
    window = window or 4 * workers
    # fork: quick to start; OpenCV's pool stopped in the parent first (ssd.data.workers), which
    # also leaves each worker OpenCV at one thread.
    ctx = multiprocessing.get_context("fork")
    with opencv_one_thread(), ctx.Pool(workers, initializer=_init_worker) as pool:  # exit terminates them
        yield _bounded(pool, window)


def _bounded(pool: Any, window: int) -> Callable[[Callable, Iterable], Iterator]:
    """``map`` over ``pool``, in order, with at most ``window`` results in flight or waiting."""

    def bounded(fn: Callable, items: Iterable) -> Iterator:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    return bounded
