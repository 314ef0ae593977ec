"""Device and precision: the launcher's mixed precision is honoured, conflicts stop the run, and
NVIDIA GPUs torch can't use are reported loudly."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline import device
from pipeline.config import ConfigError


@pytest.mark.parametrize("section, launcher, expected", [
    (None, None, None),        # nobody chose: Accelerate's default (full precision)
    (None, "bf16", None),      # the launcher chose: Accelerator reads it from the environment
    ("bf16", None, "bf16"),
    ("bf16", "bf16", "bf16"),
    ("bf16", "no", "bf16"),    # accelerate launch says "no" when nothing was chosen
])
def test_resolved_precision(monkeypatch, section, launcher, expected):
    if launcher is None:
        monkeypatch.delenv(device.PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(device.PRECISION_ENV, launcher)
    assert device.resolve_mixed_precision(section, "train.mixed_precision") == expected


def test_a_section_and_a_launcher_that_disagree_stop_the_run(monkeypatch):
    monkeypatch.setenv(device.PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError) as e:
        device.resolve_mixed_precision("no", "train.mixed_precision")
    assert "train.mixed_precision is 'no' but the launcher asks for 'fp16'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPUs are usable here")
def test_gpus_torch_cannot_use_are_reported(tmp_path, caplog):
    for i in range(2):
        (tmp_path / f"nvidia{i}").touch()
    (tmp_path / "nvidiactl").touch()  # not a GPU
    problem = device.unusable_gpus(str(tmp_path / "nvidia[0-9]*"))
    assert problem.startswith(f"2 NVIDIA GPU device(s) found ({tmp_path}/nvidia0, {tmp_path}/nvidia1) but torch ")
    assert device.unusable_gpus(str(tmp_path / "none[0-9]*")) is None

    class FakeAccelerator:
        device, num_processes, mixed_precision, is_main_process = torch.device("cpu"), 1, "no", True

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(device, "unusable_gpus", lambda: problem)
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.device"):
            device.report(FakeAccelerator(), "training x")
    finally:
        monkeypatch.undo()
    assert "training x on cpu (CPU), 1 process(es), mixed precision no" in caplog.text
    assert f"NOT USING THE GPUs: {problem}; running on the CPU" in caplog.text
