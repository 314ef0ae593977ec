"""pipeline.resume: what a checkpoint's fingerprint covers and how differences read."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import resume
from pipeline.config import from_dict, to_dict
from pipeline.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def fp(tmp_path: Path, **changes) -> dict:
    data = {"name": "x", "steps": 10, "optim": {"lr": 0.001}, "model": {"init_weights": str(tmp_path / "init.pt")}}
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = to_dict(from_dict(TrainConfig, data))
    files = {"data.shards": tmp_path / "manifest.json", "model.init_weights": cfg["model"]["init_weights"]}
    return resume.fingerprint(cfg, ["cat"], files, "no")


def test_safe_keys_are_left_out_and_the_rest_counts(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "init.pt").write_bytes(b"weights")
    base = fp(tmp_path)
    for key, value in (("steps", 20), ("log_every", 3), ("data.num_workers", 7), ("checkpoints_dir", "/bucket")):
        assert resume.differences(fp(tmp_path, **{key: value}), base) == [], key
    assert resume.differences(fp(tmp_path, **{"optim.lr": 0.5}), base) == ["optim.lr: 0.001 in the checkpoint, 0.5 now"]
    assert resume.differences(fp(tmp_path, **{"data.augment.hue": 0.2}), base) == [
        "data.augment.hue: 0.05 in the checkpoint, 0.2 now"]


def test_files_count_by_contents_not_path(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "init.pt").write_bytes(b"weights")
    base = fp(tmp_path)
    moved = tmp_path / "elsewhere.pt"
    moved.write_bytes(b"weights")
    assert resume.differences(fp(tmp_path, **{"model.init_weights": str(moved)}), base) == []
    (tmp_path / "init.pt").write_bytes(b"retrained")
    [diff] = resume.differences(fp(tmp_path), base)
    assert re.fullmatch(r"contents\.model\.init_weights: file [0-9a-f]{8} in the checkpoint, file [0-9a-f]{8} now", diff)


def test_an_old_checkpoint_is_named_as_such(tmp_path):
    old = {"model": {}, "data": {}, "classes": ["cat"]}
    assert resume.differences({"config": {}}, old) == [
        "fingerprint: the checkpoint was written by an older version of the pipeline"]


def test_the_docs_list_every_safe_key():
    table = (ROOT / "docs" / "running-at-scale.md").read_text().split("## What is safe to change between runs")[1]
    documented = set(re.findall(r"`([a-z_.]+)`", table.split("**What reruns which stage")[0]))
    assert set(resume.RESUME_SAFE) <= documented


def test_a_model_file_counts_by_its_weights_not_its_meta(tmp_path):
    """The prune stage's control model is the distillation teacher of the pruned model's
    fine-tuning. A rerun after a preemption retrains it to the same weights, but its file records
    the rerun's wall time and speed: counted by bytes, the resume was refused, every time."""
    import torch

    from ssd.model_file import save_model_file
    from ssd.models import ssdlite_mobilenet_v2

    torch.manual_seed(0)
    model = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64)
    (tmp_path / "manifest.json").write_text("{}")
    teacher = tmp_path / "control.pt"
    save_model_file(teacher, model, ["a", "b"], meta={"summary": {"wall_time_s": 61.2}})

    def fingerprint() -> dict:
        files = {"data.shards": tmp_path / "manifest.json", "distill.teacher": str(teacher)}
        return resume.fingerprint(to_dict(from_dict(TrainConfig, {"name": "x"})), ["a", "b"], files, "no")

    base = fingerprint()
    save_model_file(teacher, model, ["a", "b"], meta={"summary": {"wall_time_s": 63.9}})  # the rerun
    assert resume.differences(fingerprint(), base) == []
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_model_file(teacher, model, ["a", "b"], meta={"summary": {"wall_time_s": 61.2}})
    [diff] = resume.differences(fingerprint(), base)
    assert diff.startswith("contents.distill.teacher: ")
    changed = fingerprint()
    save_model_file(teacher, model, ["a", "c"], meta={})  # the same weights under other class names
    assert resume.differences(fingerprint(), changed) != []
