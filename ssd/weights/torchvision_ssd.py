"""torchvision's detection models: ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large``.

Both are trained on COCO (91 categories in torchvision's numbering: the
background, 80 classes and 10 unused ids). Their state dicts, e.g. saved with
``torch.save(model.state_dict(), path)`` from a machine that can download them:

* ``ssd300_vgg16``: the same network as :func:`ssd.models.vgg.ssd300_vgg16`.
  torchvision splits the backbone differently (``features`` up to conv4_3, then
  ``extra.0`` holding pool4 to conv7), calls the conv4_3 scale ``scale_weight``,
  and lays its priors out with ``DefaultBoxGenerator`` (scales 0.07..1.05, only
  the sizes clipped). Input: RGB ``0..255`` minus (123, 117, 104), exactly as
  ``image_mean``/``image_std`` in torchvision's transform say.
* ``ssdlite320_mobilenet_v3_large``: :func:`ssd.models.mobilenet_v3.ssdlite_mobilenet_v3_large`
  with the reduced tail, module names torchvision's except the extras and the head.
  Input ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ssd.models.input_norm import InputNorm
from ssd.models.mobilenet_v3 import mobilenet_v3_large_priors
from ssd.priors import PriorConfig
from ssd.weights.convert import Converted, Converter, class_count, rename_keys

#: torchvision's ssd300_vgg16 transform: ``(x - image_mean) / image_std`` on [0, 1] RGB.
SSD300_INPUT = InputNorm(mean=(0.48235, 0.45882, 0.40784), std=(1.0 / 255.0,) * 3)


def coco_class_names() -> list[str]:
    """torchvision's 90 COCO category names for labels 1..90; its unused ids ("N/A") become ``unused_<id>``."""
    from torchvision.models.detection import SSD300_VGG16_Weights

    names = SSD300_VGG16_Weights.COCO_V1.meta["categories"][1:]
    return [f"unused_{i}" if n == "N/A" else n for i, n in enumerate(names, start=1)]


def ssd300_priors() -> PriorConfig:
    """``DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]], steps=[8, 16, 32, 64, 100, 300])``."""
    scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
    return PriorConfig(
        min_sizes=tuple(s * 300 for s in scales[:-1]),
        max_sizes=tuple(s * 300 for s in scales[1:]),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        steps=(8, 16, 32, 64, 100, 300),
        clip="wh",
    )


_HEAD_RULES = [
    (r"head\.classification_head\.module_list\.(\d+)\.(.*)", r"head.cls_layers.\1.\2"),
    (r"head\.regression_head\.module_list\.(\d+)\.(.*)", r"head.box_layers.\1.\2"),
]

_SSD300_RULES = [
    (r"backbone\.features\.(\d+)\.(weight|bias)", r"backbone.features.\1.\2"),
    (r"backbone\.scale_weight", "backbone.l2norm.weight"),
    # extra.0 is pool4 (0), conv5_1..3 (1, 3, 5), then pool5 + conv6 + conv7 (7.1, 7.3):
    # our features 24, 26, 28, 31 and 33.
    (r"backbone\.extra\.0\.1\.(weight|bias)", r"backbone.features.24.\1"),
    (r"backbone\.extra\.0\.3\.(weight|bias)", r"backbone.features.26.\1"),
    (r"backbone\.extra\.0\.5\.(weight|bias)", r"backbone.features.28.\1"),
    (r"backbone\.extra\.0\.7\.1\.(weight|bias)", r"backbone.features.31.\1"),
    (r"backbone\.extra\.0\.7\.3\.(weight|bias)", r"backbone.features.33.\1"),
    (r"backbone\.extra\.([1-4])\.([02])\.(weight|bias)", lambda m: f"extras.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    *_HEAD_RULES,
]

_SSDLITE_RULES = [
    (r"backbone\.features\.(.*)", r"backbone.features.\1"),
    # extra.i.j.k: block i, its j-th Conv2dNormActivation, k = 0 conv / 1 BN -> our flat extras.i.(3j + k).
    (r"backbone\.extra\.(\d+)\.(\d)\.(\d)\.(.*)", lambda m: f"extras.{m[1]}.{3 * int(m[2]) + int(m[3])}.{m[4]}"),
    # module_list.k.0.{0,1}: depthwise conv and BN; module_list.k.1: the 1x1 -> our .0, .1, .3.
    (r"head\.(classification|regression)_head\.module_list\.(\d+)\.0\.([01])\.(.*)",
     lambda m: f"head.{_HEADS[m[1]]}.{m[2]}.{m[3]}.{m[4]}"),
    (r"head\.(classification|regression)_head\.module_list\.(\d+)\.1\.(weight|bias)",
     lambda m: f"head.{_HEADS[m[1]]}.{m[2]}.3.{m[3]}"),
]
_HEADS = {"classification": "cls_layers", "regression": "box_layers"}


def _convert_ssd300(state_dict: Mapping[str, Tensor]) -> Converted:
    state = rename_keys(state_dict, _SSD300_RULES, "torchvision's ssd300_vgg16")
    num_classes = class_count(state, "head.cls_layers.0.weight", "head.box_layers.0.weight")
    arch = {"name": "ssd300_vgg16", "num_classes": num_classes, "image_size": 300,
            "priors": ssd300_priors().to_dict(), "input_norm": SSD300_INPUT.to_dict()}
    return Converted(arch, state, "torchvision ssd300_vgg16", _coco_names(num_classes))


def _convert_ssdlite(state_dict: Mapping[str, Tensor]) -> Converted:
    state = rename_keys(state_dict, _SSDLITE_RULES, "torchvision's ssdlite320_mobilenet_v3_large")
    num_classes = class_count(state, "head.cls_layers.0.3.weight", "head.box_layers.0.3.weight")
    last = state_dict.get("backbone.features.1.3.0.weight")
    reduced = last is None or last.shape[0] != 960  # the full tail ends in 960 channels
    arch = {"name": "ssdlite_mobilenet_v3_large", "num_classes": num_classes, "image_size": 320,
            "reduced_tail": reduced, "priors": mobilenet_v3_large_priors().to_dict()}
    return Converted(arch, state, "torchvision ssdlite320_mobilenet_v3_large", _coco_names(num_classes))


def _coco_names(num_classes: int) -> list[str] | None:
    names = coco_class_names()
    return names if num_classes == len(names) + 1 else None


CONVERTERS = [
    Converter(
        name="torchvision-ssd300",
        description="torchvision ssd300_vgg16 (keys backbone.features.N.*, backbone.scale_weight, backbone.extra.N.*, head.*)",
        matches=lambda sd: "backbone.scale_weight" in sd,
        convert=_convert_ssd300,
    ),
    Converter(
        name="torchvision-ssdlite320",
        description="torchvision ssdlite320_mobilenet_v3_large (keys backbone.features.0.N.*, backbone.extra.N.*, head.*)",
        matches=lambda sd: "backbone.features.0.0.0.weight" in sd and "backbone.extra.0.0.0.weight" in sd,
        convert=_convert_ssdlite,
    ),
]
