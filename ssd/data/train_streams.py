"""The training loader over WebDataset shards: :func:`train_loader`.

Training (:func:`train_loader`)
-------------------------------
One call per epoch and rank. Every rank yields exactly ``batches_per_epoch`` batches
whatever the number and sizes of the shards, so DDP never hangs at the end of an epoch.

The batches of a rank come from ``streams`` independent sample streams (default: one per
loader worker); global batch ``j`` of the epoch is batch ``j // streams`` of stream
``j % streams``. A stream is a pure function of ``(seed, epoch, rank, stream)``:

1. *Which data.* Pass ``p`` over the data concatenates the shards in an order drawn from
   ``(seed, epoch, p)``, the same on every rank, and cuts that sequence into one contiguous
   slice per stream of the job (``world_size * streams``; in sequence mode per batch position
   of each stream), each as long as that unit's share of the epoch's draws, in the order of the
   units starting from unit ``p``. So in an epoch of ``ceil(samples / (batch_size *
   world_size))`` batches (the training's) every sample is drawn once, and only the few that
   round the epoch up to whole batches twice (they come from the next pass), whatever the
   shards' sizes; no two streams (on the same or different ranks) read the same sample in a
   pass. Samples are raw samples: with ``frames_from_clips``, each frame of each clip. Each
   shard's sample count is read from its tar headers when the loader is made. A unit that
   finishes its slice goes on to its slice of the next pass (with less data than units, some
   slices of a pass are empty, and the rotation gives them data in a later pass): shards are
   re-sampled, never exhausted.
2. *Which order.* A shuffle buffer with its own generator seeded from
   ``(seed, epoch, rank, stream)``, emptied at the end of each pass (so a pass is emitted whole
   before the next begins).
3. *Which augmentation.* Sample ``n`` of the stream is decoded and augmented with torch's
   CPU generator seeded from ``(seed, epoch, rank, stream, n)`` (saved and restored
   around the call, so the training process's own random state is untouched when
   ``num_workers=0``).

*Sequence mode* (``sequence_clips > 0``, clips only), for carrying a temporal model's state
from clip to clip: batch position ``b`` of a stream (a lane) has its own slice of each pass,
one clip per batch of its stream, cut into runs of at most ``sequence_clips`` consecutive
clips of one video; the lane's shuffle buffer shuffles whole runs, and the lane hands out a
run's clips one per batch before it takes the next. As a lane's slice is at most its draws
(the rest comes from the next pass), the pass is drawn whole and no run is left unfinished
at the epoch's end. Run ``n`` of lane ``b`` is decoded and augmented as one
sequence with the seed ``(seed, epoch, rank, stream, n * batch_size + b)``; ``Batch.runs``
numbers the runs.

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
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssd.data.samples import (
    Batch,
    Kind,
    RawSample,
    Sample,
    _check_kind,
    _expand,
    _raw_samples,
    _tar_samples,
    collate,
    decode_sample,
    decode_sequence,
    init_worker,
)
from ssd.data.clip_runs import cut_runs
from ssd.data.shard_counts import count_samples, seek_point
from ssd.data.transforms import AugmentConfig, DetectionTransform, train_transform
from ssd.errors import InputError

# Tags that keep the random streams derived from the same (seed, epoch, ...) independent.
_PASS, _SHUFFLE, _AUGMENT, _WORKERS = 0, 1, 2, 3
# A stream that has seen no sample after this many passes over its slices has no data.
_MAX_EMPTY_PASSES = 1000


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


def _shuffled(source: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: hold ``size`` items, emit a random one per new item, and at the end of the
    source the rest in random order (so a pass over the data is emitted whole before the next).

    ``size=1`` is no shuffling; the output lags the input by ``size - 1`` items.
    """
    buffer: list[Any] = []
    for item in source:
        buffer.append(item)
        if len(buffer) == size:
            i = int(rng.integers(size))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    for i in rng.permutation(len(buffer)):
        yield buffer[int(i)]


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
        self.shard_sizes = [count_samples(url, kind) for url in urls]  # in raw samples (a clip's frames: each)
        self.total_samples = sum(self.shard_sizes)
        if self.total_samples == 0:
            raise InputError(f"no samples in the shards {urls}")

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
        """Sequence mode: batch position ``b`` of the stream (a lane) walks through runs of
        consecutive clips of one video from its own slice of the data, a clip per batch.
        Batches ``first, first + 1, ...``; the earlier ones are skipped without decoding."""
        runs = [self._lane_runs(stream, b) for b in range(self.batch_size)]
        lanes = [_Lane() for _ in range(self.batch_size)]
        for number in itertools.count():
            samples = []
            for b, lane in enumerate(lanes):
                if lane.next == len(lane.raws):
                    n, lane.raws = next(runs[b])
                    lane.number = n * self.batch_size + b  # unique among the stream's runs
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

    def _lane_runs(self, stream: int, lane: int) -> Iterator[tuple[int, list[RawSample]]]:
        """The numbered runs of one lane: its slice of each pass (a lane draws one clip per batch of
        its stream), cut into runs and shuffled as runs. A lane has its own slice so that the epoch
        ends at the end of its runs: with a stream's lanes taking runs from one slice, the lanes
        part-way through a run at the end of the epoch left its clips undrawn (4-8% of them)."""
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, stream, lane, _SHUFFLE))
        buffer = max(1, self.shuffle_buffer // (self.sequence_clips * self.batch_size))  # runs held
        unit = (self.rank * self.streams + stream) * self.batch_size + lane
        return enumerate(itertools.chain.from_iterable(
            _shuffled(cut_runs(part, self.sequence_clips), buffer, rng) for part in self._passes(unit)))

    def _stream_raw(self, stream: int) -> Iterator[RawSample]:
        rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, stream, _SHUFFLE))
        parts = self._passes(self.rank * self.streams + stream)
        return itertools.chain.from_iterable(_shuffled(part, self.shuffle_buffer, rng) for part in parts)

    def _unit_draws(self) -> list[int]:
        """The samples each unit of the job draws this epoch: a unit is a stream, or in sequence
        mode a lane (one batch position of a stream); batch j of a process is its stream j % streams's."""
        draws = []
        for _ in range(self.world_size):
            for s in range(self.streams):
                batches = len(range(s, self.batches_per_epoch, self.streams))
                draws += [batches] * self.batch_size if self.sequence_clips else [batches * self.batch_size]
        return draws

    def _passes(self, unit: int) -> Iterator[Iterator[RawSample]]:
        """The unit's part of pass 0, 1, ... over the data, each a finite iterator of raw samples
        (module docstring, point 1)."""
        draws = self._unit_draws()
        total, n = sum(draws), len(draws)
        seen = False
        for p in itertools.count():
            rng = np.random.default_rng(_seed(self.seed, self.epoch, p, _PASS))
            order = [int(k) for k in rng.permutation(len(self.urls))]
            # The units' slices follow each other from unit p % n on: a unit whose share rounds to
            # no sample in one pass (data smaller than the job's units) gets one in a later pass.
            before = sum(draws[(p + k) % n] for k in range((unit - p) % n))
            # This unit's slice of the concatenation, as long as its share of the epoch's draws.
            lo, hi = before * self.total_samples // total, (before + draws[unit]) * self.total_samples // total
            part = self._slice(order, lo, hi)
            first = next(part, None)
            if first is not None:
                seen = True
                yield itertools.chain([first], part)
            elif not seen and p >= max(_MAX_EMPTY_PASSES, n):  # by pass n every unit had its turn first
                raise InputError(f"no samples in the shards {self.urls}")

    def _slice(self, order: list[int], lo: int, hi: int) -> Iterator[RawSample]:
        """Raw samples ``lo`` to ``hi`` (exclusive) of the shards concatenated in ``order``; a local
        shard is read from the sample that holds ``lo`` on (others from their start)."""
        offset = 0
        for url_index in order:
            size = self.shard_sizes[url_index]
            if offset + size > lo and offset < hi:
                start, before = seek_point(self.urls[url_index], self.kind, lo - offset)
                i = offset + before
                for sample in _tar_samples(self.urls[url_index], start):
                    if i >= hi:
                        break
                    for raw in _raw_samples(sample, self.kind):
                        if lo <= i < hi:
                            yield raw
                        i += 1
            offset += size
            if offset >= hi:
                return


def _identity(x: Any) -> Any:
    return x


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
        worker_init_fn=init_worker if num_workers > 0 else None,
        persistent_workers=False,
        # The DataLoader draws its workers' base seed from this generator rather than from
        # the training process's global one (our randomness is seeded per sample anyway).
        generator=torch.Generator().manual_seed(_seed(seed, epoch, rank, _WORKERS)),
    )
