"""model.init_weights: a fine-tune's differences load, any other mismatch is refused."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.stage import StageError
from pipeline.training.init_weights import class_dependent_keys, load_init_weights
from ssd.models import build_model

CLASSES = ["car", "person", "bike"]


def arch(name: str = "ssdlite_mobilenet_v2", classes: int = 3, **extra) -> dict:
    return {"name": name, "num_classes": classes + 1, "image_size": 64, "width_mult": 0.25, **extra}


def source_model(spec: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(spec)


def start(target: dict, source_spec: dict, source_classes: list[str], classes: list[str] = CLASSES):
    source = source_model(source_spec)
    torch.manual_seed(1)
    model = build_model(target)
    info = {"class_names": source_classes, "arch": source_spec}
    load_init_weights(model, target, classes, "models/src.pt", source, info)
    return model, source


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def test_class_dependent_keys_are_the_class_prediction_layers():
    keys = class_dependent_keys(arch())
    assert keys and all(k.startswith("head.cls_layers.") for k in keys)
    assert any(k.endswith(".weight") for k in keys) and any(k.endswith(".bias") for k in keys)


def test_the_same_classes_load_everything():
    model, source = start(arch(), arch(), CLASSES)
    assert all(same(v, source.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("source_classes", [["person", "car", "bike"], ["dog", "cat", "boat"], ["car", "person"]])
def test_other_classes_start_the_class_layers_fresh_and_load_the_rest(source_classes, caplog):
    caplog.set_level(logging.INFO)
    model, source = start(arch(), arch(classes=len(source_classes)), source_classes)
    per_class = class_dependent_keys(arch())
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if key in per_class:  # the same count in another order: not copied either
            assert key.endswith(".bias") or not same(value, theirs[key]), key
        else:
            assert same(value, theirs[key]), key
    assert "(other classes)" in caplog.text


def test_an_lstm_ssd_starts_from_its_frame_model_and_the_reverse():
    lstm = arch("lstm_ssd_mobilenet_v2", placement=["backbone"], state_reduction=4)
    model, source = start(lstm, arch(), CLASSES)
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("temporal."):
            assert same(value, theirs[key]), key
    frame, _ = start(arch(), lstm, CLASSES)  # the cells are left out
    assert not any(k.startswith("temporal.") for k in frame.state_dict())


@pytest.mark.parametrize(
    "source_spec, message",
    [
        ({**arch(), "width_mult": 0.5}, "the file's width_mult is 0.5, here 0.25"),
        (arch("ssdlite_mobilenet_v3_large", reduced_tail=False), "its ssdlite_mobilenet_v3_large doesn't fit the ssdlite_mobilenet_v2"),
        ({**arch(), "extra_channels": [64, 32, 32, 16]}, "would start random"),
    ],
)
def test_another_architecture_or_width_is_refused(source_spec, message):
    with pytest.raises(StageError, match=message) as e:
        start(arch(), source_spec, CLASSES)
    text = str(e.value)
    assert "\n" not in text and text.startswith("models/src.pt: ") and "use model.from_file" in text
