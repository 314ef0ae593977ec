"""Samples of WebDataset shards (format: ``docs/data-format.md``): reading and decoding.

Three kinds of sample:

- ``"frames"``: frame shards, one image per sample -> ``Batch.images`` ``Tensor[B, 3, S, S]``;
- ``"clips"``: clip shards, T frames per sample -> ``Batch.images`` ``Tensor[B, T, 3, S, S]``;
- ``"frames_from_clips"``: clip shards, every frame of every clip a frame sample, so a
  per-frame baseline trains on exactly the frames the LSTM sees.

Decoding: OpenCV (BGR -> RGB, grey and RGBA -> 3 channels, EXIF orientation ignored
because the annotations are in the coordinates of the image as stored); boxes from
pixels to ``(x1, y1, x2, y2)`` normalised to [0, 1]; labels + 1 (0 is the background);
difficult as bool. Images come out as float32 in [0, 1] RGB (the model normalises).

:func:`read_raw_samples` yields a shard's samples as bytes (:class:`RawSample`);
:func:`decode_sample` and :func:`decode_sequence` decode and transform them into
:class:`Sample`, which :func:`collate` stacks into a :class:`Batch`. The loaders of
:mod:`ssd.data.train_streams` and :mod:`ssd.data.eval_index` are built on these.
"""

from __future__ import annotations

import json
import re
import signal
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import Tensor
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssd.data.images import imdecode
from ssd.data.transforms import DetectionTransform
from ssd.errors import InputError

Kind = Literal["frames", "clips", "frames_from_clips"]
_KINDS = ("frames", "clips", "frames_from_clips")

_IMAGE_EXTS = ("jpg", "jpeg", "png")
# Clip frame members: WebDataset splits "<key>.000.jpg" into key and extension "000.jpg".
_CLIP_FRAME = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")


