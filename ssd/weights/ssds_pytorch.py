"""ssds.pytorch (github.com/ShuangXieIrene/ssds.pytorch, v0.3.1) SSDLite-MobileNetV2 checkpoints.

The network is :func:`ssd.models.ssds_mobilenet_v2.ssds_ssdlite_mobilenet_v2`, whose module
names follow ssds.pytorch's: ``base.N.conv.*`` is the backbone's ``features.N.conv.*``,
``norm.weight`` the block-13 L2Norm scale, ``extras.K.*`` the extra layers (same
indices), ``loc.k`` / ``conf.k`` the box and class convolutions of map ``k``. ssds.pytorch
saves the bare state dict (a ``module.`` prefix, if any, is removed by :func:`ssd.weights.convert.convert`).
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ssd.weights.convert import Converted, Converter, class_count, rename_keys
from ssd.weights.ssd_pytorch import VOC_CLASSES

RULES = [
    (r"base\.(\d+)\.conv\.(.*)", r"backbone.features.\1.conv.\2"),
    (r"norm\.weight", "backbone.norm.weight"),
    (r"extras\.(\d+)\.(\d+)\.(.*)", r"extras.\1.\2.\3"),
    (r"loc\.(\d+)\.(weight|bias)", r"head.box_layers.\1.\2"),
    (r"conf\.(\d+)\.(weight|bias)", r"head.cls_layers.\1.\2"),
]


def matches(state_dict: Mapping[str, Tensor]) -> bool:
    return "norm.weight" in state_dict and "base.0.conv.0.weight" in state_dict


def convert(state_dict: Mapping[str, Tensor]) -> Converted:
    state = rename_keys(state_dict, RULES, "an ssds.pytorch SSDLite-MobileNetV2")
    try:
        num_classes = class_count(state_dict, "conf.0.weight", "loc.0.weight")
        width_mult = state_dict["base.0.conv.0.weight"].shape[0] / 32
    except KeyError as e:
        raise ValueError(f"not an ssds.pytorch SSDLite-MobileNetV2 (no {e})") from None
    arch = {"name": "ssds_ssdlite_mobilenet_v2", "num_classes": num_classes, "image_size": 300,
            "width_mult": width_mult}
    names = list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) + 1 else None
    return Converted(arch, state, source="ssds.pytorch SSDLite-MobileNetV2", class_names=names)


CONVERTER = Converter(
    name="ssds.pytorch",
    description="ssds.pytorch SSDLite-MobileNetV2 (keys base.N.conv.*, norm.weight, extras.N.*, loc.N.*, conf.N.*)",
    matches=matches,
    convert=convert,
)
