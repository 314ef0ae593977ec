"""One optimiser step of the training loop (pipeline.training.step), in process."""

from __future__ import annotations

import pytest
import torch

from shardgen import write_frame_dataset


@pytest.fixture(params=[0])
def tiny_run(tmp_path, request):
    from pipeline.device import reset_accelerate

    from pipeline.config import from_dict
    from pipeline.train import TrainConfig
    from pipeline.training.setup import setup

    shards = write_frame_dataset(tmp_path / "shards", {"train": [8]})
    cfg = from_dict(TrainConfig, {
        "name": "tiny", "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
        "data": {"shards": str(shards), "batch_size": 2, "num_workers": request.param,
                 "streams": max(1, request.param), "shuffle_buffer": 4},
        "steps": 4, "validation": {"every": 0}, "ema": {"enabled": True, "decay": 0.9},
        **{f"{d}_dir": str(tmp_path / d) for d in ("models", "metrics", "plots", "runs", "checkpoints")},
    })
    try:
        yield setup(cfg, restart=True)
    finally:
        reset_accelerate()


def test_a_step_the_loss_scaler_skips_leaves_the_ema_alone(tiny_run, monkeypatch):
    """With fp16 the gradient scaler skips the update when the scaled gradients overflow (on a GPU
    the first few steps of SSDLite do): the EMA must not average the unchanged weights in."""
    from accelerate import Accelerator

    from pipeline.training.stream import micro_batches
    from pipeline.training.signals import StopFlag
    from pipeline.training.step import step

    r = tiny_run
    stream = micro_batches(r, 0)
    with StopFlag() as stop:
        step(r, stream, stop)
        assert int(r.ema.n_averaged) == 1  # a step that was taken moves the average
        before = {k: v.clone() for k, v in r.ema.state_dict().items()}
        monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
        step(r, stream, stop)
    after = r.ema.state_dict()
    assert int(after["n_averaged"]) == 1
    assert all(torch.equal(before[k], after[k]) for k in before)


def keys_of(stream, count: int) -> list[list[str]]:
    return [list(next(stream).keys) for _ in range(count)]


def test_the_next_epochs_loader_starts_before_this_epoch_ends_and_the_batches_stay_the_same(tiny_run, monkeypatch):
    """On an H200 each epoch boundary paused the loop about 1.5 s while new workers forked and
    filled up: the next epoch's loader now starts LEAD batches early, with the same batches."""
    from pipeline.training import stream

    r = tiny_run
    per_epoch = r.batches_per_epoch
    assert per_epoch == 4  # 8 samples, batch 2
    events = []
    real_loader = stream._loader
    monkeypatch.setattr(stream, "_loader", lambda r, rank, world, epoch, start: events.append(("start", epoch))
                        or real_loader(r, rank, world, epoch, start))
    got = []
    micro = stream.micro_batches(r, 1)  # a resumed run: from the second batch of epoch 0
    for _ in range(per_epoch * 2 + 1):
        got.append(list(next(micro).keys))
        events.append(("batch", len(got)))
    micro.close()
    # epoch 1's loader starts when LEAD (2) batches of epoch 0 are left after the one on its way:
    # at once for a run resumed at position 1 (batches 1-3 are epoch 0's last three), and at
    # epoch 1's second batch (the fifth) for epoch 2
    assert events[:3] == [("start", 0), ("start", 1), ("batch", 1)]
    assert events.index(("batch", 4)) < events.index(("start", 2)) < events.index(("batch", 5))
    monkeypatch.setattr(stream, "LEAD", -per_epoch)  # never early: one loader after the other
    events.clear()
    assert keys_of(stream.micro_batches(r, 1), len(got)) == got
    assert [e for e in events if e[0] == "start"] == [("start", 0), ("start", 1), ("start", 2)]


@pytest.mark.parametrize("tiny_run", [1], indirect=True)
def test_a_stream_closed_with_the_next_epoch_started_stops_its_workers(tiny_run, monkeypatch):
    from pipeline.training import stream

    started = []
    real_started = stream._started
    monkeypatch.setattr(stream, "_started", lambda *a: started.append(real_started(*a)) or started[-1])
    micro = stream.micro_batches(tiny_run, 0)
    for _ in range(tiny_run.batches_per_epoch - 1):
        next(micro)
    assert len(started) == 2  # this epoch's and the next one's
    workers = [w for it in started for w in it._workers]
    assert workers and all(w.is_alive() for w in workers)
    micro.close()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
