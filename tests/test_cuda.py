"""The CUDA paths: training in each precision through Accelerate, post-processing, evaluation
and LSTM-SSD streaming on the GPU against the CPU, a GPU-trained model file on a CPU-only machine.

Skipped without CUDA, and never needed by ``.ci/run``. ``SSD_GPU_TESTS_ON_CPU=1`` runs them on
the CPU instead (``scripts/gpu_check.sh --dry-run``): the GPU-against-CPU comparisons then compare
the CPU with itself, which proves only that the tests run, so that a session with a GPU spends
its minutes measuring rather than debugging the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from shardgen import CLASSES, write_frame_dataset
from test_lstm_ssd import assert_streaming_equals_clip
from ssd.loss import MultiBoxLoss
from ssd.model_file import save_model_file
from ssd.models import build_model
from ssd.postprocess import PostprocessConfig, PostProcessor

ROOT = Path(__file__).resolve().parents[1]

if torch.cuda.is_available():
    DEVICE: str | None = "cuda"
elif os.environ.get("SSD_GPU_TESTS_ON_CPU") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (SSD_GPU_TESTS_ON_CPU=1 runs them on the CPU)"),
]

NUM_CLASSES = len(CLASSES) + 1
#: (arch, batch, frames per clip): the three model families at their real input sizes.
MODELS = {
    "ssd300_vgg16": ({"name": "ssd300_vgg16", "image_size": 300}, 2, 0),
    "ssdlite": ({"name": "ssdlite_mobilenet_v2", "image_size": 320}, 4, 0),
    "lstm_ssd": ({"name": "lstm_ssd_mobilenet_v2", "image_size": 320}, 2, 3),
}


def random_targets(count: int, boxes: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(count)
    out = []
    for _ in range(count):
        xy = torch.rand(boxes, 2, generator=g) * 0.6
        wh = 0.1 + torch.rand(boxes, 2, generator=g) * 0.3
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, NUM_CLASSES, (boxes,), generator=g)})
    return out


def accelerator_for(precision: str):
    from accelerate import Accelerator
    from pipeline.device import reset_accelerate

    reset_accelerate()
    return Accelerator(cpu=DEVICE == "cpu", mixed_precision=precision)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_in_each_precision(name, precision):
    """Three optimiser steps through Accelerate: finite float32 losses, weights that change. With
    fp16 the loss scaler starts at 2**16, where small random-init models overflow in the backward
    pass: a skipped step must halve the scale, and the scaler must step within 12 tries (measured
    on an H200: SSDLite and LSTM-SSD skip at least their first three)."""
    if precision == "fp16" and DEVICE == "cpu":
        pytest.skip("fp16 mixed precision needs a GPU")
    arch, batch, frames = MODELS[name]
    torch.manual_seed(0)
    model = build_model({**arch, "num_classes": NUM_CLASSES}).train()
    criterion = MultiBoxLoss(model.priors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    acc = accelerator_for(precision)
    model, optimizer = acc.prepare(model, optimizer)
    criterion = criterion.to(acc.device)
    before = [p.detach().clone() for p in model.parameters()]
    size = arch["image_size"]
    stepped = tries = 0
    while stepped < 3 and tries < (12 if precision == "fp16" else 3):
        tries += 1
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        if frames:
            images = torch.rand(batch, frames, 3, size, size, device=acc.device)
            logits, deltas, _ = model(images)
            targets = [random_targets(frames) for _ in range(batch)]
            from ssd.clip_loss import clip_loss

            out = clip_loss(criterion, logits, deltas, [[{k: v.to(acc.device) for k, v in t.items()} for t in clip]
                                                         for clip in targets])
        else:
            images = torch.rand(batch, 3, size, size, device=acc.device)
            logits, deltas = model(images)
            out = criterion(logits, deltas, [{k: v.to(acc.device) for k, v in t.items()} for t in random_targets(batch)])
        assert out["loss"].dtype == torch.float32  # the loss (and its matching) in float32 whatever the autocast
        assert torch.isfinite(out["loss"])
        acc.backward(out["loss"])
        optimizer.step()
        if acc.optimizer_step_was_skipped:
            assert precision == "fp16", "only the fp16 loss scaler may skip a step"
            assert acc.scaler.get_scale() == scale / 2, "a skipped step halves the loss scale"
        else:
            stepped += 1
        optimizer.zero_grad()
    if precision == "fp16":
        assert acc.scaler is not None and acc.scaler.is_enabled()
    assert stepped == 3, f"{stepped} optimiser steps in {tries} tries"
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert changed > len(before) // 2


def test_postprocessing_on_the_gpu_equals_the_cpus():
    torch.manual_seed(0)
    priors = build_model({"name": "ssdlite_mobilenet_v2", "image_size": 320, "num_classes": NUM_CLASSES}).priors
    logits = torch.randn(4, priors.shape[0], NUM_CLASSES) * 3
    deltas = torch.randn(4, priors.shape[0], 4) * 0.5
    for cfg in (PostprocessConfig(), PostprocessConfig(score_threshold=0.3)):
        cpu = PostProcessor(priors, cfg)(logits, deltas)
        gpu = PostProcessor(priors, cfg).to(DEVICE)(logits.to(DEVICE), deltas.to(DEVICE))
        for a, b in zip(cpu, gpu):
            assert_close(b["boxes"].cpu(), a["boxes"], atol=1e-4, rtol=1e-4)
            assert_close(b["scores"].cpu(), a["scores"], atol=1e-5, rtol=1e-5)
            assert torch.equal(b["labels"].cpu(), a["labels"])


def test_evaluation_on_the_gpu_equals_the_cpus(tmp_path):
    from pipeline.datasets import read_manifest
    from pipeline.evaluate import predict
    from ssd.data.loader import eval_loader
    from test_evaluate import train_on

    shards = read_manifest(write_frame_dataset(tmp_path / "voc", {"val": [6, 4]})).shard_paths("val")
    # Imperfect detections, so that a score the GPU rounds differently could change the figure:
    # the tiny model (trained on the CPU) reaches VOC07 mAP 0.03 after 40 steps, 0.58 after 50
    # and 1.0 after 60-80.
    model = train_on(shards, steps=50)
    maps = []
    for where in ("cpu", DEVICE):
        m = model.to(where).eval()
        post = PostProcessor(m.priors, PostprocessConfig()).to(where)
        loader = eval_loader(shards, image_size=64, rank=0, world_size=1, batch_size=4, num_workers=0)
        acc = predict(m, post, loader, "frames", where)
        maps.append(acc.voc(len(CLASSES)).map07)
    assert 0.1 < maps[0] < 0.99  # detections worth comparing
    assert maps[1] == pytest.approx(maps[0], abs=1e-4)


def test_lstm_ssd_streaming_on_the_gpu_equals_its_clip_forward():
    torch.manual_seed(0)
    model = build_model({"name": "lstm_ssd_mobilenet_v2", "image_size": 96, "width_mult": 0.5,
                         "num_classes": NUM_CLASSES}).to(DEVICE).eval()
    _, _, final = assert_streaming_equals_clip(model, torch.rand(2, 4, 3, 96, 96, device=DEVICE), tol=1e-4)
    assert all(s.device.type == torch.device(DEVICE).type for s in final)


def test_a_gpu_trained_model_file_loads_and_exports_on_a_cpu_only_machine(tmp_path):
    torch.manual_seed(0)
    model = build_model({"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25,
                         "num_classes": NUM_CLASSES}).to(DEVICE).train()
    criterion = MultiBoxLoss(model.priors).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        out = criterion(*model(torch.rand(2, 3, 64, 64, device=DEVICE)),
                        [{k: v.to(DEVICE) for k, v in t.items()} for t in random_targets(2)])
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model_file(tmp_path / "gpu.pt", model.eval(), CLASSES)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # gpu_check.sh's /tmp/site too
    env = {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline.export", str(tmp_path / "gpu.pt"),
                             "--out", str(tmp_path / "gpu.onnx"), "--verify"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "gpu.onnx").stat().st_size > 10_000
