"""Tests for ssd.data.loader on tiny shards written here with webdataset.TarWriter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from torch.testing import assert_close

import ssd.data.loader as loader_module
import ssd.data.samples as samples_module
from procs import RUN_OPENCV_POOL
from ssd.data.loader import Batch, Sample, collate, eval_loader, train_loader
from ssd.data.shard_counts import count_samples
from ssd.data.transforms import AugmentConfig, train_transform
from ssd.errors import InputError
from ssd.state_carry import StateCarry, carry_keep, clip_keys

REPO = Path(__file__).resolve().parents[1]
W, H = 48, 40  # stored image size
S = 32  # model input size
T = 3  # clip length


def _png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", rgb[..., ::-1] if rgb.ndim == 3 else rgb)  # OpenCV writes BGR
    assert ok
    return data.tobytes()


def _frame(number: int) -> tuple[np.ndarray, list[list[float]]]:
    """A distinct image per number, with number % 3 boxes (0, 1 or 2) drawn on it."""
    image = np.full((H, W, 3), (number * 37) % 200, np.uint8)
    boxes = []
    for b in range(number % 3):
        x1, y1 = 4 + 20 * b, 6 + (number % 5)
        image[y1 : y1 + 12, x1 : x1 + 14] = 255
        boxes.append([float(x1), float(y1), float(x1 + 14), float(y1 + 12)])
    return image, boxes


def write_frame_shards(directory: Path, counts: list[int]) -> list[str]:
    """Frame shards with ``counts[i]`` samples in shard i; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, number = [], 0
    for s, count in enumerate(counts):
        path = directory / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(count):
                image, boxes = _frame(number)
                meta = {
                    "id": f"img/{number}",
                    "width": W,
                    "height": H,
                    "boxes": boxes,
                    "labels": [number % 4 + b for b in range(len(boxes))],
                    "difficult": [b == 1 for b in range(len(boxes))],
                }
                writer.write({"__key__": f"s{s}_{i:04d}", "png": _png(image), "json": json.dumps(meta).encode()})
                number += 1
        paths.append(str(path))
    return paths


def write_clip_shards(directory: Path, shards: list[list[tuple[str, int]]]) -> list[str]:
    """Clip shards; ``shards[i]`` lists the (video, first frame) of its clips, T frames each."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, clips in enumerate(shards):
        path = directory / f"val-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for video, first in clips:
                numbers = list(range(first, first + T))
                sample = {"__key__": f"{video}_{first:06d}"}
                boxes, labels, difficult = [], [], []
                for t, n in enumerate(numbers):
                    image, frame_boxes = _frame(n)
                    sample[f"{t:03d}.png"] = _png(image)
                    boxes.append(frame_boxes)
                    labels.append([1] * len(frame_boxes))
                    difficult.append([False] * len(frame_boxes))
                meta = {
                    "video": video,
                    "frames": numbers,
                    "width": W,
                    "height": H,
                    "boxes": boxes,
                    "labels": labels,
                    "difficult": difficult,
                }
                sample["json"] = json.dumps(meta).encode()
                writer.write(sample)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def frame_shards(tmp_path_factory) -> list[str]:
    # Three shards of uneven sizes: 7 + 2 + 11 = 20 samples.
    return write_frame_shards(tmp_path_factory.mktemp("frames"), [7, 2, 11])


@pytest.fixture(scope="module")
def clip_shards(tmp_path_factory) -> list[str]:
    # Videos out of order across shards, clips overlapping (stride 2, length 3), one video split.
    return write_clip_shards(
        tmp_path_factory.mktemp("clips"),
        [
            [("vidb", 0), ("vidb", 2), ("vidb", 4), ("vida", 10)],
            [("vida", 12), ("vidc", 0)],
            [("vida", 14), ("vidd", 3), ("vidd", 5)],
        ],
    )


def _train(urls, **overrides) -> list[Batch]:
    kwargs = {
        "image_size": S, "rank": 0, "world_size": 1, "seed": 3, "epoch": 0, "batches_per_epoch": 6,
        "batch_size": 3, "num_workers": 0, "shuffle_buffer": 4,
    }  # fmt: skip
    kwargs.update(overrides)
    return list(train_loader(urls, AugmentConfig(), **kwargs))


def _flat(targets: list) -> list[dict]:
    """Per-sample targets, clips' per-frame lists flattened."""
    return [t for item in targets for t in (item if isinstance(item, list) else [item])]