@dataclass
class Batch:
    """A collated batch.

    ``images``: float32 ``Tensor[B, 3, S, S]`` (clips: ``Tensor[B, T, 3, S, S]``), RGB in [0, 1].
    ``targets``: one dict per sample (clips: one list of T dicts per sample), each with
    ``boxes`` float32 ``Tensor[N, 4]`` (x1, y1, x2, y2) normalised to [0, 1], ``labels``
    int64 ``Tensor[N]`` (1-based, 0 is the background) and ``difficult`` bool ``Tensor[N]``;
    evaluation batches also ``pixels``, float64 ``Tensor[N, 4]``: the stored edge-pixel boxes
    of the original image, exactly (what the metrics compare with).
    ``keys``: sample keys (a frame taken from a clip: ``<clip key>/<index in clip, 3 digits>``).
    ``sizes``: original ``(width, height)`` of each sample's image(s).
    ``video``, ``frames``: for clip shards only (``"clips"`` and ``"frames_from_clips"``):
    the video name and the frame numbers (T per clip, one for a frame), else None.
    ``runs``: sequence mode only (``train_loader(sequence_clips=...)``): per clip, the number
    of the run it belongs to (unique within a rank and epoch). The clips of a run are
    consecutive clips of one video, augmented alike, in consecutive batches of one stream;
    a state may carry from a clip to the next clip *of the same run* only.
    """

    images: Tensor
    targets: list[Any]
    keys: list[str]
    sizes: list[tuple[int, int]]
    video: list[str] | None = None
    frames: list[list[int]] | None = None
    runs: list[int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the images and all target tensors on ``device``."""

        def move(t: Any) -> Any:
            if isinstance(t, Tensor):
                return t.to(device, non_blocking=non_blocking)
            if isinstance(t, dict):
                return {k: move(v) for k, v in t.items()}
            if isinstance(t, list):
                return [move(v) for v in t]
            return t

        return Batch(move(self.images), move(self.targets), self.keys, self.sizes, self.video, self.frames, self.runs)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        images = self.images.pin_memory()
        return Batch(images, self.targets, self.keys, self.sizes, self.video, self.frames, self.runs)


@dataclass
class Sample:
    """One decoded and transformed sample, before :func:`collate`.

    ``image``: float32 ``Tensor[3, S, S]`` (clips: ``Tensor[T, 3, S, S]``); ``target``: a dict as in
    :class:`Batch` (clips: a list of T dicts); ``size``: original ``(width, height)``.
    """

    image: Tensor
    target: Any
    key: str
    size: tuple[int, int]
    video: str | None = None
    frames: list[int] | None = None
    run: int | None = None  # sequence mode: the run the clip belongs to


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack the images; keep the variable-length targets as a list (0 boxes is fine)."""
    if not samples:
        raise ValueError("collate: no samples")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) > 1:
        detail = ", ".join(f"{s.key}: {tuple(s.image.shape)}" for s in samples)
        raise InputError(f"collate: samples of different shapes ({detail}); clips of one dataset must have one length")
    has_video = samples[0].video is not None
    return Batch(
        images=torch.stack([s.image for s in samples]),
        targets=[s.target for s in samples],
        keys=[s.key for s in samples],
        sizes=[s.size for s in samples],
        video=[s.video for s in samples] if has_video else None,  # type: ignore[misc]
        frames=[s.frames for s in samples] if has_video else None,  # type: ignore[misc]
        runs=[int(s.run) for s in samples] if samples[0].run is not None else None,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------
# Raw samples: the shard bytes of one training/evaluation sample, not decoded.


@dataclass(frozen=True)
class RawSample:
    """The shard bytes of one sample of a loader's kind, not decoded."""

    key: str
    url: str
    images: tuple[bytes, ...]  # one for a frame, T for a clip
    meta: bytes  # the JSON member
    frame: int | None = None  # a frame taken from a clip: its index in the clip


def _split_members(key: str, url: str, members: Sequence[str], kind: str) -> tuple[list[str], str]:
    """The image member names of a sample in order, and its JSON member name; checks the kind."""
    where = f"{url}: sample {key!r}"
    if "json" not in members:
        raise InputError(f"{where}: no .json member (members: {sorted(members)})")
    numbered = sorted((int(m.group(1)), name) for name in members if (m := _CLIP_FRAME.match(name)))
    single = [name for name in members if name in _IMAGE_EXTS]
    if kind == "frames":
        if numbered:
            raise InputError(f"{where}: a clip sample in a frames loader (use kind 'clips' or 'frames_from_clips')")
        if len(single) != 1:
            raise InputError(f"{where}: expected one image member (.jpg or .png), got {sorted(members)}")
        return single, "json"
    if not numbered:
        raise InputError(f"{where}: not a clip sample (no .000.jpg members); kind {kind!r} needs clip shards")
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise InputError(f"{where}: clip frame members are not numbered 0..T-1: {[n for _, n in numbered]}")
    return [name for _, name in numbered], "json"


def _raw_samples(sample: dict[str, Any], kind: str) -> Iterator[RawSample]:
    """A WebDataset sample dict -> the raw training/evaluation samples of ``kind`` in it."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    members = [k for k in sample if not k.startswith("__")]
    images, meta = _split_members(key, url, members, kind)
    if kind == "frames_from_clips":
        for t, name in enumerate(images):
            yield RawSample(f"{key}/{t:03d}", url, (sample[name],), sample[meta], t)
    else:
        yield RawSample(key, url, tuple(sample[name] for name in images), sample[meta])


def _tar_samples(url: str, start: int = 0) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of one shard, in tar order (bytes, not decoded); ``start``: the byte
    offset of a sample's first header to begin at (a local file; see ``shard_counts.seek_point``)."""
    stream = gopen(url, "rb")
    try:
        if start:
            stream.seek(start)
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, EOFError) as e:
        raise _unreadable(url, e) from None
    finally:
        stream.close()


def _unreadable(url: str, e: Exception) -> InputError:
    reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__
    return InputError(f"{url}: not a readable shard ({reason})")


