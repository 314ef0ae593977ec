"""The shipped configurations parse into the stages' configs (no unknown keys, right types)."""

from pathlib import Path

import pytest

from pipeline.config import load_config, load_params
from pipeline.evaluate import EvaluateConfig
from pipeline.prepare import PrepareConfig
from pipeline.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"]


def stage_config(section: str):
    if section.startswith("train"):
        return TrainConfig
    if section.startswith("evaluate"):
        return EvaluateConfig
    if section == "prepare":
        return PrepareConfig
    return None


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_section_parses(path):
    params = load_params(path)
    checked = 0
    for section in params:
        cls = stage_config(section)
        if cls is not None:
            load_config(cls, params, section)
            checked += 1
    assert checked >= 2


def test_ready_made_recipes_exist():
    names = {p.name for p in FILES}
    assert {"ssd300_vgg16_voc.yaml", "ssdlite_mobilenet_v2_voc.yaml", "lstm_ssd_ir.yaml"} <= names
    vgg = load_config(TrainConfig, load_params(ROOT / "configs/ssd300_vgg16_voc.yaml"), "train")
    assert vgg.model.name == "ssd300_vgg16" and vgg.optim.name == "sgd" and vgg.optim.schedule == "step"
