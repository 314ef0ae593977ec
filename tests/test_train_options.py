"""The GPU-oriented training options (``tf32``, ``channels_last``, ``compile``), run in-process
on the CPU: each does what it says and leaves the result as a plain run's."""

from __future__ import annotations

import csv

import pytest
import torch

from test_train import TRAIN, workdir
from ssd.model_file import load_model_file

PLAIN = {**TRAIN, "steps": 4, "checkpoint_every": 4, "log_every": 1, "trace": False, "validation": {"every": 0},
         "data": {**TRAIN["data"], "num_workers": 0}}


def train_in_process(cwd, monkeypatch, **overrides):
    """Train ``PLAIN`` with ``overrides`` in ``cwd``; the model file's state dict and the logged losses."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict

    monkeypatch.chdir(cwd)
    cfg = from_dict(train_mod.TrainConfig, {**PLAIN, **overrides})
    try:
        train_mod.train(cfg)
    finally:
        reset_accelerate()
    model, _ = load_model_file(cwd / "models" / "tiny.pt")
    rows = list(csv.DictReader(open(cwd / "plots" / "train-tiny.csv")))
    return model.state_dict(), [float(row["loss"]) for row in rows]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return train_in_process(workdir(tmp_path_factory.mktemp("plain") / "run"), mp)
    finally:
        mp.undo()


def test_channels_last_feeds_the_model_nhwc_and_writes_the_same_model(plain, tmp_path, monkeypatch, caplog):
    import pipeline.training.setup as setup_mod

    seen = []
    real_build = setup_mod.build

    def spying_build(cfg, classes):
        model = real_build(cfg, classes)
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(
            lambda mod, args: seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                                           mod.weight.is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(setup_mod, "build", spying_build)
    weights, losses = train_in_process(workdir(tmp_path / "run"), monkeypatch, channels_last=True)
    assert seen and all(images and weight for images, weight in seen)  # every training forward in NHWC
    assert weights.keys() == plain[0].keys()
    # The first step's loss (before any update) agrees to 1e-4. Later steps are not compared: the
    # CPU's NHWC batch norm is less exact (docs/training.md), and this tiny model's batch norms
    # over 1x1 maps turn that into a 10% difference in the first convolution's gradient.
    assert losses[0] == pytest.approx(plain[1][0], rel=1e-4)
    assert any("channels_last on a CPU" in r.getMessage() for r in caplog.records)  # said, not silent


def test_compile_goes_through_accelerate_and_changes_nothing_but_the_speed(plain, tmp_path, monkeypatch):
    """Dynamo's ``eager`` backend (graph capture without code generation, quick on a CPU): the
    model file has the plain run's keys (no ``_orig_mod.`` prefix) and its weights."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = []
    real_compile = torch.compile

    def spying_compile(model, **kwargs):
        compiled.append(kwargs.get("backend"))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spying_compile)
    weights, losses = train_in_process(workdir(tmp_path / "run"), monkeypatch, compile="eager")
    assert compiled == ["eager"]
    assert weights.keys() == plain[0].keys()
    worst = max((weights[k].float() - plain[0][k].float()).abs().max().item() for k in weights)
    assert worst < 1e-5
    assert losses == pytest.approx(plain[1], rel=1e-5)


@pytest.mark.parametrize("tf32, expected", [(True, "tf32"), (False, "ieee")])
def test_tf32_sets_torchs_float32_precision_for_cuda(tf32, expected, tmp_path, monkeypatch):
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        train_in_process(workdir(tmp_path / "run"), monkeypatch, tf32=tf32, steps=1, checkpoint_every=1)
        assert torch.backends.cuda.matmul.fp32_precision == expected
        assert torch.backends.cudnn.conv.fp32_precision == expected
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_a_compile_backend_other_than_the_launchers_is_a_one_line_error(tmp_path, monkeypatch):
    from pipeline.stage import StageError

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(StageError, match=r"^compile is 'eager' but the launcher asks for 'INDUCTOR' \(accelerate config, "
                                         r"accelerate launch --dynamo_backend or ACCELERATE_DYNAMO_BACKEND\)"):
        train_in_process(workdir(tmp_path / "run"), monkeypatch, compile="eager")


def test_colour_left_to_the_device_trains_on_the_worker_paths_images(tmp_path, monkeypatch):
    """``photometric_device``: the training process makes the colour change the workers drew; the
    logged losses are those of workers that make it themselves (same images, same boxes)."""
    from ssd.data.transforms import DeviceColour

    calls = []
    real_call = DeviceColour.__call__

    def spying_call(self, images, targets):
        calls.append(images.shape[0])
        return real_call(self, images, targets)

    monkeypatch.setattr(DeviceColour, "__call__", spying_call)
    late = {**PLAIN["data"], "augment": {"photometric_first": False, "photometric_p": 1.0}}
    _, worker = train_in_process(workdir(tmp_path / "worker"), monkeypatch, data=late)
    assert calls == []
    deferred = {**late, "augment": {**late["augment"], "photometric_device": True}}
    _, device = train_in_process(workdir(tmp_path / "device"), monkeypatch, data=deferred)
    assert calls == [PLAIN["data"]["batch_size"]] * PLAIN["steps"]
    assert device[0] == pytest.approx(worker[0], rel=1e-5)  # the first step: before rounding can compound
    assert device == pytest.approx(worker, rel=1e-3)