def read_raw_samples(urls: str | Sequence[str], kind: Kind = "frames") -> Iterator[RawSample]:
    """Every raw (undecoded) sample of ``kind`` in the shards, in sorted shard order then tar order.

    For :func:`decode_sample` and benchmarks; the loaders below do their own reading.
    """
    _check_kind(kind)
    for url in _expand(urls):
        for sample in _tar_samples(url):
            yield from _raw_samples(sample, kind)


# ---------------------------------------------------------------------------------------------
# Decoding


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """Image bytes -> uint8 ``[H, W, 3]`` RGB."""
    # IMREAD_COLOR makes grey and RGBA 3-channel; the annotations are in the coordinates of
    # the image as stored, so an EXIF orientation tag must not rotate it.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = imdecode(data, flags)
    if bgr is None:
        raise InputError(f"{where}: cannot decode the image ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _target(
    boxes: Any, labels: Any, difficult: Any, width: int, height: int, where: str, num_classes: int | None = None
) -> dict[str, Tensor]:
    """Shard JSON lists (pixel boxes, 0-based labels) -> a normalised, 1-based target dict.

    ``num_classes``: object classes of the dataset; a label outside them is an error.
    """
    if not (isinstance(boxes, list) and isinstance(labels, list) and isinstance(difficult, list)):
        raise InputError(f"{where}: boxes, labels and difficult must be lists")
    if not len(boxes) == len(labels) == len(difficult):
        raise InputError(
            f"{where}: {len(boxes)} boxes, {len(labels)} labels, {len(difficult)} difficult flags; must be equal"
        )
    if any(not isinstance(b, list) or len(b) != 4 for b in boxes):
        raise InputError(f"{where}: every box must be [x1, y1, x2, y2]")
    # Parsed once, in float64 (the exact pixels, for evaluation); float32 from them is bit for bit
    # what float32 from the JSON numbers is.
    exact = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    exact_size = torch.tensor([width, height, width, height], dtype=torch.float64)
    px, size = exact.float(), exact_size.float()
    # One pixel of slack for rounding in converters; anything further out is a bad annotation.
    bad = (px[:, 2] <= px[:, 0]) | (px[:, 3] <= px[:, 1]) | (px < -1).any(1) | (px > size + 1).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise InputError(f"{where}: box {i} {boxes[i]} is empty or outside the {width}x{height} image")
    lab = torch.tensor(labels, dtype=torch.int64).reshape(-1)
    if (lab < 0).any():
        raise InputError(f"{where}: negative label in {labels}")
    if num_classes is not None and (lab >= num_classes).any():
        bad = int(lab[lab >= num_classes][0])
        raise InputError(f"{where}: label {bad} is not a class (the dataset has {num_classes}: 0..{num_classes - 1})")
    return {
        "boxes": (px / size).clamp_(0.0, 1.0),
        # The exact pixels, for evaluation (float32 normalised boxes don't give the stored
        # integers back); the training transform drops them, the evaluation one keeps them.
        "pixels": exact.clamp(min=0.0).minimum(exact_size),
        "labels": lab + 1,
        "difficult": torch.tensor([bool(d) for d in difficult], dtype=torch.bool),
    }


@dataclass
class _Decoded:
    """A raw sample decoded and checked, not yet transformed."""

    frames: Tensor  # uint8 [T, 3, H, W]
    targets: list[dict[str, Tensor]]
    size: tuple[int, int]  # (width, height)
    video: str | None
    numbers: list[int] | None