def _assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert_close(x.images, y.images, rtol=0, atol=0)
        assert x.frames == y.frames and x.runs == y.runs
        for tx, ty in zip(_flat(x.targets), _flat(y.targets), strict=True):
            for name in ("boxes", "labels", "difficult"):
                assert_close(tx[name], ty[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> list[str]:
    # Whole videos of consecutive clips (stride T): v0 has 4 clips, v1 2, v2 3, v3 1.
    return write_clip_shards(
        tmp_path_factory.mktemp("videos"),
        [
            [("v0", 0), ("v0", 3), ("v0", 6), ("v0", 9), ("v1", 0), ("v1", 3)],
            [("v2", 0), ("v2", 3), ("v2", 6), ("v3", 0)],
        ],
    )


VIDEO_CLIPS = {"v0": 4, "v1": 2, "v2": 3, "v3": 1}


# ---------------------------------------------------------------------------------------------
# Training


def test_train_batch_format(frame_shards):
    batches = _train(frame_shards, batches_per_epoch=4)
    assert len(batches) == 4
    for batch in batches:
        assert batch.images.shape == (3, 3, S, S) and batch.images.dtype == torch.float32
        assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
        assert len(batch) == len(batch.targets) == len(batch.keys) == 3
        assert batch.sizes == [(W, H)] * 3 and batch.video is None and batch.frames is None
        for target in batch.targets:
            assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
            assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
            assert bool((target["labels"] >= 1).all())  # 1-based
            assert bool((target["boxes"] >= 0).all() and (target["boxes"] <= 1).all())


def test_same_seed_epoch_rank_gives_identical_batches(frame_shards):
    _assert_same_batches(_train(frame_shards, num_workers=2), _train(frame_shards, num_workers=2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_rest_of_the_uninterrupted_epoch(frame_shards, num_workers):
    full = _train(frame_shards, batches_per_epoch=7, num_workers=num_workers, streams=2)
    for k in (1, 3, 6, 7):
        resumed = _train(frame_shards, batches_per_epoch=7, num_workers=num_workers, streams=2, start_batch=k)
        _assert_same_batches(resumed, full[k:])


def test_batches_do_not_depend_on_num_workers(frame_shards):
    by_workers = [_train(frame_shards, batches_per_epoch=5, num_workers=n, streams=2) for n in (0, 1, 2)]
    _assert_same_batches(by_workers[0], by_workers[1])
    _assert_same_batches(by_workers[0], by_workers[2])


def test_epochs_and_seeds_and_ranks_differ(frame_shards):
    base = _train(frame_shards)
    for change in ({"epoch": 1}, {"seed": 4}, {"rank": 1, "world_size": 2}):
        other = _train(frame_shards, **change)
        assert [b.keys for b in other] != [b.keys for b in base], change
        assert not all(torch.equal(x.images, y.images) for x, y in zip(base, other)), change


def test_augmentation_is_seeded_per_sample(frame_shards):
    # Same samples in the same order, only the augmentation differs between seeds... and it
    # does not depend on the caller's global RNG state.
    torch.manual_seed(123)
    a = _train(frame_shards, batches_per_epoch=2)
    torch.manual_seed(999)
    before = torch.get_rng_state()
    b = _train(frame_shards, batches_per_epoch=2)
    assert torch.equal(torch.get_rng_state(), before)  # the training process's RNG is left alone
    _assert_same_batches(a, b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_exactly_batches_per_epoch(frame_shards, num_workers):
    # 20 samples in 3 uneven shards; 2 ranks; more batches than one pass of the data holds.
    for batches_per_epoch in (1, 5, 9):
        for rank in (0, 1):
            batches = _train(
                frame_shards, rank=rank, world_size=2, batches_per_epoch=batches_per_epoch, num_workers=num_workers
            )
            assert len(batches) == batches_per_epoch
    assert (
        len(
            train_loader(
                frame_shards,
                AugmentConfig(),
                image_size=S,
                rank=0,
                world_size=2,
                seed=0,
                epoch=0,
                batches_per_epoch=9,
                batch_size=2,
                num_workers=0,
                start_batch=4,
            )
        )
        == 5
    )


def test_first_pass_reads_each_sample_once_across_ranks(tmp_path):
    # 4 equal shards, 2 ranks x 2 streams: one pass of 32 samples is 8 batches of 2 per rank.
    # (A shuffle buffer would hold samples back, and the streams would reach into the next pass.)
    urls = write_frame_shards(tmp_path, [8, 8, 8, 8])
    keys = []
    for rank in (0, 1):
        for batch in _train(
            urls, rank=rank, world_size=2, batches_per_epoch=8, batch_size=2, num_workers=2, shuffle_buffer=1
        ):
            keys.extend(batch.keys)
    assert len(keys) == 32 and len(set(keys)) == 32


def test_few_shards_are_split_within_shards(tmp_path):
    # One shard, 2 ranks x 2 streams: each stream reads a quarter of it in its first pass.
    urls = write_frame_shards(tmp_path, [16])
    keys = []
    for rank in (0, 1):
        for batch in _train(
            urls, rank=rank, world_size=2, batches_per_epoch=4, batch_size=2, num_workers=2, shuffle_buffer=1
        ):
            keys.extend(batch.keys)
    assert sorted(keys) == sorted(f"s0_{i:04d}" for i in range(16))


@pytest.mark.parametrize("world_size, streams, shuffle_buffer", [(1, 2, 8), (2, 2, 8), (3, 2, 4), (1, 4, 64)])
def test_an_epoch_is_one_pass_over_shards_of_unequal_sizes(tmp_path, world_size, streams, shuffle_buffer):
    """Streams drew the same number of samples from parts of unequal sizes (whole shards), and a
    shuffle buffer held samples back at the epoch's end: the 2,000-image sample showed 1,826
    distinct images in an epoch, and a small shard's samples came 1.36 times as often as a large one's."""
    sizes = [9, 7, 5]
    urls = write_frame_shards(tmp_path, sizes)
    n, batch = sum(sizes), 2
    batches = -(-n // (batch * world_size))  # the training's batches_per_epoch
    for epoch in (0, 1):
        keys = []
        for rank in range(world_size):
            for b in _train(urls, rank=rank, world_size=world_size, epoch=epoch, batches_per_epoch=batches,
                            batch_size=batch, streams=streams, shuffle_buffer=shuffle_buffer):
                keys += b.keys
        assert len(set(keys)) == n, sorted(set(f"s{i}_{j:04d}" for i, c in enumerate(sizes) for j in range(c)) - set(keys))
        assert len(keys) - n < world_size * batch * streams  # only what rounds up to whole batches comes twice


def test_resume_skips_samples_before_decoding(frame_shards, monkeypatch):
    calls = []
    decode = samples_module._decode_image
    monkeypatch.setattr(samples_module, "_decode_image", lambda data, where: calls.append(where) or decode(data, where))
    full = _train(frame_shards, batches_per_epoch=6, streams=2)
    assert len(calls) == 6 * 3
    calls.clear()
    resumed = _train(frame_shards, batches_per_epoch=6, streams=2, start_batch=4)
    assert len(calls) == 2 * 3  # only the images of the two remaining batches are decoded
    _assert_same_batches(resumed, full[4:])


def test_train_clips(clip_shards):
    batches = _train(clip_shards, kind="clips", batches_per_epoch=3, batch_size=2, num_workers=2)
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (2, T, 3, S, S)
        assert all(len(per_clip) == T for per_clip in batch.targets)
        assert batch.video is not None and batch.frames is not None
        for key, video, numbers in zip(batch.keys, batch.video, batch.frames):
            assert key == f"{video}_{numbers[0]:06d}"
            assert numbers == list(range(numbers[0], numbers[0] + T))


def test_train_clips_resume(clip_shards):
    full = _train(clip_shards, kind="clips", batches_per_epoch=5, batch_size=2, num_workers=2)
    _assert_same_batches(
        _train(clip_shards, kind="clips", batches_per_epoch=5, batch_size=2, num_workers=2, start_batch=3), full[3:]
    )


# Sequence mode: a batch position walks through consecutive clips of one video.


def _runs(batches: list[Batch], position: int) -> list[list[tuple[str, list[int]]]]:
    """The clips at one batch position, cut where the run number changes."""
    runs: list[list[tuple[str, list[int]]]] = []
    numbers: list[int] = []
    for batch in batches:
        clip = (batch.video[position], batch.frames[position])
        if not numbers or batch.runs[position] != numbers[-1]:
            assert batch.runs[position] not in numbers  # a run is never resumed later
            numbers.append(batch.runs[position])
            runs.append([clip])
        else:  # a run goes on: the next clip of the same video
            assert runs and clip[0] == runs[-1][-1][0] and clip[1][0] == runs[-1][-1][1][-1] + 1
            runs[-1].append(clip)
    return runs


def _flipped(target: dict) -> bool:
    # _frame draws its boxes in the left half; a horizontal flip moves them to the right half.
    return bool(target["boxes"][0, 0] > 0.5)


def test_sequence_mode_walks_each_position_through_whole_runs(video_shards):
    limit = 3
    batches = _train(
        video_shards, kind="clips", batches_per_epoch=30, batch_size=2, streams=1, sequence_clips=limit
    )
    assert batches[0].runs[0] != batches[0].runs[1]
    for position in range(2):
        runs = _runs(batches, position)
        assert len(runs) > 6
        cut = 0
        for run in runs[:-1]:  # the last run may be cut by the end of the batches
            video, first = run[0][0], run[0][1][0]
            assert first % T == 0 and len(run) <= min(limit, VIDEO_CLIPS[video] - first // T)
            # A run starts at a video's start or where the previous run of the video stopped at
            # `limit` clips, and it stops at `limit` clips or at the video's end; or else the
            # position's slice of a pass over the data (5 of the 10 clips here) began or ended in it.
            cut += first // T % limit != 0 or len(run) != min(limit, VIDEO_CLIPS[video] - first // T)
        assert cut <= 2 * 6, (position, cut)  # 6 passes: 30 batches of a clip from 5-clip slices
    videos = {v for batch in batches for v in batch.video}
    assert videos == set(VIDEO_CLIPS)


def test_sequence_mode_augments_a_run_alike(video_shards):
    # Horizontal flips only: every clip of a run is flipped, or none is; runs differ.
    cfg = AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, crop_p=0.0, flip_p=0.5)
    loader = train_loader(
        video_shards, cfg, image_size=S, rank=0, world_size=1, seed=5, epoch=0, batches_per_epoch=40,
        batch_size=2, num_workers=0, kind="clips", streams=1, shuffle_buffer=4, sequence_clips=3,
    )  # fmt: skip
    batches = list(loader)
    seen = []
    for position in range(2):
        run_flips: list[set[bool]] = []
        for i, batch in enumerate(batches):
            if i == 0 or batch.runs[position] != batches[i - 1].runs[position]:
                run_flips.append(set())
            run_flips[-1] |= {_flipped(t) for t in batch.targets[position] if len(t["boxes"])}
        assert all(len(flips) <= 1 for flips in run_flips), run_flips
        seen += [f for flips in run_flips for f in flips]
    assert set(seen) == {True, False}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sequence_mode_resume_and_workers(video_shards, num_workers):
    kwargs = {"kind": "clips", "batches_per_epoch": 9, "batch_size": 2, "streams": 2, "sequence_clips": 2}
    full = _train(video_shards, num_workers=0, **kwargs)
    _assert_same_batches(_train(video_shards, num_workers=num_workers, **kwargs), full)
    _assert_same_batches(_train(video_shards, num_workers=num_workers, start_batch=5, **kwargs), full[5:])


def test_decode_sequence_transforms_the_clips_of_a_run_as_one(video_shards, tmp_path, monkeypatch):
    raws = [r for r in loader_module.read_raw_samples(video_shards[0], "clips") if r.key.startswith("v0_")]
    transform = train_transform(S, AugmentConfig(photometric_p=0.0, zoom_out_p=0.0, crop_p=0.0, flip_p=0.5))
    flips_seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        clips = loader_module.decode_sequence(raws, transform)
        assert [c.frames for c in clips] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
        flips = {_flipped(t) for c in clips for t in c.target if len(t["boxes"])}
        assert len(flips) == 1  # one draw for the whole run
        flips_seen |= flips
    assert flips_seen == {True, False}
    # Clips of one video stored at two image sizes can't be one sequence.
    monkeypatch.setattr(sys.modules[__name__], "W", 40)
    small = write_clip_shards(tmp_path, [[("v0", 12)]])
    raw = next(loader_module.read_raw_samples(small[0], "clips"))
    with pytest.raises(ValueError, match="different sizes"):
        loader_module.decode_sequence([raws[0], raw], transform)


@pytest.mark.parametrize("world_size,streams", [(1, 4), (2, 2)])
def test_sequence_mode_keeps_runs_consecutive_with_more_streams_than_shards(tmp_path, world_size, streams):
    # Two shards for four streams in the job: the shards are cut into units, and a unit must
    # still hold consecutive clips (every other clip of a shard could carry no state at all).
    urls = write_clip_shards(tmp_path, [[(v, T * i) for v in ("a", "b") for i in range(10)],
                                        [(v, T * i) for v in ("c", "d") for i in range(10)]])
    continued = 0
    for rank in range(world_size):
        batches = _train(urls, kind="clips", batches_per_epoch=10 * streams, batch_size=2, streams=streams,
                         sequence_clips=3, rank=rank, world_size=world_size)
        for stream in range(streams):
            for position in range(2):
                runs = _runs(batches[stream::streams], position)  # asserts each run's clips follow each other
                continued += sum(len(run) - 1 for run in runs)
    assert continued > 20


def test_sequence_mode_cuts_runs_at_a_jump_or_a_new_segment(tmp_path):
    # One video: clips 0, 3, then a jump to 12, 15; then a new segment (the frame size changed
    # in the source) whose numbers go on at 18.
    urls = write_clip_shards(tmp_path, [[("v", 0), ("v", 3), ("v", 12), ("v", 15), ("v", 18)]])
    path = Path(urls[0])
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            meta = json.loads(sample["json"])
            meta["segment"] = int(meta["frames"][0] >= 18)
            sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            sample["json"] = json.dumps(meta).encode()
            writer.write(sample)
    batches = _train(urls, kind="clips", batches_per_epoch=12, batch_size=1, streams=1, shuffle_buffer=1,
                     sequence_clips=5)
    runs = _runs(batches, 0)
    firsts = [[clip[1][0] for clip in run] for run in runs]
    assert firsts[:3] == [[0, 3], [12, 15], [18]]


def test_carry_keeps_states_until_overlapping_clips_continue_them(tmp_path):
    # Clips overlap (stride 1, length T = 3): a clip's continuation is T clips later in its run,
    # T batches of its stream, so T * streams micro-batches later. Every continuation inside a
    # run must find its state.
    urls = write_clip_shards(tmp_path, [[("v", f) for f in range(12)], [("w", f) for f in range(9)]])
    streams, limit = 2, 6
    batches = _train(urls, kind="clips", batches_per_epoch=24, batch_size=1, streams=streams, sequence_clips=limit)
    carry = StateCarry(keep=carry_keep(streams, limit))
    carried = expected = 0
    ends: dict[int, set[tuple[str, int]]] = {}  # per run: (video, last frame) of its clips so far
    for batch in batches:
        starts, nexts = clip_keys(batch.video, batch.frames, batch.runs)
        _, n = carry.take((torch.zeros(1, 1),), starts)
        carried += n
        run, video, first = batch.runs[0], batch.video[0], batch.frames[0][0]
        expected += (video, first - 1) in ends.get(run, set())
        ends.setdefault(run, set()).add((video, batch.frames[0][-1]))
        carry.put((torch.zeros(1, 1),), nexts)
    assert expected >= 6 and carried == expected


def test_sequence_mode_needs_clips(frame_shards):
    with pytest.raises(ValueError, match="sequence_clips needs kind 'clips'"):
        _train(frame_shards, sequence_clips=2)


def test_train_frames_from_clips(clip_shards):
    # 9 clips of 3 frames: 27 frame samples; one pass with 1 stream and batches of 3.
    batches = _train(clip_shards, kind="frames_from_clips", batches_per_epoch=9, batch_size=3, shuffle_buffer=1)
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys)) == 27
    for batch in batches:
        assert batch.images.shape == (3, 3, S, S)
        for key, video, numbers in zip(batch.keys, batch.video, batch.frames):
            clip, t = key.split("/")
            assert clip.startswith(video + "_") and numbers == [int(clip[-6:]) + int(t)]


# ---------------------------------------------------------------------------------------------
# Collate


def _sample(n_boxes: int, key: str) -> Sample:
    target = {
        "boxes": torch.rand(n_boxes, 4),
        "labels": torch.arange(1, n_boxes + 1),
        "difficult": torch.zeros(n_boxes, dtype=torch.bool),
    }
    return Sample(torch.rand(3, 8, 8), target, key, (10, 20))


def test_collate_handles_zero_and_varying_box_counts():
    samples = [_sample(0, "a"), _sample(3, "b"), _sample(1, "c")]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 8, 8)
    assert [len(t["boxes"]) for t in batch.targets] == [0, 3, 1]
    assert batch.targets[0]["boxes"].shape == (0, 4)
    assert batch.keys == ["a", "b", "c"] and batch.sizes == [(10, 20)] * 3
    assert_close(batch.images[1], samples[1].image)


def test_collate_rejects_clips_of_different_lengths():
    a = Sample(torch.rand(2, 3, 8, 8), [], "a", (8, 8), "v", [0, 1])
    b = Sample(torch.rand(3, 3, 8, 8), [], "b", (8, 8), "v", [0, 1, 2])
    with pytest.raises(InputError, match="different shapes"):  # a stage's one-line error, not a traceback
        collate([a, b])


def test_batch_to_moves_targets():
    batch = collate([_sample(2, "a")]).to("cpu")
    assert batch.targets[0]["labels"].tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------
# Evaluation


def _eval(urls, kind="frames", world_size=1, num_workers=0, batch_size=3) -> list[list[Batch]]:
    return [
        list(
            eval_loader(
                urls,
                image_size=S,
                rank=r,
                world_size=world_size,
                batch_size=batch_size,
                num_workers=num_workers,
                kind=kind,
            )
        )
        for r in range(world_size)
    ]


def test_eval_frames_each_sample_once_in_order(frame_shards):
    (single,) = _eval(frame_shards)
    order = [k for b in single for k in b.keys]
    expected = (
        [f"s0_{i:04d}" for i in range(7)] + [f"s1_{i:04d}" for i in range(2)] + [f"s2_{i:04d}" for i in range(11)]
    )
    assert order == expected
    ranks = _eval(frame_shards, world_size=2, num_workers=2)
    for r, batches in enumerate(ranks):
        assert [k for b in batches for k in b.keys] == expected[r::2]  # every world_size-th sample


def test_eval_frames_targets_are_exact(frame_shards):
    (batches,) = _eval(frame_shards)
    seen_counts = set()
    for number, (target, size) in enumerate((t, s) for b in batches for t, s in zip(b.targets, b.sizes)):
        _, boxes = _frame(number)
        assert size == (W, H)
        expected = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / torch.tensor([W, H, W, H])
        assert_close(target["boxes"], expected)
        assert target["labels"].tolist() == [number % 4 + b + 1 for b in range(len(boxes))]
        assert target["difficult"].tolist() == [b == 1 for b in range(len(boxes))]
        seen_counts.add(len(boxes))
    assert seen_counts == {0, 1, 2}


def test_eval_decodes_rgb_and_grey(tmp_path):
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    grey = np.full((H, W), 128, np.uint8)
    meta = json.dumps({"id": "x", "width": W, "height": H, "boxes": [], "labels": [], "difficult": []}).encode()
    path = tmp_path / "test-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "red", "png": _png(red), "json": meta})
        writer.write({"__key__": "grey", "png": _png(grey), "json": meta})
    (batches,) = _eval([str(path)], batch_size=2)
    images = batches[0].images
    assert_close(images[0].mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]))  # RGB order
    assert_close(images[1].mean(dim=(1, 2)), torch.full((3,), 128 / 255))  # grey -> 3 channels


def test_eval_clips_whole_videos_in_order(clip_shards):
    ranks = _eval(clip_shards, kind="clips", world_size=2, batch_size=2, num_workers=2)
    all_clips, videos_per_rank = [], []
    for batches in ranks:
        clips = [(v, f[0]) for b in batches for v, f in zip(b.video, b.frames)]
        assert clips == sorted(clips)  # by (video, first frame)
        for b in batches:
            assert b.images.shape[1:] == (T, 3, S, S)
            assert all(len(t) == T for t in b.targets)
        videos_per_rank.append({v for v, _ in clips})
        all_clips.extend(clips)
    assert not videos_per_rank[0] & videos_per_rank[1]  # a video lives on one rank
    assert sorted(all_clips) == sorted(
        [
            ("vidb", 0),
            ("vidb", 2),
            ("vidb", 4),
            ("vida", 10),
            ("vida", 12),
            ("vidc", 0),
            ("vida", 14),
            ("vidd", 3),
            ("vidd", 5),
        ]
    )
    assert sorted(len(x) for x in videos_per_rank) == [2, 2]  # 3+3 clips vs 1+2: balanced


def test_eval_frames_from_clips_each_frame_once(clip_shards):
    ranks = _eval(clip_shards, kind="frames_from_clips", world_size=2, num_workers=0)
    frames = []
    for batches in ranks:
        mine = [(v, f[0]) for b in batches for v, f in zip(b.video, b.frames)]
        assert mine == sorted(mine)
        frames.extend(mine)
    expected = (
        {("vidb", n) for n in range(7)}
        | {("vida", n) for n in range(10, 17)}
        | {("vidc", n) for n in range(3)}
        | {("vidd", n) for n in range(3, 8)}
    )
    assert len(frames) == len(expected) and set(frames) == expected  # overlapping clips: no duplicates
    (single,) = _eval(clip_shards, kind="frames_from_clips")
    for b in single:
        for target, numbers in zip(b.targets, b.frames):
            assert len(target["boxes"]) == numbers[0] % 3  # the frame's own annotation


# ---------------------------------------------------------------------------------------------
# Errors at the boundary


def test_kind_mismatch_is_reported(frame_shards, clip_shards):
    with pytest.raises(ValueError, match="clip sample in a frames loader"):
        _eval(clip_shards, kind="frames")
    with pytest.raises(ValueError, match="not a clip sample"):
        _eval(frame_shards, kind="clips")
    with pytest.raises(ValueError, match="clip sample in a frames loader"):
        _train(clip_shards, kind="frames")


def test_bad_box_names_the_sample(tmp_path):
    meta = {"id": "x", "width": W, "height": H, "boxes": [[0, 0, W + 10, 5]], "labels": [0], "difficult": [False]}
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write(
            {"__key__": "badbox", "png": _png(np.zeros((H, W, 3), np.uint8)), "json": json.dumps(meta).encode()}
        )
    with pytest.raises(ValueError, match="badbox.*outside"):
        _eval([str(path)])


def test_shards_without_samples_are_an_error_not_a_hang(tmp_path):
    path = tmp_path / "empty-000000.tar"
    wds.TarWriter(str(path)).close()
    with pytest.raises(ValueError, match="no samples"):
        _train([str(path)], batches_per_epoch=1)


def test_bad_arguments_are_rejected(frame_shards):
    with pytest.raises(ValueError, match="multiple of num_workers"):
        _train(frame_shards, num_workers=2, streams=3)
    with pytest.raises(ValueError, match="start_batch"):
        _train(frame_shards, start_batch=7)
    with pytest.raises(ValueError, match="kind"):
        _train(frame_shards, kind="video")


# ---------------------------------------------------------------------------------------------
# Two processes under accelerate launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_get_equal_batches_and_different_data(tmp_path, frame_shards):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(REPO / "tests" / "loader_ddp_worker.py"),
        "--out", str(out), "--batches", "7", "--batch-size", "2", "--workers", "2", "--shuffle-buffer", "1",
        *frame_shards,
    ]  # fmt: skip
    # A rank with fewer batches would leave the other blocked in its per-step all_reduce:
    # the timeout turns that hang into a failure.
    log = tmp_path / "launch.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            # The launcher forwards SIGTERM to the ranks (each runs in its own session).
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail("the two ranks did not finish (hang at the end of the epoch?):\n" + log.read_text()[-3000:])
    assert proc.returncode == 0, log.read_text()[-5000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["batches"] == [7, 7]
    assert result["steps"] == 7  # the per-step all_reduce ran 7 times on both ranks
    keys = result["keys"]
    assert all(len(k) == 14 for k in keys)
    # Different data: the 4 streams of the job (2 ranks x 2 workers) read 4 disjoint slices of
    # the shards; without a shuffle buffer, each stream's first sample (batch 0 comes from
    # stream 0, batch 1 from stream 1) is the first of its slice.
    assert keys[0] != keys[1]
    firsts = [{k[0], k[2]} for k in keys]
    assert len(firsts[0]) == len(firsts[1]) == 2 and not firsts[0] & firsts[1]


AFTER_OPENCV_THREADS = """
import sys
import cv2
from shardgen import write_frame_dataset
from pipeline.datasets import read_manifest
from ssd.data.loader import batches, eval_loader
from pathlib import Path
shards = write_frame_dataset(Path(sys.argv[1]), {"val": [5]})
""" + RUN_OPENCV_POOL + """
loader = eval_loader(read_manifest(shards).shard_paths("val"), image_size=32, rank=0, world_size=1,
                     batch_size=2, num_workers=1)
print(sum(b.images.shape[0] for b in batches(loader)), cv2.getNumThreads())
"""


def test_loader_workers_start_after_opencv_threads_ran_in_the_parent(tmp_path):
    """A worker forked from a process whose OpenCV pool had run waited for ever in its start's
    cv2.setNumThreads (it hung CI in the training stream): batches() stops the pool for the fork."""
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", AFTER_OPENCV_THREADS, str(tmp_path / "shards")], cwd=tests.parent,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5", "2"]


