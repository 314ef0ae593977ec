"""The evaluation loader over WebDataset shards: :func:`eval_loader`.

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
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from webdataset.tariterators import base_plus_ext

from ssd.data.samples import (
    Kind,
    RawSample,
    Sample,
    _check_kind,
    _expand,
    _split_members,
    collate,
    decode_sample,
    init_worker,
)
from ssd.data.transforms import DetectionTransform, eval_transform
from ssd.errors import InputError


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
        worker_init_fn=init_worker if num_workers > 0 else None,
        drop_last=False,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone; nothing is random here
    )