def _decode(raw: RawSample, kind: Kind, num_classes: int | None = None) -> _Decoded:
    """Decode a raw sample's images and JSON, and check them."""
    where = f"{raw.url}: sample {raw.key!r}"
    try:
        meta = json.loads(raw.meta)
        width, height = int(meta["width"]), int(meta["height"])
        boxes, labels, difficult = meta["boxes"], meta["labels"], meta["difficult"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where}: bad JSON member ({e!r})") from None
    numbers: list[int] | None = None
    if kind == "frames":
        per_frame = [(boxes, labels, difficult)]
    else:
        picked = range(len(raw.images)) if raw.frame is None else [raw.frame]
        try:
            per_frame = [(boxes[t], labels[t], difficult[t]) for t in picked]
            numbers = [int(meta["frames"][t]) for t in picked]
        except (IndexError, KeyError, TypeError):
            raise InputError(f"{where}: the JSON lists do not have one entry per frame") from None
        if raw.frame is None and len(meta["frames"]) != len(raw.images):
            raise InputError(f"{where}: {len(raw.images)} frames but {len(meta['frames'])} frame numbers")
    frames, targets = [], []
    for i, (data, (b, lab, dif)) in enumerate(zip(raw.images, per_frame)):
        at = where if len(raw.images) == 1 else f"{where} frame {i}"
        image = _decode_image(data, at)
        if image.shape[:2] != (height, width):
            raise InputError(f"{at}: image is {image.shape[1]}x{image.shape[0]}, JSON says {width}x{height}")
        frames.append(image)
        targets.append(_target(b, lab, dif, width, height, at, num_classes))
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [T, H, W, 3] -> [T, 3, H, W]
    video = None
    if kind != "frames":
        if "video" not in meta:
            raise InputError(f"{where}: a clip sample's JSON needs a 'video' name")
        video = str(meta["video"])
    return _Decoded(stacked, targets, (width, height), video, numbers)


def decode_sample(raw: RawSample, kind: Kind, transform: DetectionTransform, num_classes: int | None = None) -> Sample:
    """Decode a raw sample (images and JSON), check it, and apply ``transform``."""
    d = _decode(raw, kind, num_classes)
    images, targets = transform.clip(d.frames, d.targets)
    if kind == "clips":
        return Sample(images, targets, raw.key, d.size, d.video, d.numbers)
    if kind == "frames_from_clips":
        return Sample(images[0], targets[0], raw.key, d.size, d.video, d.numbers)
    return Sample(images[0], targets[0], raw.key, d.size)


def decode_sequence(
    raws: Sequence[RawSample], transform: DetectionTransform, num_classes: int | None = None
) -> list[Sample]:
    """Decode consecutive clips of one video and transform them *as one sequence*.

    One parameter draw for all of them (the same colour change, zoom-out, crop and flip), so
    a state carried from one clip to the next sees one continuous video, not a jump at
    every clip boundary. Returns one clip :class:`Sample` per raw sample, in order.
    """
    decoded = [_decode(raw, "clips", num_classes) for raw in raws]
    sizes = {d.size for d in decoded}
    if len(sizes) > 1:
        raise InputError(f"{raws[0].url}: clips of video {decoded[0].video!r} have different sizes {sorted(sizes)}")
    images, targets = transform.clip(
        torch.cat([d.frames for d in decoded]), [t for d in decoded for t in d.targets]
    )
    out, start = [], 0
    for raw, d in zip(raws, decoded):
        end = start + d.frames.shape[0]
        out.append(Sample(images[start:end], targets[start:end], raw.key, d.size, d.video, d.numbers))
        start = end
    return out


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")


def _expand(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern or a list of shard paths -> the sorted list; none is an error."""
    shards = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not shards:
        raise ValueError("no shards given")
    return sorted(shards)


def init_worker(_: int) -> None:
    """A loader worker's start (``worker_init_fn``) for training and evaluation alike."""
    # DataLoader already limits torch to one thread per worker; do the same for OpenCV. Safe
    # only when the parent's OpenCV pool was stopped for the fork (ssd.data.workers.start_workers).
    cv2.setNumThreads(1)
    # A preemption signals every process of the machine. The training process decides when
    # to stop (after the current step and a checkpoint); a loader worker that died on the
    # signal first would make the DataLoader abort that step.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