def _tar(path: Path, members: list[str]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name in members:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))


def test_a_shard_rewritten_with_its_size_and_time_is_counted_again(tmp_path):
    """The count cache was keyed on (path, size, mtime): tar pads to 10 KiB records, so a shard
    rewritten in place with one sample fewer often keeps its size, and `cp -p` or `rsync -t` keep
    the time; its last sample was then never read."""
    shard = tmp_path / "train-000000.tar"
    _tar(shard, ["a.jpg", "a.json", "b.jpg", "b.json"])
    stat = shard.stat()
    assert count_samples(str(shard)) == 2
    shard.unlink()  # a new file (rsync's temporary-and-rename), one sample
    _tar(shard, ["a.jpg", "a.json"])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    assert count_samples(str(shard)) == 1
    with open(shard, "r+b") as f:  # the same file rewritten in place: its inode stays, its ctime moves
        _tar(tmp_path / "two.tar", ["a.jpg", "a.json", "b.jpg", "b.json"])
        f.write((tmp_path / "two.tar").read_bytes())
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert count_samples(str(shard)) == 2


def _drawn_keys(monkeypatch, urls, *, world_size, batches, batch_size, streams, kind="frames", sequence_clips=0,
                shuffle_buffer=3, epoch=0):
    """The raw sample keys the whole job draws in one epoch (decoding stubbed out: keys only)."""
    import ssd.data.train_streams as ts

    class Stub:
        def __init__(self, key):
            self.key, self.run = key, None

    monkeypatch.setattr(ts, "decode_sample", lambda item, *a: Stub(item.key))
    monkeypatch.setattr(ts, "decode_sequence", lambda raws, *a: [Stub(r.key) for r in raws])
    monkeypatch.setattr(ts, "collate", lambda samples: [s.key for s in samples])
    keys = []
    for rank in range(world_size):
        for batch in ts.train_loader(urls, AugmentConfig(), image_size=32, rank=rank, world_size=world_size, seed=0,
                                     epoch=epoch, batches_per_epoch=batches, batch_size=batch_size, num_workers=0,
                                     streams=streams, shuffle_buffer=shuffle_buffer, kind=kind,
                                     sequence_clips=sequence_clips):
            keys += batch
    return keys


