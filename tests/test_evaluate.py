"""The evaluation stage, run as users run it: ``dvc repro`` in a scratch project, one process
and two (gloo on CPU), refusals; video mode with a stand-in temporal model."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import pipeline.evaluate as evaluate_mod
from pipeline.datasets import read_manifest
from pipeline.stage import StageError
from shardgen import CLASSES, write_clip_dataset, write_frame_dataset
from ssd.data.loader import eval_loader
from ssd.draw import GT_COLOUR, PRED_COLOUR
from ssd.loss import MultiBoxLoss
from ssd.model_file import save_model_file
from ssd.models import ssdlite_mobilenet_v2
from ssd.postprocess import PostprocessConfig, PostProcessor

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
DVC = [sys.executable, "-m", "dvc"]
TIMING = ("images_per_s", "wall_time_s")

EVALUATE = {"model": "models/tiny.pt", "name": "tiny", "batch_size": 5, "num_workers": 0, "examples": 3}


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # dvc's `python` is ours
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def stage(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.evaluate", *args]


def two_processes(*args: str) -> list[str]:
    return [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "pipeline.evaluate", *args]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64)


def train_on(shards: list[str], steps: int) -> nn.Module:
    """A tiny SSDLite fitted to the images it will be evaluated on: good, not perfect, detections."""
    model = tiny_model()
    batch = next(iter(eval_loader(shards, image_size=64, rank=0, world_size=1, batch_size=64, num_workers=0)))
    criterion = MultiBoxLoss(model.priors)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = criterion(*model(batch.images), batch.targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_frame_dataset(tmp_path_factory.mktemp("data") / "voc", {"val": [6, 4]})


@pytest.fixture(scope="module")
def model_file(shards, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_model_file(path, train_on(read_manifest(shards).shard_paths("val"), steps=80), CLASSES)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, shards, model_file) -> Path:
    """A git + DVC project holding the real ``evaluate`` stage of dvc.yaml, run by ``dvc repro``."""
    root = tmp_path_factory.mktemp("project")
    for d in ("ssd", "pipeline", "configs"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")  # Python caches in the code deps don't count
    shutil.copytree(shards, root / "data" / "shards" / "voc")
    (root / "models").mkdir()
    shutil.copy(model_file, root / "models" / "tiny.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": {**params, **EVALUATE}}, sort_keys=False))
    definition = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    # The real stage names its model's files (ssdlite_voc); this project's model is "tiny".
    definition = yaml.safe_load(yaml.safe_dump(definition).replace("ssdlite_voc", "tiny"))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": definition}}, sort_keys=False))
    for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"], [*DVC, "config", "core.analytics", "false"]):
        result = run(cmd, root, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")  # the project's plot templates
    result = run([*DVC, "repro", "evaluate"], root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root


def settings(root: Path, name: str) -> dict:
    """The settings an evaluation ran with (beside its example pictures, not in its metrics)."""
    return json.loads((root / "reports" / name / "evaluation.json").read_text())


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def test_stage_writes_metrics_plots_and_examples(project):
    metrics = json.loads((project / "metrics" / "eval-tiny.json").read_text())
    print("evaluate metrics:", json.dumps(without_timing(metrics)))
    assert metrics["images"] == 10
    ran = settings(project, "tiny")
    assert ran["mode"] == "frames" and ran["model"] == "models/tiny.pt" and ran["postprocess"]
    # Numbers only: a setting is never shown as a metric (strings and config keys stay out).
    assert not {"model", "shards", "split", "mode", "voc_metric", "postprocess"} & set(metrics)
    assert set(metrics["voc07"]["ap"]) == set(metrics["voc2010"]["ap"]) == set(CLASSES)
    assert 0.3 < metrics["voc07"]["map"] <= 1.0 and 0.3 < metrics["voc2010"]["map"] <= 1.0
    assert metrics["map_voc"] == metrics["voc07"]["map"]  # voc_metric: voc07
    assert {"map", "map_50", "map_75", "map_small", "map_medium", "map_large"} <= set(metrics["coco"])
    assert 0.0 < metrics["coco"]["map"] <= metrics["coco"]["map_50"] <= 1.0
    assert metrics["images_per_s"] > 0
    assert sum(metrics["positives"].values()) == metrics["objects"]

    curves = pr_curves(project)
    assert set(curves) == set(CLASSES)
    for name, (legend, points) in curves.items():
        assert legend == f"{name} (AP {metrics['voc07']['ap'][name]:.3f})"  # the chart's legend: class and AP
        assert ((points >= 0) & (points <= 1)).all() and (np.diff(points[:, 0]) >= 0).all()
    (row,) = json.loads((project / "plots" / "map-tiny.json").read_text())
    # The chart compares every model on VOC07 whatever each section's voc_metric (its title
    # named `evaluate`'s metric, over bars of each section's own).
    assert row == {"model": "tiny", "map_voc": metrics["map_voc"], "map_voc07": metrics["voc07"]["map"],
                   "coco_map": metrics["coco"]["map"], "coco_map_50": metrics["coco"]["map_50"]}

    examples = sorted((project / "reports" / "tiny" / "examples").glob("*.png"))
    assert len(examples) == 3
    for path in examples:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert image.shape == (64, 64, 3)  # the original image, not the network input
        assert np.all(image == GT_COLOUR, axis=-1).any() and np.all(image == PRED_COLOUR, axis=-1).any()


def test_tensorboard_has_examples_and_scalars(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    (events,) = (project / "runs" / "tiny-eval").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Tags()["images"]) == 3
    assert {"eval/voc07_map", "eval/voc2010_map", "eval/coco_map", "eval/coco_map_50"} <= set(acc.Tags()["scalars"])
    # One PR curve per class: the last point (highest recall) equals the CSV curve's last point.
    assert {f"pr/{c}" for c in CLASSES} <= set(acc.Tags()["tensors"])
    for name in CLASSES:
        data = tensor_util.make_ndarray(acc.Tensors(f"pr/{name}")[0].tensor_proto)  # [6, N]: tp fp tn fn p r
        recall, precision = pr_curves(project)[name][1][-1]
        assert data[5, 0] == pytest.approx(recall, abs=1e-5) and data[4, 0] == pytest.approx(precision, abs=1e-5)


def pr_curves(project: Path) -> dict[str, tuple[str, np.ndarray]]:
    """class -> (legend entry, ``[N, 2]`` recall, precision) from ``plots/pr-tiny.csv``."""
    import csv

    with open(project / "plots" / "pr-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, tuple[str, list]] = {}
    for r in rows:
        out.setdefault(r["class"], (r["curve"], []))[1].append((float(r["recall"]), float(r["precision"])))
    return {k: (legend, np.array(points)) for k, (legend, points) in out.items()}


def test_dvc_plots_show_renders_one_pr_chart_with_every_class(project):
    result = run([*DVC, "plots", "show", "-o", "plots-html"], project, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (project / "plots-html" / "index.html").read_text()
    assert "plots_pr-tiny_csv" in html and '"recall"' in html and '"precision"' in html
    shown = json.loads(run([*DVC, "plots", "show", "--json"], project, timeout=120).stdout)
    assert not [k for k in shown["data"] if k.startswith("plots/pr-tiny/")]  # no chart per class any more
    (chart,) = shown["data"]["plots/pr-tiny.csv"]
    spec = chart["content"]
    assert spec["encoding"]["x"]["field"] == "recall" and spec["encoding"]["y"]["field"] == "precision"
    assert spec["encoding"]["color"]["field"] == "curve"  # one line per class, the legend with its AP
    assert spec["title"].startswith("Precision-recall per class (tiny")
    assert {v["curve"] for v in spec["data"]["values"]} == {legend for legend, _ in pr_curves(project).values()}


def coco_ground_truth(shards: Path) -> dict:
    """The val split's annotations as a COCO ground-truth file, images numbered in sample-key order
    (the evaluation's detections file numbers them so); difficult boxes as crowd boxes."""
    from ssd.data.loader import read_raw_samples

    samples = sorted(read_raw_samples(read_manifest(shards).shard_paths("val")), key=lambda raw: raw.key)
    images, annotations = [], []
    for image_id, raw in enumerate(samples, start=1):
        meta = json.loads(raw.meta)
        images.append({"id": image_id, "width": meta["width"], "height": meta["height"], "file_name": raw.key})
        for (x1, y1, x2, y2), label, difficult in zip(meta["boxes"], meta["labels"], meta["difficult"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(difficult)})
    categories = [{"id": k, "name": name} for k, name in enumerate(CLASSES, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_detections_file_rescores_to_the_evaluation_coco_ap(project, shards):
    from faster_coco_eval import COCO, COCOeval_faster

    metrics = json.loads((project / "metrics" / "eval-tiny.json").read_text())
    detections = json.loads((project / "reports" / "tiny" / "detections.json").read_text())
    assert len(detections) == metrics["detections"] > 0
    assert {d["category_name"] for d in detections} <= set(CLASSES)
    gt = COCO(coco_ground_truth(shards))
    evaluation = COCOeval_faster(gt, gt.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(metrics["coco"]["map"], abs=1e-5)
    assert evaluation.stats[1] == pytest.approx(metrics["coco"]["map_50"], abs=1e-5)


def test_confusion_matrix_plot_counts_every_object_once(project):
    import csv

    metrics = json.loads((project / "metrics" / "eval-tiny.json").read_text())
    with open(project / "plots" / "confusion-tiny.csv") as f:
        rows = list(csv.DictReader(f))
    # Every object that counts (not difficult) is either found (as some class) or missed: one row each.
    for name in CLASSES:
        assert sum(r["actual"] == name for r in rows) == metrics["positives"][name]
    assert {r["actual"] for r in rows} | {r["predicted"] for r in rows} <= {"background", *CLASSES}
    assert any(r["actual"] == r["predicted"] != "background" for r in rows)  # the trained model finds some
    shown = json.loads(run([*DVC, "plots", "show", "--json"], project, timeout=120).stdout)
    (plot,) = shown["data"]["plots/confusion-tiny.csv"]
    title = plot["content"]["title"]
    assert (title["text"] if isinstance(title, dict) else title).startswith("Confusion matrix")
    assert len(plot["content"]["data"]["values"]) == len(rows)


def test_metrics_diff_after_a_postprocess_change_shows_metrics_not_settings(project, tmp_path):
    """`dvc metrics diff` used to list postprocess.score_threshold 0.01 -> 0.05 as a metric."""
    work = tmp_path / "copy"
    shutil.copytree(project, work, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in ([*git, "add", "-A"], [*git, "commit", "-qm", "baseline"]):
        result = run(cmd, work, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["postprocess"]["score_threshold"] = 0.3
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([*DVC, "repro", "evaluate"], work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    diff = json.loads(run([*DVC, "metrics", "diff", "--json"], work, timeout=120).stdout)
    changed = {key for changes in diff.values() for key in changes}
    assert "detections" in changed  # fewer detections kept at the higher threshold
    settings_keys = ("postprocess", "score_threshold", "model", "shards", "split", "mode", "voc_metric")
    assert not [k for k in changed if any(part in settings_keys for part in k.split("."))], sorted(changed)


@pytest.mark.slow
def test_one_and_two_processes_give_identical_metrics(project):
    outputs = ["--set", "metrics_dir=metrics2", "--set", "plots_dir=plots2", "--set", "reports_dir=reports2",
               "--set", "runs_dir=runs2"]
    result = run(two_processes(*outputs), project)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr
    one = json.loads((project / "metrics" / "eval-tiny.json").read_text())
    two = json.loads((project / "metrics2" / "eval-tiny.json").read_text())
    assert without_timing(two) == without_timing(one)
    assert (project / "plots2" / "pr-tiny.csv").read_bytes() == (project / "plots" / "pr-tiny.csv").read_bytes()
    assert len(list((project / "reports2" / "tiny" / "examples").glob("*.png"))) == 3


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_model_of_other_classes_is_refused(project, tmp_path):
    other = tmp_path / "pets.pt"
    save_model_file(other, tiny_model(), ["cat", "dog"])
    result = run(stage("--set", f"model={other}", "--set", "name=pets", "--set", "metrics_dir=never"), project,
                 timeout=120)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "['cat', 'dog']" in line and "['red', 'blue']" in line and str(other) in line
    assert not (project / "never").exists()


def _rewritten(shards: Path, out: Path, change) -> Path:
    """A copy of the shards with each sample's JSON passed through ``change``."""
    shutil.copytree(shards, out)
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for member, data in members:
                if member.name.endswith(".json"):
                    data = json.dumps(change(json.loads(data))).encode()
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out


def test_a_split_without_objects_is_refused_not_scored_zero(project, tmp_path, monkeypatch, capsys):
    """Every VOC and COCO value came out undefined (null) while the log said mAP 0.0000, exit 0."""
    empty = _rewritten(project / "data" / "shards" / "voc", tmp_path / "empty",
                       lambda a: {**a, "boxes": [], "labels": [], "difficult": []})
    difficult = _rewritten(project / "data" / "shards" / "voc", tmp_path / "difficult",
                           lambda a: {**a, "difficult": [True] * len(a["boxes"])})
    monkeypatch.chdir(project)
    for shards in (empty, difficult):
        assert evaluate_mod.main(["--set", f"shards={shards}", "--set", "metrics_dir=never"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == (f"error: {shards / 'manifest.json'}: split 'val' has no object that counts (none, or only "
                        "difficult ones), so its mAP is undefined; evaluate on a split with objects")
    assert not (project / "never").exists()


@pytest.mark.parametrize("problem", ["missing", "not a model file", "raw state dict"])
def test_bad_model_file_is_a_one_line_error(project, tmp_path, monkeypatch, capsys, problem):
    path = tmp_path / "broken.pt"
    if problem == "not a model file":
        path.write_bytes(b"PK\x03\x04 certainly not a checkpoint")
    elif problem == "raw state dict":
        torch.save(tiny_model().state_dict(), path)
    monkeypatch.chdir(project)
    assert evaluate_mod.main(["--set", f"model={path}", "--set", "name=broken"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert str(path) in line
    assert {"missing": "model file not found", "not a model file": "not a readable model file",
            "raw state dict": "not an ssd-model file"}[problem] in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("mode=movie", "evaluate.mode: expected one of"),
        ("postprocess.nms=0.5", "evaluate.postprocess.nms: unknown key"),
        ("batch_size=0", "evaluate.batch_size: must be at least 1, got 0"),
        ("mode=video", "mode 'video' needs clip shards"),
        ("split=test", "no split 'test'"),
        ("name=..", "name '..' is not a valid run name"),  # reports/.. would be replaced
        ("name=../elsewhere", "name '../elsewhere' is not a valid run name"),
        # Another model under the section's name would overwrite that model's metrics and reports,
        # labelled as that model (the usage line's own example did it).
        ("model=models/other.pt", "--set model=models/other.pt: the results would be filed as 'tiny'"),
    ],
)
def test_bad_config_is_a_one_line_error(project, monkeypatch, capsys, override, message):
    monkeypatch.chdir(project)
    assert evaluate_mod.main(["--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


# ---------------------------------------------------------------------------------------------
# Video mode. A stand-in for LSTM-SSD with its interface: the state counts the frames seen
# since the last reset, and every call records the count each sample starts from.


class CountingTemporalModel(nn.Module):
    is_temporal = True

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.register_buffer("priors", detector.priors.clone())
        self.image_size = detector.image_size
        self.seen: list[list[int]] = []

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, dtype=torch.int64, device=device)

    def forward(self, images, state=None, reset=None):
        if state is None:
            state = self.init_state(images.shape[0], images.device)
        if reset is not None:
            state = torch.where(reset, torch.zeros_like(state), state)
        self.seen.append(state.tolist())
        logits, deltas = self.detector(images)
        return logits, deltas, state + 1


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    # valvid0: frames 1..8 (two clips), valvid1: frames 1..4 (one clip)
    return write_clip_dataset(tmp_path_factory.mktemp("data") / "ir", {"val": [8, 4]}, clip_length=4, size=48)


def clip_loader(clips: Path, batch_size: int = 3):
    return eval_loader(read_manifest(clips).shard_paths("val"), image_size=64, rank=0, world_size=1,
                       batch_size=batch_size, num_workers=0, kind="frames_from_clips")


def test_video_mode_carries_state_within_a_video_and_resets_at_the_next(clips):
    model = CountingTemporalModel(tiny_model()).eval()
    post = PostProcessor(model.priors, PostprocessConfig())
    acc = evaluate_mod.predict(model, post, clip_loader(clips), "video", "cpu")
    assert model.seen == [[t] for t in range(8)] + [[t] for t in range(4)]  # one frame per call
    assert len(acc) == 12
    assert [r.image_id for r in acc.records][:2] == ["valvid0_000001/000", "valvid0_000001/001"]

    model.seen.clear()
    per_frame = evaluate_mod.predict(model, post, clip_loader(clips), "per_frame", "cpu")
    assert model.seen == [[0, 0, 0]] * 4  # batches of 3, every frame from a fresh state
    # the stand-in's detections don't depend on its state: both modes agree
    assert per_frame.voc(2).map07 == acc.voc(2).map07


def test_a_gap_in_frame_numbers_a_new_video_or_a_new_frame_size_starts_a_new_sequence():
    start = evaluate_mod.starts_sequence
    size = (64, 48)
    assert start(None, ("a", 5, size))
    assert not start(("a", 5, size), ("a", 6, size))
    assert start(("a", 5, size), ("a", 8, size))  # frames 6 and 7 missing
    assert start(("a", 5, size), ("b", 6, size))
    assert start(("a", 5, size), ("a", 5, size))
    # The clip writer starts a new segment where a video's frame size changes.
    assert start(("a", 5, size), ("a", 6, (80, 60)))


def test_stage_runs_a_temporal_model_in_video_mode(clips, tmp_path, monkeypatch):
    from pipeline.device import reset_accelerate

    model = CountingTemporalModel(tiny_model())
    path = tmp_path / "lstm.pt"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(evaluate_mod, "load_detector",
                        lambda p: (model, {"class_names": list(CLASSES), "image_size": 64}))
    monkeypatch.chdir(tmp_path)
    params = {"evaluate": {"model": str(path), "shards": str(clips), "num_workers": 0, "examples": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        assert evaluate_mod.main([]) == 0
        video = json.loads((tmp_path / "metrics" / "eval-lstm.json").read_text())
        assert settings(tmp_path, "lstm")["mode"] == "video" and video["images"] == 12
        assert model.seen == [[t] for t in range(8)] + [[t] for t in range(4)]
        assert len(list((tmp_path / "reports" / "lstm" / "examples").glob("*.png"))) == 2
        reset_accelerate()
        model.seen.clear()
        assert evaluate_mod.main(["--set", "mode=per_frame", "--set", "name=lstm-per-frame"]) == 0
        per_frame = json.loads((tmp_path / "metrics" / "eval-lstm-per-frame.json").read_text())
        assert settings(tmp_path, "lstm-per-frame")["mode"] == "per_frame" and per_frame["images"] == 12
        assert all(s == [0] * len(s) for s in model.seen)
    finally:
        reset_accelerate()


def test_stage_runs_an_lstm_ssd_model_file_in_video_mode(clips, tmp_path, monkeypatch):
    """The real temporal model, through its model file, once its builder is registered."""
    from pipeline.device import reset_accelerate

    from ssd.models import BUILDERS, build_model

    if "lstm_ssd_mobilenet_v2" not in BUILDERS:
        pytest.skip("LSTM-SSD is not registered in ssd.models yet")
    torch.manual_seed(0)
    model = build_model({"name": "lstm_ssd_mobilenet_v2", "num_classes": 3, "width_mult": 0.25, "image_size": 64})
    save_model_file(tmp_path / "lstm.pt", model, CLASSES)
    monkeypatch.chdir(tmp_path)
    params = {"evaluate": {"model": "lstm.pt", "shards": str(clips), "num_workers": 0, "examples": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        assert evaluate_mod.main([]) == 0
    finally:
        reset_accelerate()
    metrics = json.loads((tmp_path / "metrics" / "eval-lstm.json").read_text())
    assert settings(tmp_path, "lstm")["mode"] == "video" and metrics["images"] == 12


def test_modes_that_do_not_fit_the_shards_or_the_model_are_refused(clips, shards):
    frames, clip = read_manifest(shards), read_manifest(clips)
    resolve = evaluate_mod.resolve_mode
    assert resolve("auto", frames, False) == ("frames", "frames")
    assert resolve("auto", frames, True) == ("frames", "frames")
    assert resolve("auto", clip, True) == ("video", "frames_from_clips")
    assert resolve("auto", clip, False) == ("per_frame", "frames_from_clips")
    assert resolve("per_frame", clip, True) == ("per_frame", "frames_from_clips")
    with pytest.raises(StageError, match="needs a temporal model"):
        resolve("video", clip, False)
    with pytest.raises(StageError, match="needs clip shards"):
        resolve("per_frame", frames, True)
    with pytest.raises(StageError, match="needs frame shards"):
        resolve("frames", clip, False)


def test_a_misspelt_or_missing_section_is_refused_naming_the_evaluate_sections(tmp_path):
    """`--section evaluate_voc` ran the defaults and overwrote the tracked metrics."""
    params = str(ROOT / "params.yaml")
    sections = ("evaluate, evaluate_ir_ssdlite, evaluate_ir_lstm, evaluate_ir_lstm_per_frame, evaluate_pruned, "
                "evaluate_int8, evaluate_pruned_int8, evaluate_ir_lstm_int8")
    misspelt = run(stage("--params", params, "--section", "evaluate_voc"), tmp_path, timeout=120)
    assert misspelt.returncode == 2
    assert misspelt.stderr.strip().splitlines()[-1] == (
        f"error: {params}: no section 'evaluate_voc' (sections this stage can run: {sections})")
    missing = run(stage("--params", params), tmp_path, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == f"error: {params}: --section is required: 8 evaluate sections ({sections})"
    assert not (tmp_path / "metrics").exists()
