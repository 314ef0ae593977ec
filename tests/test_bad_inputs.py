"""The bad-input matrix: one row per kind of bad input, across the stages.

Each row is data: the stage, its arguments, what to break in a small project first, the
exit code, and a fragment of the one ``error:`` line (exit 2) or of the reason an input was
skipped and counted (exit 0). Every row is also checked for what no bad input may do: a
traceback, more or fewer than one error line, a changed input, or a partly written output
(on exit 2 nothing changes but a run's logs and checkpoints). Adding a kind is adding a row.

Kinds the stages skip and count item by item (bad images, boxes, annotation files) are also
in the tables of tests/test_prepare.py, which check the converted samples in detail.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import multiprocessing
import shutil
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch
import yaml

from shardgen import CLASSES, write_clip_dataset, write_frame_dataset
from ssd.model_file import save_model_file
from ssd.models import ssdlite_mobilenet_v2
from test_prepare import BASE_ITEMS, BASE_SPLITS, _jpeg, make_ir_video, make_voc

PARAMS = {
    "prepare": {
        "workers": 1,
        "voc": {"root": "data/voc", "out": "out/voc", "classes": None},
        "ir": {"enabled": False, "source": "video", "root": "data/irv", "out": "out/ir", "clip_length": 4,
               "video": {"mot_classes": ["target", "bird"]}},
    },
    "train": {
        "name": "tiny",
        "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
        "data": {"shards": "data/shards/voc", "batch_size": 2, "num_workers": 0, "streams": 1,
                 "shuffle_buffer": 4},
        "steps": 2,
        "checkpoint_every": 1,
        "log_every": 1,
    },
    "evaluate": {"model": "models/tiny.pt", "shards": "data/shards/voc", "split": "val", "name": "tiny",
                 "batch_size": 2, "num_workers": 0, "examples": 0},
}

#: Where a failed run may leave files: its logs and its checkpoints (resumable state).
RUN_STATE = ("runs/", "checkpoints/")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A small project: params, VOC and IR-video sources, frame shards, a model file, a video."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    make_voc(root / "data" / "voc", BASE_ITEMS, BASE_SPLITS)
    make_ir_video(root / "data" / "irv", {"train": ["clipA"], "val": ["clipB"]})
    write_frame_dataset(root / "data" / "shards" / "voc", {"train": [4], "val": [3]})
    write_clip_dataset(root / "data" / "shards" / "ir", {"train": [8], "val": [8]})
    torch.manual_seed(0)
    (root / "models").mkdir()
    save_model_file(root / "models" / "tiny.pt", ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), CLASSES)
    (root / "media").mkdir()
    writer = cv2.VideoWriter(str(root / "media" / "in.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 32))
    for n in range(3):
        writer.write(np.full((32, 48, 3), 40 * n, np.uint8))
    writer.release()
    return root


# ---------------------------------------------------------------------------------------------
# What to break (each takes the project root)


def write(path: str, data: bytes | str) -> Callable[[Path], None]:
    def f(root: Path) -> None:
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return f


def shard_member(path: str, member_suffix: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Rewrite the first ``*member_suffix`` member of a shard with ``change(bytes)``."""

    def f(root: Path) -> None:
        shard = root / path
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        done = False
        with tarfile.open(shard, "w") as tar:
            for info, data in members:
                if not done and info.name.endswith(member_suffix):
                    data, done = change(data), True
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    return f