@pytest.mark.parametrize("sizes", [[1], [3], [1, 5], [2, 0, 3], [7, 1, 1, 1]])
def test_tiny_data_is_still_one_pass_an_epoch(tmp_path, monkeypatch, sizes):
    """With fewer samples than the job's streams, every pass went round the shards twice and the
    streams' slices outgrew their draws: [3] on 2 processes x 2 streams drew 2 of its 3 samples."""
    import itertools
    import math

    urls = write_frame_shards(tmp_path, sizes)
    total = sum(sizes)
    for world, streams, batch in itertools.product([1, 2, 3], [1, 2, 4], [1, 2]):
        batches = math.ceil(total / (batch * world))
        keys = _drawn_keys(monkeypatch, urls, world_size=world, batches=batches, batch_size=batch, streams=streams)
        assert len(keys) == batches * batch * world and len(set(keys)) == total, (world, streams, batch)


def test_frames_from_clips_is_one_pass_over_the_frames_an_epoch(tmp_path, monkeypatch):
    """The loader cut the streams' slices in clips but drew frames: a stream whose slice ended
    inside a clip dropped the rest of its frames (38 of 42 frames in the first epoch)."""
    import math

    urls = write_clip_shards(tmp_path, [[("a", T * i) for i in range(5)], [("b", T * i) for i in range(9)]])
    slots = 14 * T
    for world, streams, batch in ((2, 2, 2), (1, 2, 4), (3, 1, 2)):
        batches = math.ceil(slots / (batch * world))
        keys = _drawn_keys(monkeypatch, urls, world_size=world, batches=batches, batch_size=batch, streams=streams,
                           kind="frames_from_clips")
        assert len(set(keys)) == slots, (world, streams, batch)


