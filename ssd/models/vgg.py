"""SSD300 with the VGG16 backbone, as in the SSD paper and ssd.pytorch.

The backbone is torchvision's ``vgg16`` feature stack with ssd.pytorch's changes
(SSD paper, section 3): pool3 in ceil mode (so 300 px gives a 38x38 conv4_3),
pool5 3x3 with stride 1, fc6/fc7 replaced by a dilated 3x3 ``conv6`` and a 1x1
``conv7``, and an L2 normalisation with a learned per-channel scale (init 20)
on conv4_3 (ParseNet, arXiv 1506.04579). Layer indices match torchvision's, so
a torchvision ``vgg16`` state dict loads into ``features``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torchvision
from torch import Tensor, nn

from ssd.models.heads import SSDHead
from ssd.models.input_norm import IMAGENET, InputNorm
from ssd.models.ssd import SSD, head_and_priors, load_backbone_weights
from ssd.weights.vgg16 import vgg16_backbone_weights
from ssd.priors import PriorConfig, resolve_prior_config

#: Index of relu4_3 in torchvision's vgg16 ``features``.
CONV4_3 = 22


class L2Norm(nn.Module):
    """Scale each location's channel vector to unit L2 norm, then by a learned per-channel weight."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: Tensor) -> Tensor:
        # The norm in float32: a sum of 512 squares overflows float16.
        norm = x.float().pow(2).sum(dim=1, keepdim=True).sqrt().add(self.eps)
        return (x.float() / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


class VGG16Backbone(nn.Module):
    """``Tensor[B, 3, S, S] -> [conv4_3 (L2-normed, 512 ch, S/8), conv7 (1024 ch, S/16)]``."""

    #: Names for load reports.
    layer_labels = {"features.31": "conv6 (features.31)", "features.33": "conv7 (features.33)"}
    #: Layers that start from their initialisation whatever the weights.
    by_design = {"l2norm": "scale 20, the SSD paper's start"}

    def __init__(self):
        super().__init__()
        # torchvision's own layer list for VGG16 ("D"), without building the 120M-parameter classifier.
        layers = list(torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]))
        layers[16] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)  # pool3
        layers[30] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)  # pool5
        layers += [
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # conv6
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),  # conv7
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.l2norm = L2Norm(512)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        conv4_3 = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == CONV4_3:
                conv4_3 = self.l2norm(x)
        return [conv4_3, x]


def vgg_extras(in_channels: int = 1024) -> nn.ModuleList:
    """ssd.pytorch's extra layers: 1x1 squeeze then 3x3 (stride 2 twice, then valid twice)."""

    def block(cin: int, mid: int, cout: int, stride: int, padding: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, mid, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, stride=stride, padding=padding),
            nn.ReLU(inplace=True),
        )

    extras = nn.ModuleList(
        [
            block(in_channels, 256, 512, 2, 1),  # 19 -> 10
            block(512, 128, 256, 2, 1),  # 10 -> 5
            block(256, 128, 256, 1, 0),  # 5 -> 3
            block(256, 128, 256, 1, 0),  # 3 -> 1
        ]
    )
    for m in extras.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return extras


def ssd300_priors() -> PriorConfig:
    """ssd.pytorch's VOC priors for SSD300: maps 38/19/10/5/3/1, 8,732 boxes."""
    return PriorConfig(
        min_sizes=(30, 60, 111, 162, 213, 264),
        max_sizes=(60, 111, 162, 213, 264, 315),
        aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        steps=(8, 16, 32, 64, 100, 300),
        clip=True,
    )


def ssd300_vgg16(
    num_classes: int,
    image_size: int = 300,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    backbone_state_dict: Mapping[str, Tensor] | None = None,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> SSD:
    """SSD300-VGG16.

    Args:
        num_classes: object classes + 1 (background).
        image_size: square input side; the default priors are for 300.
        priors: prior layout (default :func:`ssd300_priors`, scaled for other sizes).
        backbone_state_dict: ImageNet VGG16 weights, torchvision's ``vgg16`` or ssd.pytorch's
            ``vgg16_reducedfc`` (:mod:`ssd.weights.vgg16`: fc6/fc7 become conv6/conv7), e.g. read
            by :func:`ssd.model_file.load_state_dict_file`; never downloaded.
        input_norm: what the weights expect (default: the backbone weights' convention, else
            torchvision's ImageNet one).
    """
    prior_cfg = resolve_prior_config(priors, ssd300_priors(), 300, image_size)
    backbone = VGG16Backbone()
    if backbone_state_dict is not None:
        weights = vgg16_backbone_weights(backbone_state_dict)
        load_backbone_weights(backbone, weights.state_dict, weights.layout)
        if input_norm is None and weights.input_norm != IMAGENET:
            input_norm = weights.input_norm  # Caffe weights: Caffe's input convention
    extras = vgg_extras()
    head, prior_boxes = head_and_priors(backbone, extras, SSDHead, prior_cfg, image_size, num_classes)
    arch = {"name": "ssd300_vgg16", "num_classes": num_classes, "image_size": image_size, "priors": prior_cfg.to_dict()}
    norm = InputNorm.from_dict(input_norm)
    if input_norm is not None:
        arch["input_norm"] = norm.to_dict()
    return SSD(backbone, extras, head, prior_boxes, image_size, input_norm=norm, arch=arch)
