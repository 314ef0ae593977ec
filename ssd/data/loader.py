"""Training and evaluation loaders over WebDataset shards (format: ``docs/data-format.md``).

Three kinds of sample:

- ``"frames"``: frame shards, one image per sample -> ``Batch.images`` ``Tensor[B, 3, S, S]``;
- ``"clips"``: clip shards, T frames per sample -> ``Batch.images`` ``Tensor[B, T, 3, S, S]``;
- ``"frames_from_clips"``: clip shards, every frame of every clip a frame sample, so a
  per-frame baseline trains on exactly the frames the LSTM sees.

Decoding: OpenCV (BGR -> RGB, grey and RGBA -> 3 channels, EXIF orientation ignored
because the annotations are in the coordinates of the image as stored); boxes from
pixels to ``(x1, y1, x2, y2)`` normalised to [0, 1]; labels + 1 (0 is the background);
difficult as bool. Images come out as float32 in [0, 1] RGB (the model normalises).

Training (:func:`train_loader`)
-------------------------------
One call per epoch and rank. Every rank yields exactly ``batches_per_epoch`` batches
whatever the number and sizes of the shards, so DDP never hangs at the end of an epoch.

The batches of a rank come from ``streams`` independent sample streams (default: one per
loader worker); global batch ``j`` of the epoch is batch ``j // streams`` of stream
``j % streams``. A stream is a pure function of ``(seed, epoch, rank, stream)``:

1. *Which data.* The shards are cut into units (shard, residue): a unit is the samples of a
   shard whose index in the shard is the residue modulo ``m``, with ``m`` the smallest
   number that gives at least one unit per stream of all ranks (``m = 1``, whole shards,
   as soon as there are as many shards as streams in the job). Pass ``p`` over the data
   deals a permutation of the units drawn from ``(seed, epoch, p)``, the same on every rank,
   to the ``world_size * streams`` streams of the job, so in the first pass no two streams
   (on the same or different ranks) read the same sample. A stream that finishes its units
   goes on to its units of the next pass: shards are re-sampled, never exhausted.
2. *Which order.* A shuffle buffer with its own generator seeded from
   ``(seed, epoch, rank, stream)``.
3. *Which augmentation.* Sample ``n`` of the stream is decoded and augmented with torch's
   CPU generator seeded from ``(seed, epoch, rank, stream, n)`` (saved and restored
   around the call, so the training process's own random state is untouched when
   ``num_workers=0``).

*Sequence mode* (``sequence_clips > 0``, clips only), for carrying a temporal model's state
from clip to clip: the stream's clips are cut into runs of at most ``sequence_clips``
consecutive clips of one video, the shuffle buffer shuffles whole runs, and batch position
``b`` of the stream takes a run and hands out its clips one per batch before it takes the
next. Run ``n`` of the stream is decoded and augmented as one sequence with the seed
``(seed, epoch, rank, stream, n)``; ``Batch.runs`` numbers the runs.

DataLoader workers hand out batches round-robin, worker 0 first, also after a resume. So
worker ``w`` of ``W`` produces global batches ``start_batch + w, start_batch + w + W, ...``;
with ``W`` dividing ``streams`` those all belong to a fixed set of streams, which the
worker serves (the streams a worker serves rotate with ``start_batch``). Resuming at
``start_batch = k`` therefore yields exactly batches ``k, k+1, ...`` of an uninterrupted
epoch: each stream skips the raw samples of its first ``k // streams``-ish batches
(reading the tar bytes, decoding nothing) and continues. The sequence depends on
``streams`` but not on ``num_workers``: 0, 1 or 2 workers with ``streams=2`` give the same
batches. It also depends on ``world_size``, ``batch_size``, ``shuffle_buffer`` and the
sorted shard list.

Evaluation (:func:`eval_loader`)
--------------------------------
Every sample exactly once, no augmentation (resize only), original width/height and key
in the batch. The shard tars are indexed once (member offsets, read with seeks), so the
order does not depend on workers:

- ``"frames"``: the samples in shard order (sorted paths), then tar order; rank ``r`` takes
  every ``world_size``-th sample starting at ``r``.
- ``"clips"``: whole videos per rank (greedy on clip counts, so ranks get similar
  amounts); on a rank, clips ordered by (video, first frame number), so video evaluation
  can carry LSTM state from one clip to the next.
- ``"frames_from_clips"``: each distinct (video, frame number) once, ordered by
  (video, frame number), videos split across ranks like ``"clips"``.

Ranks get different numbers of batches: gather the results once after the loop, never
call a collective per batch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ssd.data.transforms import AugmentConfig, DetectionTransform, eval_transform, train_transform
from ssd.errors import InputError

__all__ = [
    "Batch",
    "Kind",
    "RawSample",
    "Sample",
    "collate",
    "decode_sample",
    "eval_loader",
    "read_raw_samples",
    "train_loader",
]

Kind = Literal["frames", "clips", "frames_from_clips"]
_KINDS = ("frames", "clips", "frames_from_clips")

_IMAGE_EXTS = ("jpg", "jpeg", "png")
# Clip frame members: WebDataset splits "<key>.000.jpg" into key and extension "000.jpg".
_CLIP_FRAME = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")
# Tags that keep the random streams derived from the same (seed, epoch, ...) independent.
_PASS, _SHUFFLE, _AUGMENT, _WORKERS = 0, 1, 2, 3
# A stream that has seen no sample after this many passes over its units has no data.
_MAX_EMPTY_PASSES = 1000


@dataclass
class Batch:
    """A collated batch.

    ``images``: float32 ``Tensor[B, 3, S, S]`` (clips: ``Tensor[B, T, 3, S, S]``), RGB in [0, 1].
    ``targets``: one dict per sample (clips: one list of T dicts per sample), each with
    ``boxes`` float32 ``Tensor[N, 4]`` (x1, y1, x2, y2) normalised to [0, 1], ``labels``
    int64 ``Tensor[N]`` (1-based, 0 is the background) and ``difficult`` bool ``Tensor[N]``.
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
        raise ValueError(f"collate: samples of different shapes ({detail}); clips of one dataset must have one length")
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


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of one shard, in tar order (bytes, not decoded)."""
    stream = gopen(url, "rb")
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, EOFError) as e:
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__
        raise InputError(f"{url}: not a readable shard ({reason})") from None
    finally:
        stream.close()


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
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
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
    px = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    size = torch.tensor([width, height, width, height], dtype=torch.float32)
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


# ---------------------------------------------------------------------------------------------
# Training


def _seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (SeedSequence hashing: nearby inputs, unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator (what v2 transforms draw from) for a block, then restore it."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def _shuffled(source: Iterator[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """A shuffle buffer over an endless source: hold ``size`` items, emit a random one per new item.

    ``size=1`` is no shuffling; the output lags the input by ``size - 1`` items.
    """
    buffer: list[RawSample] = []
    for item in source:
        buffer.append(item)
        if len(buffer) == size:
            i = int(rng.integers(size))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()


@dataclass
class _Lane:
    """Sequence mode: the run one batch position is walking through."""

    number: int = 0  # the run's number in its stream (its augmentation seed)
    raws: list[RawSample] = field(default_factory=list)  # its clips, not decoded
    clips: list[Sample] | None = None  # decoded and augmented, once needed
    next: int = 0  # index of the clip the next batch takes


class _TrainStreams(IterableDataset):
    """The batches of one rank and epoch; see the module docstring for the scheme."""

    def __init__(
        self,
        urls: list[str],
        transform: DetectionTransform,
        kind: str,
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_batch: int,
        batches_per_epoch: int,
        batch_size: int,
        streams: int,
        shuffle_buffer: int,
        sequence_clips: int = 0,
        num_classes: int | None = None,
    ):
        self.urls = urls
        self.num_classes = num_classes
        self.sequence_clips = sequence_clips
        self.transform = transform
        self.kind = kind
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.start_batch, self.batches_per_epoch = start_batch, batches_per_epoch
        self.batch_size, self.streams, self.shuffle_buffer = batch_size, streams, shuffle_buffer

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.streams % workers:
            raise ValueError(f"streams ({self.streams}) must be a multiple of the number of workers ({workers})")
        # The DataLoader takes batch j from worker (j - start_batch) % workers, so this worker
        # makes batches start_batch + worker + i * workers; as workers divides streams, they
        # belong to the streams s with s % workers == (start_batch + worker) % workers, and each
        # such stream's batches come here consecutively.
        running: dict[int, Iterator[Batch]] = {}
        for j in range(self.start_batch + worker, self.batches_per_epoch, workers):
            stream = j % self.streams
            if stream not in running:
                running[stream] = self._stream_batches(stream, first=j // self.streams)
            yield next(running[stream])

    def _stream_batches(self, stream: int, first: int) -> Iterator[Batch]:
        """Batches ``first, first + 1, ...`` of a stream."""
        if self.sequence_clips:
            yield from self._sequence_batches(stream, first)
            return
        raw = self._stream_raw(stream)
        index = first * self.batch_size
        # Resume: skip the samples of the earlier batches raw, before any decoding.
        for _ in range(index):
            next(raw)
        while True:
            samples = []
            for _ in range(self.batch_size):
                item = next(raw)
                with _seeded_cpu_rng(_seed(self.seed, self.epoch, self.rank, stream, index, _AUGMENT)):
                    samples.append(decode_sample(item, self.kind, self.transform, self.num_classes))  # type: ignore[arg-type]
                index += 1
            yield collate(samples)

    def _sequence_batches(self, stream: int, first: int) -> Iterator[Batch]:
        """Sequence mode: batch position ``b`` of the stream walks through runs of consecutive
        clips of one video, a clip per batch; a finished run is followed by the next run of the
        shuffled stream. Batches ``first, first + 1, ...``; the earlier ones are skipped
        without decoding."""
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, stream, _SHUFFLE))
        buffer = max(1, -(-self.shuffle_buffer // self.sequence_clips))  # runs held for shuffling
        runs = enumerate(_shuffled(self._stream_runs(stream), buffer, rng))
        lanes = [_Lane() for _ in range(self.batch_size)]
        for number in itertools.count():
            samples = []
            for lane in lanes:
                if lane.next == len(lane.raws):
                    lane.number, lane.raws = next(runs)
                    lane.clips, lane.next = None, 0
                if number >= first:
                    if lane.clips is None:
                        seed = _seed(self.seed, self.epoch, self.rank, stream, lane.number, _AUGMENT)
                        with _seeded_cpu_rng(seed):
                            lane.clips = decode_sequence(lane.raws, self.transform, self.num_classes)
                        for clip in lane.clips:
                            clip.run = lane.number * self.streams + stream  # unique among the rank's streams
                    samples.append(lane.clips[lane.next])
                lane.next += 1
            if number >= first:
                yield collate(samples)

    def _stream_runs(self, stream: int) -> Iterator[list[RawSample]]:
        """The stream's clips (endless, in shard order) cut into runs of consecutive clips of one
        video, at most ``sequence_clips`` long. A run ends where the video changes or its frame
        numbers stop increasing (the next pass over the data)."""
        run: list[RawSample] = []
        last = ("", 0)  # (video, first frame) of the run's last clip
        for raw in self._stream_source(stream):
            try:
                meta = json.loads(raw.meta)
                video, start = str(meta["video"]), int(meta["frames"][0])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise InputError(f"{raw.url}: sample {raw.key!r}: bad JSON member ({e!r})") from None
            if run and (video != last[0] or start <= last[1] or len(run) == self.sequence_clips):
                yield run
                run = []
            run.append(raw)
            last = (video, start)

    def _stream_raw(self, stream: int) -> Iterator[RawSample]:
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, stream, _SHUFFLE))
        return _shuffled(self._stream_source(stream), self.shuffle_buffer, rng)

    def _stream_source(self, stream: int) -> Iterator[RawSample]:
        """The endless raw samples of a stream's units, pass after pass (module docstring, point 1)."""
        total = self.world_size * self.streams  # streams in the whole job
        mine = self.rank * self.streams + stream
        residues = -(-total // len(self.urls))  # ceil: at least one unit per stream
        units = [(u, r) for u in range(len(self.urls)) for r in range(residues)]
        seen = False
        for p in itertools.count():
            order = np.random.default_rng(_seed(self.seed, self.epoch, p, _PASS)).permutation(len(units))
            for k in order[mine::total]:
                url_index, residue = units[int(k)]
                url = self.urls[url_index]
                for i, sample in enumerate(_tar_samples(url)):
                    if i % residues == residue:
                        seen = True
                        yield from _raw_samples(sample, self.kind)
            if not seen and p >= _MAX_EMPTY_PASSES:
                raise InputError(f"no samples in the shards {self.urls}")


def _identity(x: Any) -> Any:
    return x


def _init_worker(_: int) -> None:
    # DataLoader already limits torch to one thread per worker; do the same for OpenCV.
    cv2.setNumThreads(1)
    # A preemption signals every process of the machine. The training process decides when
    # to stop (after the current step and a checkpoint); a loader worker that died on the
    # signal first would make the DataLoader abort that step.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(
    urls: str | Sequence[str],
    cfg: AugmentConfig,
    *,
    image_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    batches_per_epoch: int,
    batch_size: int,
    num_workers: int,
    start_batch: int = 0,
    kind: Kind = "frames",
    streams: int | None = None,
    shuffle_buffer: int = 128,
    sequence_clips: int = 0,
    pin_memory: bool = False,
    num_classes: int | None = None,
) -> DataLoader:
    """The training batches of one rank for one epoch: exactly ``batches_per_epoch - start_batch``.

    ``urls``: shard paths (a list, or a brace pattern ``train-{000000..000009}.tar``); their
    order does not matter (sorted). ``cfg``, ``image_size``: the augmentation and the square
    input size. ``start_batch``: resume point within the epoch. ``streams``: independent sample
    streams per rank (default ``max(1, num_workers)``; must be a multiple of ``num_workers``);
    fix it to keep the batches the same when ``num_workers`` changes. ``shuffle_buffer``:
    samples held per stream (raw bytes: about ``shuffle_buffer`` x sample size of memory).
    ``sequence_clips`` (kind ``"clips"`` only; 0: off): sequence mode, for carrying a
    temporal model's state from one clip to the next. Batch position ``b`` of a stream then
    holds consecutive clips of one video in consecutive batches of the stream (runs of at
    most ``sequence_clips`` clips, shuffled as runs), and a run's clips are augmented alike
    (:func:`decode_sequence`). With ``streams > 1`` the stream's batches are every
    ``streams``-th batch: match clips to states by run and frame number (``Batch.runs``,
    :func:`ssd.state_carry.clip_keys`), not by position.

    The same ``(seed, epoch, rank)`` and settings give the same batches, augmentation included;
    see the module docstring. Don't pass the loader to ``accelerator.prepare`` (it would split
    the data a second time); move batches with ``batch.to(device)``.
    ``num_classes``: the dataset's object classes; a sample with a label outside them is an
    :class:`~ssd.errors.InputError` (never an index error deep inside the loss).
    """
    _check_kind(kind)
    shards = _expand(urls)
    streams = max(1, num_workers) if streams is None else streams
    checks = [
        (world_size >= 1 and 0 <= rank < world_size, f"rank {rank} of world_size {world_size}"),
        (seed >= 0 and epoch >= 0, f"seed ({seed}) and epoch ({epoch}) must be non-negative"),
        (batches_per_epoch >= 1, f"batches_per_epoch must be positive, got {batches_per_epoch}"),
        (0 <= start_batch <= batches_per_epoch, f"start_batch {start_batch} outside 0..{batches_per_epoch}"),
        (batch_size >= 1, f"batch_size must be positive, got {batch_size}"),
        (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
        (
            streams >= 1 and streams % max(1, num_workers) == 0,
            f"streams ({streams}) must be a positive multiple of num_workers ({num_workers})",
        ),
        (shuffle_buffer >= 1, f"shuffle_buffer must be positive, got {shuffle_buffer}"),
        (sequence_clips >= 0, f"sequence_clips must not be negative, got {sequence_clips}"),
        (sequence_clips == 0 or kind == "clips", f"sequence_clips needs kind 'clips', not {kind!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"train_loader: {message}")
    dataset = _TrainStreams(
        shards,
        train_transform(image_size, cfg),
        kind,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        start_batch=start_batch,
        batches_per_epoch=batches_per_epoch,
        batch_size=batch_size,
        streams=streams,
        shuffle_buffer=shuffle_buffer,
        sequence_clips=sequence_clips,
        num_classes=num_classes,
    )
    return DataLoader(
        dataset,
        batch_size=None,  # the workers batch: a batch is a unit of the deterministic sequence
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        persistent_workers=False,
        # The DataLoader draws its workers' base seed from this generator rather than from
        # the training process's global one (our randomness is seeded per sample anyway).
        generator=torch.Generator().manual_seed(_seed(seed, epoch, rank, _WORKERS)),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class _Entry:
    """Where the bytes of one evaluation sample are: (offset, size) of its members in ``url``."""

    url: str
    key: str
    images: tuple[tuple[int, int], ...]
    meta: tuple[int, int]
    frame: int | None = None
    sort_key: tuple = field(default=(), compare=False)


def _index_tar(url: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {extension: (offset, size)})]`` of a local shard in tar order, from the headers only."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        tar = tarfile.open(url, "r:")
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"{url}: cannot open as an uncompressed tar ({e})") from None
    with tar:
        try:
            infos = list(tar)
        except (OSError, tarfile.TarError) as e:  # a cut-off or overwritten shard
            raise InputError(f"{url}: not a readable shard ({e})") from None
    for info in infos:
        if not info.isreg():
            continue
        key, ext = base_plus_ext(info.name)
        if key is None or os.path.basename(info.name).startswith("__"):
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        members = samples[-1][1]
        ext = ext.lower()
        if ext in members:
            raise InputError(f"{url}: duplicate member {info.name}")
        members[ext] = (info.offset_data, info.size)
    return samples


def _read_at(fd: int, offset: int, size: int, url: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise InputError(f"{url}: truncated shard (wanted {size} bytes at {offset}, got {len(data)})")
    return data


def _balance_videos(counts: dict[str, int], world_size: int) -> list[list[str]]:
    """Whole videos to ranks, largest first to the least loaded rank; each rank's videos sorted."""
    loads = [0] * world_size
    ranks: list[list[str]] = [[] for _ in range(world_size)]
    for video in sorted(counts, key=lambda v: (-counts[v], v)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        loads[r] += counts[video]
        ranks[r].append(video)
    return [sorted(videos) for videos in ranks]


def _eval_entries(urls: list[str], kind: str, rank: int, world_size: int) -> list[_Entry]:
    entries: list[_Entry] = []
    fds: dict[str, int] = {}
    try:
        for url in urls:
            for key, members in _index_tar(url):
                images, meta = _split_members(key, url, list(members), kind)
                places = tuple(members[name] for name in images)
                if kind == "frames":
                    entries.append(_Entry(url, key, places, members[meta]))
                    continue
                if url not in fds:
                    fds[url] = os.open(url, os.O_RDONLY)
                try:
                    info = json.loads(_read_at(fds[url], *members[meta], url))
                    video, numbers = str(info["video"]), [int(n) for n in info["frames"]]
                except (ValueError, KeyError, TypeError) as e:
                    raise InputError(f"{url}: sample {key!r}: bad JSON member ({e!r})") from None
                if len(numbers) != len(places):
                    raise InputError(f"{url}: sample {key!r}: {len(places)} frames but {len(numbers)} frame numbers")
                if kind == "clips":
                    entries.append(_Entry(url, key, places, members[meta], None, (video, numbers[0])))
                else:
                    for t, (place, number) in enumerate(zip(places, numbers)):
                        entries.append(_Entry(url, f"{key}/{t:03d}", (place,), members[meta], t, (video, number)))
    finally:
        for fd in fds.values():
            os.close(fd)
    if kind == "frames":
        return entries[rank::world_size]
    # Sorted by (video, first frame) / (video, frame); ties broken by key, so duplicates of a
    # frame (overlapping clips) keep the first clip's copy.
    entries.sort(key=lambda e: (e.sort_key, e.key))
    if kind == "frames_from_clips":
        unique: list[_Entry] = []
        for e in entries:
            if not unique or unique[-1].sort_key != e.sort_key:
                unique.append(e)
        entries = unique
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.sort_key[0]] = counts.get(e.sort_key[0], 0) + 1
    videos = set(_balance_videos(counts, world_size)[rank])
    return [e for e in entries if e.sort_key[0] in videos]


class _IndexedSamples(Dataset):
    """Evaluation samples read by offset; each process opens the shards itself (no shared file offsets)."""

    def __init__(self, entries: list[_Entry], kind: str, transform: DetectionTransform, num_classes: int | None):
        self.entries, self.kind, self.transform, self.num_classes = entries, kind, transform, num_classes
        self._pid = -1
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _fd(self, url: str) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours
            self._pid, self._fds = os.getpid(), {}
        if url not in self._fds:
            self._fds[url] = os.open(url, os.O_RDONLY)
        return self._fds[url]

    def __getitem__(self, i: int) -> Sample:
        e = self.entries[i]
        fd = self._fd(e.url)
        raw = RawSample(
            e.key,
            e.url,
            tuple(_read_at(fd, off, size, e.url) for off, size in e.images),
            _read_at(fd, *e.meta, e.url),
            e.frame,
        )
        return decode_sample(raw, self.kind, self.transform, self.num_classes)  # type: ignore[arg-type]

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)


def eval_loader(
    urls: str | Sequence[str],
    *,
    image_size: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    kind: Kind = "frames",
    pin_memory: bool = False,
    num_classes: int | None = None,
) -> DataLoader:
    """This rank's share of the evaluation samples, each once, in a fixed order, resized only.

    Frames: every ``world_size``-th sample (shard order, then tar order), starting at ``rank``.
    Clips and frames from clips: whole videos per rank, ordered by (video, frame number).
    ``urls`` must be local uncompressed tar files (they are indexed by offset). ``num_classes``:
    the dataset's object classes; a sample with a label outside them is an :class:`InputError`.
    """
    _check_kind(kind)
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"eval_loader: rank {rank} of world_size {world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"eval_loader: batch_size {batch_size} must be positive, num_workers {num_workers} >= 0")
    entries = _eval_entries(_expand(urls), kind, rank, world_size)
    return DataLoader(
        _IndexedSamples(entries, kind, eval_transform(image_size), num_classes),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        drop_last=False,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone; nothing is random here
    )


def batches(loader: DataLoader | Iterator[Any]) -> Iterator[Any]:
    """The batches of ``loader`` (or of an iterator over one), its worker processes stopped
    however the iteration ends.

    A DataLoader iterator stops its workers when it is garbage-collected. An exception from a
    batch (a bad sample raised in a worker) keeps the iterator alive in its traceback, and
    the workers with it; Python's exit then waits for them, forever when they ignore SIGTERM
    (training starts them so). Iterating through this stops them at once instead.
    """
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")


def _expand(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern or a list of shard paths -> the sorted list; none is an error."""
    shards = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    if not shards:
        raise ValueError("no shards given")
    return sorted(shards)