@pytest.mark.parametrize("world", [1, 2])
def test_sequence_mode_is_one_pass_over_the_clips_an_epoch(tmp_path, monkeypatch, world):
    """Lanes part-way through a run at the end of the epoch left its clips undrawn, and other lanes
    took clips of the next pass: 158 of 162 clips on 1 process, 151 on 2."""
    import math

    lengths = [20, 15, 30, 12, 25, 18, 22, 20]
    videos = [(f"v{i}", n) for i, n in enumerate(lengths)]
    urls = write_clip_shards(tmp_path, [[(v, T * i) for v, n in videos[:4] for i in range(n)],
                                        [(v, T * i) for v, n in videos[4:] for i in range(n)]])
    batches = math.ceil(sum(lengths) / (4 * world))
    for epoch in range(2):
        keys = _drawn_keys(monkeypatch, urls, world_size=world, batches=batches, batch_size=4, streams=2,
                           kind="clips", sequence_clips=6, shuffle_buffer=128, epoch=epoch)
        assert len(set(keys)) == sum(lengths), epoch


def test_clip_frames_with_upper_case_suffixes_are_counted(tmp_path):
    """WebDataset lower-cases member suffixes; the header count didn't, and counted 0 frames."""
    shard = tmp_path / "train-000000.tar"
    _tar(shard, ["a.000.JPG", "a.001.JPG", "a.json", "b.000.jpg", "b.001.jpg", "b.json"])
    assert count_samples(str(shard), "frames_from_clips") == 4 and count_samples(str(shard)) == 2


