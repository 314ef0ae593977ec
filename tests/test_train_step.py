"""One optimiser step of the training loop (pipeline.training.step), in process."""

from __future__ import annotations

import pytest
import torch

from shardgen import write_frame_dataset


@pytest.fixture
def tiny_run(tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    from pipeline.config import from_dict
    from pipeline.train import TrainConfig
    from pipeline.training.setup import setup

    shards = write_frame_dataset(tmp_path / "shards", {"train": [8]})
    cfg = from_dict(TrainConfig, {
        "name": "tiny", "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
        "data": {"shards": str(shards), "batch_size": 4, "num_workers": 0, "streams": 1, "shuffle_buffer": 4},
        "steps": 4, "validation": {"every": 0}, "ema": {"enabled": True, "decay": 0.9},
        **{f"{d}_dir": str(tmp_path / d) for d in ("models", "metrics", "plots", "runs", "checkpoints")},
    })
    try:
        yield setup(cfg, restart=True)
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def test_a_step_the_loss_scaler_skips_leaves_the_ema_alone(tiny_run, monkeypatch):
    """With fp16 the gradient scaler skips the update when the scaled gradients overflow (on a GPU
    the first few steps of SSDLite do): the EMA must not average the unchanged weights in."""
    from accelerate import Accelerator

    from pipeline.training.setup import micro_batches
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
