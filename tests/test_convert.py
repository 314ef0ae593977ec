"""The convert stage: foreign checkpoints into model files that every stage runs, and fine-tuning from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
import torchvision
import yaml

from shardgen import CLASSES, write_frame_dataset
from ssd.model_file import load_model_file
from test_weights import randomised, ssd_pytorch_state_dict, ssds_state_dict

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def stage(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{name}", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def checkpoints(folder: Path) -> dict[str, Path]:
    """Foreign checkpoints with the real keys and shapes (random values): 2 object classes, and COCO's 91."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ssd.pytorch": folder / "ssd300_mAP_77.43_v2.pth", "ssds.pytorch": folder / "mobilenet_v2_ssd_lite.pth",
             "torchvision-ssdlite320": folder / "ssdlite.pth",
             "coco-ssdlite320": folder / "ssdlite_coco.pth"}
    torch.save(ssd_pytorch_state_dict(len(CLASSES) + 1, seed=0), files["ssd.pytorch"])
    torch.save(ssds_state_dict(len(CLASSES) + 1, seed=0), files["ssds.pytorch"])
    for key, classes in (("torchvision-ssdlite320", len(CLASSES) + 1), ("coco-ssdlite320", 91)):
        tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=classes)
        torch.save(randomised(tv.state_dict(), seed=1), files[key])
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    write_frame_dataset(root / "shards", {"train": [8], "val": [4]})
    checkpoints(root / "foreign")
    frames = root / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"frame_{i + 1}.png"), (torch.rand(90, 120, 3) * 255).byte().numpy())
    return root


@pytest.mark.parametrize("fmt, checkpoint", [("ssd.pytorch", "ssd300_mAP_77.43_v2.pth"),
                                             ("ssds.pytorch", "mobilenet_v2_ssd_lite.pth"),
                                             ("torchvision-ssdlite320", "ssdlite.pth")])
def test_converted_models_run_through_evaluate_detect_and_export(project, fmt, checkpoint, stage_main):
    # The evaluation through its command line, the other stages through main() in this process.
    model = f"models/{fmt}.pt"
    result = stage_main("convert", f"foreign/{checkpoint}", "--out", model, "--classes", ",".join(CLASSES), cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {model}" in result.stderr
    _, info = load_model_file(project / model)
    assert info["class_names"] == CLASSES and info["meta"]["converted_from"]["file"] == checkpoint

    params = {"evaluate": {"model": model, "shards": "shards", "split": "val", "name": fmt, "batch_size": 4,
                           "num_workers": 0, "examples": 0}}
    (project / f"{fmt}.yaml").write_text(yaml.safe_dump(params))
    result = stage("evaluate", "--params", f"{fmt}.yaml", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((project / "metrics" / f"eval-{fmt}.json").read_text())
    assert metrics["images"] == 4 and 0 <= metrics["map_voc"] <= 1

    result = stage_main("detect", model, "frames", "--out", f"out/{fmt}.mp4", "--device", "cpu", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((project / "out" / f"{fmt}.jsonl").read_text().splitlines()) == 3

    result = stage_main("export", model, "--out", f"out/{fmt}.onnx", "--verify", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime matches PyTorch" in result.stderr


@pytest.fixture(scope="module")
def voc_sample(project) -> Path:
    """The sample stage's VOC data set (6 classes), small, prepared into shards as `dvc repro` does."""
    params = {
        "sample": {"seed": 0, "workers": 1, "voc": {"out_dir": "sample/voc", "train_images": 12, "val_images": 4},
                   "ir": {"out_dir": "sample/ir", "videos": 2, "frames": 4, "width": 64, "height": 48}},
        "prepare": {"workers": 1, "voc": {"root": "sample/voc", "out": "sample_shards"}, "ir": {"enabled": False}},
    }
    (project / "sample.yaml").write_text(yaml.safe_dump(params))
    for name in ("sample", "prepare"):
        result = stage(name, "--params", "sample.yaml", cwd=project)
        assert result.returncode == 0, result.stderr[-2000:]
    return project / "sample_shards"


def test_fine_tuning_a_converted_coco_model_on_the_voc_sample(project, voc_sample):
    """torchvision's COCO SSDLite320 (random values) -> model file -> SSDLite-MobileNetV3 for the VOC
    sample's classes: everything but the class layers loads, and the log says so."""
    result = stage("convert", "foreign/ssdlite_coco.pth", "--out", "models/coco.pt", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    _, info = load_model_file(project / "models" / "coco.pt")
    assert len(info["class_names"]) == 90 and info["class_names"][0] == "person"
    assert info["input_norm"] == {"channels": "rgb", "scale": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}

    train = {"name": "finetuned", "steps": 2, "log_every": 1, "checkpoint_every": 2,
             "model": {"name": "ssdlite_mobilenet_v3_large", "image_size": 128, "init_weights": "models/coco.pt"},
             "data": {"shards": voc_sample.name, "batch_size": 2, "num_workers": 0, "streams": 1, "shuffle_buffer": 4}}
    (project / "finetune.yaml").write_text(yaml.safe_dump({"train": train}))
    result = stage("train", "--params", "finetune.yaml", cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [s for s in result.stderr.splitlines() if "models/coco.pt: loaded" in s]
    source, _ = load_model_file(project / "models" / "coco.pt")
    total = sum(1 for k in source.state_dict() if not k.endswith("num_batches_tracked") and k not in ("priors", "mean", "std"))
    # The 6 class layers (1x1 weight and bias each) start fresh; every other tensor loads.
    assert f"loaded {total - 12} of {total} tensors" in line, line
    assert "head.cls_layers.0.3" in line and "(other classes)" in line
    tuned, info = load_model_file(project / "models" / "finetuned.pt")
    classes = json.loads((voc_sample / "manifest.json").read_text())["classes"]
    assert len(classes) == 6 and info["class_names"] == classes and info["input_norm"]["mean"] == [0.5] * 3
    assert tuned.arch["name"] == "ssdlite_mobilenet_v3_large"


def test_convert_errors_are_one_line(project, stage_main):
    # The first from the command line, the others through main() (the same error path, in this process)
    (project / "noise.pth").write_bytes(b"not a checkpoint")
    bad = stage("convert", "noise.pth", "--out", "models/x.pt", cwd=project)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: noise.pth: not a readable")
    torch.save({"conv1.weight": torch.zeros(1)}, project / "resnet.pth")
    unknown = stage_main("convert", "resnet.pth", "--out", "models/x.pt", cwd=project)
    last = unknown.stderr.strip().splitlines()[-1]
    assert unknown.returncode == 2 and last.startswith("error: resnet.pth: no known format has keys like conv1.weight")
    unnamed = stage_main("convert", "foreign/ssdlite.pth", "--out", "models/x.pt", cwd=project)
    assert unnamed.returncode == 2 and "the format doesn't name them: give --classes with 2 names" in unnamed.stderr
    same = stage_main("convert", "foreign/ssdlite.pth", "--out", "foreign/ssdlite.pth", "--classes", "a,b", cwd=project)
    assert same.returncode == 2 and "is the checkpoint itself" in same.stderr
    for result in (bad, unknown, unnamed, same):
        assert "Traceback" not in result.stderr
    assert not (project / "models" / "x.pt").exists()