def test_every_unit_gets_its_turn_however_many_units(tmp_path, monkeypatch):
    """A unit whose slice is empty gets data by pass `units` at the latest (the slices rotate); the
    give-up limit was a fixed number of passes, below that for jobs of many units."""
    import ssd.data.train_streams as ts

    monkeypatch.setattr(ts, "_MAX_EMPTY_PASSES", 1)
    urls = write_frame_shards(tmp_path, [1])
    keys = _drawn_keys(monkeypatch, urls, world_size=4, batches=1, batch_size=1, streams=1)
    assert len(keys) == 4 and set(keys) == {keys[0]}


@pytest.mark.parametrize("kind, sequence_clips", [("frames", 0), ("frames_from_clips", 0), ("clips", 3)])
def test_a_slice_is_read_from_its_sample_on_with_the_same_batches(tmp_path, monkeypatch, kind, sequence_clips):
    """Each stream (in sequence mode, each batch position) read its shard from the start to its
    slice: 8 lanes on one 200-clip shard parsed 1,747 samples an epoch. A local shard is now
    entered at the slice's first sample (its header offset, from the count's scan of the headers)."""
    import ssd.data.train_streams as ts

    if kind == "frames":
        urls = write_frame_shards(tmp_path, [30, 17])
    else:
        urls = write_clip_shards(tmp_path, [[("a", T * i) for i in range(20)], [("b", T * i) for i in range(9)]])
    parsed = [0]
    real = ts._tar_samples

    def counting(url, start=0):
        for sample in real(url, start):
            parsed[0] += 1
            yield sample

    monkeypatch.setattr(ts, "_tar_samples", counting)
    kwargs = {"world_size": 2, "batches": 6, "batch_size": 4, "streams": 2, "kind": kind,
              "sequence_clips": sequence_clips}
    seeking = _drawn_keys(monkeypatch, urls, **kwargs)
    seeking_parsed, parsed[0] = parsed[0], 0
    monkeypatch.setattr(ts, "seek_point", lambda url, kind, skip: (0, 0))
    assert _drawn_keys(monkeypatch, urls, **kwargs) == seeking
    assert seeking_parsed < 0.75 * parsed[0], (seeking_parsed, parsed[0])  # 53 of 97, 21 of 43, 87 of 347