def scramble_jpeg(data: bytes) -> bytes:
    """Overwrite the middle of the entropy-coded data: decodes, with libjpeg's warnings."""
    start = data.index(b"\xff\xda") + 20
    rng = np.random.default_rng(0)
    middle = bytearray(rng.integers(0, 255, (len(data) - start - 10) // 2, dtype=np.uint8).tobytes())
    return data[:start] + bytes(middle).replace(b"\xff", b"\x00") + data[start + len(middle):]


def label_out_of_range(data: bytes) -> bytes:
    meta = json.loads(data)
    meta["labels"][0] = len(CLASSES) + 3
    return json.dumps(meta).encode()


def huge_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of ``width x height`` that compresses to almost nothing."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def replace_image(name: str, data: bytes, suffix: str = ".jpg") -> Callable[[Path], None]:
    def f(root: Path) -> None:
        (root / "data" / "voc" / "JPEGImages" / f"{name}.jpg").unlink()
        (root / "data" / "voc" / "JPEGImages" / f"{name}{suffix}").write_bytes(data)

    return f


def recursive_yaml(root: Path) -> None:
    (root / "params.yaml").write_text("train: &t\n  name: tiny\n  model: *t\n")


def model_with_wrong_classes(root: Path) -> None:
    payload = torch.load(root / "models" / "tiny.pt", weights_only=True)
    payload["class_names"] = ["red", "blue", "green"]  # the weights have 2 object classes
    torch.save(payload, root / "models" / "tiny.pt")


# ---------------------------------------------------------------------------------------------
# The matrix


@dataclass(frozen=True)
class Case:
    stage: str
    """pipeline module"""
    args: tuple[str, ...]
    code: int
    """expected exit code"""
    message: str
    """exit 2: a fragment of the one ``error:`` line; exit 0 with ``counted``: of the skip's detail"""
    setup: Callable[[Path], None] | None = None
    counted: str | None = None
    """a reason that must be skipped and counted once in the manifest, the rest converted"""


def train(*sets: str, setup=None, message: str, code: int = 2) -> Case:
    return Case("train", tuple(a for s in sets for a in ("--set", s)), code, message, setup)


def evaluate(*sets: str, setup=None, message: str) -> Case:
    return Case("evaluate", tuple(a for s in sets for a in ("--set", s)), 2, message, setup)


def prepare(*sets: str, setup=None, message: str = "", code: int = 2, counted: str | None = None) -> Case:
    return Case("prepare", tuple(a for s in sets for a in ("--set", s)), code, message, setup, counted)


MODEL, VIDEO = "models/tiny.pt", "media/in.avi"
TRAIN_SHARD = "data/shards/voc/train-000000.tar"
VAL_SHARD = "data/shards/voc/val-000000.tar"

MATRIX: dict[str, Case] = {
    # -- params files and overrides (every stage reads them alike)
    "params file missing": Case("train", ("--params", "nowhere.yaml"), 2, "nowhere.yaml: params file not found"),
    "params not YAML": train(setup=write("params.yaml", "train: [unclosed\n"), message="params.yaml: line"),
    "params not UTF-8": train(setup=write("params.yaml", b"train:\n  name: t\xe9st\n"), message="not UTF-8"),
    "recursive YAML alias": train(setup=recursive_yaml, message="refers to itself"),
    "override without =": Case("train", ("--set", "steps"), 2, "expected key=value"),
    "unknown key": train("stepz=3", message="train.stepz: unknown key"),
    "wrong type": train("steps=many", message="train.steps: expected an integer"),
    "empty string for a path": prepare("voc.out=''", message="prepare.voc.out: must not be empty"),
    # -- impossible values
    "learning rate NaN": train("optim.lr=.nan", message="train.optim.lr: expected a finite number"),
    "learning rate infinite": train("optim.lr=.inf", message="train.optim.lr: expected a finite number"),
    "batch size 0": train("data.batch_size=0", message="train.data.batch_size: must be at least 1"),
    "negative workers": train("data.num_workers=-1", message="train.data.num_workers: must be at least 0"),
    "no streams": train("data.streams=0", message="train.data.streams: must be at least 1"),
    "no shuffle buffer": train("data.shuffle_buffer=0", message="train.data.shuffle_buffer: must be at least 1"),
    "width multiplier 0": train("model.width_mult=0", message="train.model.width_mult: must be greater than 0"),
    "negative width multiplier": train("model.width_mult=-0.5", message="train.model.width_mult: must be greater"),
    "image size 7": train("model.image_size=7", message="train.model.image_size: must be at least 32"),
    "no classes": prepare("voc.classes=[]", message="prepare.voc.classes: must not be empty"),
    "duplicate class names": prepare("voc.classes=[cat, dog, cat]", message="'cat' is listed twice"),
    "empty split list": prepare("voc.splits=[]", message="prepare.voc.splits: must not be empty"),
    "image size too small for SSD300-VGG16": train("model={name: ssd300_vgg16, image_size: 64}",
                                                   message="image_size 64 is too small for this architecture"),
    "run name ..": train("name=..", message="not a valid run name"),
    "run name escaping the project": train("name=../../escape", message="not a valid run name"),
    "seed past numpy's": train("seed=4294967296", message="train.seed: must be less than 4294967296"),
    "evaluate batch size 0": evaluate("batch_size=0", message="batch_size"),
    # -- outputs that cannot be written (checked before any work)
    "unwritable models_dir": train("models_dir=params.yaml/models", message="params.yaml"),
    "unwritable metrics_dir": evaluate("metrics_dir=params.yaml/metrics", message="params.yaml"),
    "unwritable prepare output": prepare("voc.out=params.yaml/voc", message="params.yaml"),
    "reports folder of the user's": evaluate("reports_dir=data", "name=voc",
                                             message="reports_dir: data/voc exists and is not an evaluation's reports"),
    "unwritable ONNX output": Case("export", (MODEL, "--out", "params.yaml/m.onnx"), 2, "params.yaml"),
    "unwritable detect output": Case("detect", (MODEL, VIDEO, "--out", "params.yaml/o.avi", "--fourcc", "MJPG"),
                                     2, "params.yaml"),
    # -- model files
    "model file missing": evaluate("model=models/none.pt", "name=none", message="models/none.pt: model file not found"),
    "zero-byte model file": evaluate(setup=write(MODEL, b""), message="models/tiny.pt: not a readable model file"),
    "random-byte model file": evaluate(setup=write(MODEL, bytes(range(256)) * 8), message="not a readable model file"),
    "raw state dict as model file": evaluate(
        setup=lambda r: torch.save({"w": torch.zeros(2)}, r / MODEL), message="not an ssd-model file"),
    "class names disagree with the weights": evaluate(
        setup=model_with_wrong_classes, message="3 class names for a model with 2 object classes"),
    "zero-byte model to detect": Case("detect", (MODEL, VIDEO, "--out", "o.avi", "--fourcc", "MJPG"), 2,
                                      "not a readable model file", write(MODEL, b"")),
    "zero-byte model to export": Case("export", (MODEL, "--out", "m.onnx"), 2, "not a readable model file",
                                      write(MODEL, b"")),
    "zero-byte init_weights": train("model.init_weights=models/tiny.pt", setup=write(MODEL, b""),
                                    message="not a readable model file"),
    # -- shard datasets
    "manifest missing": train(setup=lambda r: (r / "data/shards/voc/manifest.json").unlink(), message="no manifest"),
    "manifest is a list": train(setup=write("data/shards/voc/manifest.json", "[]"), message="manifest.json"),
    "shard missing": train(setup=lambda r: (r / TRAIN_SHARD).unlink(), message="train-000000.tar: shard listed"),
    "empty shard": train(setup=write(TRAIN_SHARD, b""), message="train-000000.tar"),
    "truncated shard (train)": train(
        setup=lambda r: (r / TRAIN_SHARD).write_bytes((r / TRAIN_SHARD).read_bytes()[:3000]),
        message="train-000000.tar"),
    "truncated shard (evaluate)": evaluate(
        setup=lambda r: (r / VAL_SHARD).write_bytes((r / VAL_SHARD).read_bytes()[:3000]), message="val-000000.tar"),
    "random-byte shard": train(setup=write(TRAIN_SHARD, bytes(range(256)) * 40), message="train-000000.tar"),
    "undecodable JPEG in a shard (train)": train(
        setup=shard_member(TRAIN_SHARD, ".jpg", lambda d: b"\xff\xd8\xff" + bytes(200)), message="train-000000.tar"),
    "undecodable JPEG in a shard (loader worker process)": train(
        "data.num_workers=1", setup=shard_member(TRAIN_SHARD, ".jpg", lambda d: b"\xff\xd8\xff" + bytes(200)),
        message="train-000000.tar: sample"),
    "undecodable JPEG in a shard (evaluate)": evaluate(
        setup=shard_member(VAL_SHARD, ".jpg", lambda d: b"\xff\xd8\xff" + bytes(200)), message="val-000000.tar"),
    "undecodable JPEG in a shard (evaluate, loader worker process)": evaluate(
        "num_workers=1", setup=shard_member(VAL_SHARD, ".jpg", lambda d: b"\xff\xd8\xff" + bytes(200)),
        message="val-000000.tar: sample"),
    "label out of range in a shard (train)": train(
        setup=shard_member(TRAIN_SHARD, ".json", label_out_of_range), message="label 5 is not a class"),
    "label out of range in a shard (evaluate)": evaluate(
        setup=shard_member(VAL_SHARD, ".json", label_out_of_range), message="label 5 is not a class"),
    "clip shards for a frame model": evaluate("shards=data/shards/ir", "mode=video", message="video"),
    # -- detect and export
    "detect output is the input": Case("detect", (MODEL, VIDEO, "--out", VIDEO, "--fourcc", "MJPG"), 2,
                                       "is the input"),
    "detect detections file is the input": Case(
        "detect", (MODEL, VIDEO, "--out", "o.avi", "--jsonl", VIDEO, "--fourcc", "MJPG"), 2, "is the input"),
    "detect output is a folder": Case("detect", (MODEL, VIDEO, "--out", "o.avi", "--fourcc", "MJPG"), 2,
                                      "--out o.avi: is a folder; give a file name", lambda r: (r / "o.avi").mkdir()),
    "detect detections file is a folder": Case(
        "detect", (MODEL, VIDEO, "--out", "o.avi", "--jsonl", "models", "--fourcc", "MJPG"), 2,
        "--jsonl models: is a folder; give a file name"),
    "detect output named as an image": Case("detect", (MODEL, VIDEO, "--out", "o.jpg"), 2,
                                            "--out o.jpg: detect writes an annotated video"),
    "detect frame rate 0": Case("detect", (MODEL, "data/irv/frames/clipB", "--out", "o.avi", "--fourcc", "MJPG",
                                           "--fps", "0"), 2, "--fps 0"),
    "detect input missing": Case("detect", (MODEL, "media/none.avi", "--out", "o.avi"), 2, "media/none.avi"),
    "export opset 5": Case("export", (MODEL, "--out", "m.onnx", "--opset", "5"), 2, "--opset 5"),
    # -- prepare: whole-run errors
    "split list missing": prepare(setup=lambda r: (r / "data/voc/ImageSets/Main/val.txt").unlink(),
                                  message="val.txt: split list not found"),
    "dataset root missing": prepare("voc.root=data/none", message="data/none: directory not found"),
    # -- prepare: skipped and counted, the rest converted
    "scrambled JPEG data": prepare(setup=write("data/voc/JPEGImages/b.jpg", scramble_jpeg(_jpeg(1, 160, 120))),
                                   code=0, counted="corrupt or truncated image", message="Corrupt JPEG data"),
    "image over the pixel limit": prepare(setup=replace_image("b", huge_png(8000, 8000), ".png"), code=0,
                                          counted="image too large", message="8000x8000"),
}


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_the_matrix_covers_the_stages():
    assert len(MATRIX) >= 40
    assert {c.stage for c in MATRIX.values()} >= {"prepare", "train", "evaluate", "detect", "export"}


@pytest.mark.parametrize("kind", list(MATRIX))
def test_bad_input(kind, template, tmp_path, monkeypatch, capsys):
    case = MATRIX[kind]
    root = tmp_path / "project"
    shutil.copytree(template, root)
    if case.setup is not None:
        case.setup(root)
    before = _snapshot(root)
    monkeypatch.chdir(root)
    stage = importlib.import_module(f"pipeline.{case.stage}")
    try:
        code = stage.main(list(case.args))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    # No worker process outlives the stage (one left behind kept the process from exiting).
    assert multiprocessing.active_children() == []
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == case.code, err[-3000:]
    after = _snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not [k for k in changed if ".tmp" in k], changed  # no temporary file left behind
    if case.code == 2:
        assert len(errors) == 1, err[-3000:]
        assert case.message in errors[0], errors[0]
        assert [k for k in changed if not k.startswith(RUN_STATE)] == []  # nothing written, nothing touched
        return
    assert errors == []
    if case.counted:
        manifest = json.loads((root / "out" / case.stage.replace("prepare", "voc") / "manifest.json").read_text())
        hits = [s for s in manifest["skipped"] if s["reason"] == case.counted]
        assert len(hits) == 1 and case.message in hits[0]["detail"], manifest["skipped"]
        assert manifest["skipped_counts"][case.counted] == 1
        assert sum(s["samples"] for s in manifest["splits"].values()) == len(BASE_ITEMS) - 1  # the rest converted
