"""SSDLite-MobileNetV2 laid out as ssds.pytorch (v0.3.1) builds it, to run its checkpoints.

ssds.pytorch's network differs from :func:`ssd.models.ssdlite.ssdlite_mobilenet_v2`
(torchvision's MobileNetV2) in ways its weights depend on:

* its MobileNetV2 (``base``) has its own stem with a ReLU (not ReLU6), and its first
  inverted residual keeps a 1x1 expansion even at expansion ratio 1;
* the block-13 map (96 channels, stride 16) is L2-normalised with a learned scale
  (initialised to 20) before the head reads it; block 14 reads the map before the norm;
* each extra layer is 1x1 straight to the output width, depthwise 3x3 stride 2, 1x1,
  each with batch norm, ReLU6 after the first two, a ReLU after the block;
* the head is plain 3x3 convolutions (:class:`ssd.models.heads.SSDHead`), not separable.

Priors are ssds.pytorch's (:func:`ssd.models.ssdlite.ssds_mobilenet_v2_priors`, 2,990 at 300 px);
the input is BGR ``0..255`` minus (103.94, 116.78, 123.68) (:data:`SSDS_INPUT`).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from ssd.models.heads import SSDHead
from ssd.models.input_norm import InputNorm
from ssd.models.ssd import SSD, head_and_priors
from ssd.models.ssdlite import ssds_mobilenet_v2_priors
from ssd.models.vgg import L2Norm
from ssd.priors import PriorConfig, resolve_prior_config

#: ssds.pytorch's test-time input: OpenCV's BGR, 0..255, minus its pixel means.
SSDS_INPUT = InputNorm(channels="bgr", scale=255.0, mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0))

#: MobileNetV2 stages: (expansion, channels, blocks, first stride), after the 32-channel stem.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

#: Blocks whose outputs are maps, and the extra layers' widths.
TAPS = (13, 17)
EXTRA_CHANNELS = (512, 256, 256, 128)


def _bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + ([act(inplace=True)] if act else [])


class Stem(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv = nn.Sequential(*_bn_act(3, cout, 3, 2, act=nn.ReLU))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class InvertedResidual(nn.Module):
    """1x1 expansion (always), depthwise 3x3, 1x1 projection; the input added when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(*_bn_act(cin, mid, 1), *_bn_act(mid, mid, 3, stride, groups=mid),
                                  *_bn_act(mid, cout, 1, act=None))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class SSDSMobileNetV2Backbone(nn.Module):
    """``Tensor[B, 3, S, S] -> [L2Norm(block 13) (96 ch, S/16), block 17 (320 ch, S/32)]``."""

    taps = TAPS

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        depth = lambda c: max(int(c * width_mult), 8)  # noqa: E731  (ssds.pytorch's rounding)
        blocks: list[nn.Module] = [Stem(depth(32))]
        cin = depth(32)
        for t, c, n, s in STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(cin, depth(c), s if i == 0 else 1, t))
                cin = depth(c)
        self.features = nn.Sequential(*blocks)
        self.norm = L2Norm(depth(96))

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                maps.append(self.norm(x) if not maps else x)
        return maps


def ssds_extra_block(cin: int, cout: int) -> nn.Sequential:
    """1x1 to ``cout``, depthwise 3x3 stride 2, 1x1; batch norm after each; a ReLU after the block."""
    return nn.Sequential(*_bn_act(cin, cout, 1), *_bn_act(cout, cout, 3, 2, groups=cout),
                         *_bn_act(cout, cout, 1, act=None), nn.ReLU(inplace=True))


def ssds_ssdlite_mobilenet_v2(
    num_classes: int,
    image_size: int = 300,
    width_mult: float = 1.0,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> SSD:
    """ssds.pytorch's SSDLite-MobileNetV2 (module docstring); ``input_norm`` defaults to :data:`SSDS_INPUT`."""
    backbone = SSDSMobileNetV2Backbone(width_mult)
    extras, cin = nn.ModuleList(), backbone.features[-1].conv[-1].num_features
    for c in EXTRA_CHANNELS:
        extras.append(ssds_extra_block(cin, c))
        cin = c
    prior_cfg = resolve_prior_config(priors, ssds_mobilenet_v2_priors(), 300, image_size)
    head, prior_boxes = head_and_priors(backbone, extras, SSDHead, prior_cfg, image_size, num_classes)
    norm = InputNorm.from_dict(input_norm) if input_norm is not None else SSDS_INPUT
    arch = {"name": "ssds_ssdlite_mobilenet_v2", "num_classes": num_classes, "image_size": image_size,
            "width_mult": width_mult, "priors": prior_cfg.to_dict(), "input_norm": norm.to_dict()}
    return SSD(backbone, extras, head, prior_boxes, image_size, input_norm=norm, arch=arch)
