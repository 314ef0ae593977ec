"""ssd.pytorch (github.com/amdegroot/ssd.pytorch) SSD300 checkpoints.

Its SSD300 is the same network as :func:`ssd.models.vgg.ssd300_vgg16`, with other
names: ``vgg.N`` is the backbone's ``features.N`` (conv6 at 31, conv7 at 33),
``L2Norm.weight`` the conv4_3 scale, ``extras.0`` .. ``extras.7`` the eight extra
convolutions (two per extra block: the 1x1 and the 3x3), ``loc.k`` / ``conf.k``
the box and class convolutions of map ``k``. Priors: its VOC layout
(:func:`ssd.models.vgg.ssd300_priors`, 8,732 boxes, all four values clamped).

Input: ssd.pytorch reads images with OpenCV (BGR, 0..255), subtracts the mean
(104, 117, 123) in that order, then reorders the channels to RGB (its VOC
dataset's ``pull_item``, and its ``BaseTransform`` at evaluation). The network
therefore sees RGB, 0..255, minus (123, 117, 104), not divided by anything.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ssd.models.input_norm import InputNorm
from ssd.models.vgg import ssd300_priors
from ssd.weights.convert import Converted, Converter, class_count, rename_keys

#: What the network of a trained ssd.pytorch SSD300 sees.
SSD_PYTORCH_INPUT = InputNorm(channels="rgb", scale=255.0, mean=(123.0, 117.0, 104.0), std=(1.0, 1.0, 1.0))

#: ssd.pytorch's VOC classes, in its label order (label k is VOC_CLASSES[k - 1]).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

RULES = [
    (r"vgg\.(\d+)\.(weight|bias)", r"backbone.features.\1.\2"),
    (r"L2Norm\.weight", "backbone.l2norm.weight"),
    (r"loc\.(\d+)\.(weight|bias)", r"head.box_layers.\1.\2"),
    (r"conf\.(\d+)\.(weight|bias)", r"head.cls_layers.\1.\2"),
]


def _extras(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # extras.(2i) is block i's 1x1 (our extras.i.0), extras.(2i+1) its 3x3 (extras.i.2).
    out = {}
    for key, value in state_dict.items():
        _, index, kind = key.split(".")
        i = int(index)
        out[f"extras.{i // 2}.{0 if i % 2 == 0 else 2}.{kind}"] = value
    return out


def matches(state_dict: Mapping[str, Tensor]) -> bool:
    return "L2Norm.weight" in state_dict and "vgg.0.weight" in state_dict


def convert(state_dict: Mapping[str, Tensor]) -> Converted:
    extras = {k: v for k, v in state_dict.items() if k.startswith("extras.")}
    state = rename_keys({k: v for k, v in state_dict.items() if k not in extras}, RULES, "an ssd.pytorch SSD300")
    try:
        state.update(_extras(extras))
        num_classes = class_count(state_dict, "conf.0.weight", "loc.0.weight")
    except (ValueError, KeyError) as e:
        raise ValueError(f"not an ssd.pytorch SSD300 ({e})") from None
    arch = {
        "name": "ssd300_vgg16",
        "num_classes": num_classes,
        "image_size": 300,
        "priors": ssd300_priors().to_dict(),
        "input_norm": SSD_PYTORCH_INPUT.to_dict(),
    }
    names = list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) + 1 else None
    return Converted(arch, state, source="ssd.pytorch SSD300", class_names=names)


CONVERTER = Converter(
    name="ssd.pytorch",
    description="ssd.pytorch SSD300 (keys vgg.N.*, L2Norm.weight, extras.N.*, loc.N.*, conf.N.*)",
    matches=matches,
    convert=convert,
)
