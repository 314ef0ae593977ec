"""SSDLite with the MobileNetV2 backbone (MobileNetV2 paper, arXiv 1801.04381, section 6.2).

The layout is ssds.pytorch's SSDLite-MobileNetV2 baseline: the backbone is
torchvision's ``mobilenet_v2`` feature stack (any width multiplier) tapped
after block 13 (stride 16, 96 channels at width 1) and block 17 (stride 32,
320 channels); four extra blocks (1x1 squeeze, depthwise 3x3 stride 2, 1x1
expand, each with batch norm and ReLU6) add maps of 512, 256, 256 and 128
channels; the head is depthwise-separable. At 300 px the maps are
19/10/5/3/2/1 and there are 2,990 priors.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torchvision
from torch import Tensor, nn

from ssd.models.heads import SSDLiteHead
from ssd.models.input_norm import InputNorm
from ssd.models.ssd import SSD, head_and_priors, load_backbone_weights
from ssd.priors import PriorConfig, resolve_prior_config

#: Blocks of torchvision's ``mobilenet_v2().features`` whose outputs feed the head
#: (ssds.pytorch's baseline). Adding block 6 (stride 8) gives small objects a finer grid.
TAPS = (13, 17)

#: The last block at stride 16: where the LSTM-SSD paper puts its ConvLSTM.
STRIDE16_BLOCK = 13

#: The last block at stride 8 (the tap that adds a stride-8 map).
STRIDE8_BLOCK = 6

#: Extra-layer widths of the baseline at width multiplier 1.
EXTRA_CHANNELS = (512, 256, 256, 128)


class MobileNetV2Backbone(nn.Module):
    """``Tensor[B, 3, S, S] -> [output of each tapped block]`` (default: block 13 at S/16, block 17 at S/32).

    Args:
        width_mult: torchvision's width multiplier (channels rounded to multiples of 8).
        taps: increasing block indices of ``mobilenet_v2().features`` whose outputs are maps
            (at most 17; e.g. ``(6, 13, 17)`` adds the stride-8 map).
    """

    def __init__(self, width_mult: float = 1.0, taps: Sequence[int] = TAPS):
        super().__init__()
        taps = tuple(int(t) for t in taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 1 or taps[-1] > 17:
            raise ValueError(f"taps must be increasing block indices in 1..17, got {list(taps)}")
        self.taps = taps
        stack = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult).features
        # Blocks after the last tap (block 18, the 1x1 conv to 1280 channels) are not used.
        self.features = nn.Sequential(*list(stack)[: taps[-1] + 1])

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        return maps


def extra_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Halve the resolution: 1x1 to ``out/2``, depthwise 3x3 stride 2, 1x1 to ``out``."""
    mid = max(out_channels // 2, 8)
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU6(inplace=True),
        nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU6(inplace=True),
        nn.Conv2d(mid, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


def ssds_mobilenet_v2_priors() -> PriorConfig:
    """ssds.pytorch's SSDLite-MobileNetV2 priors at 300 px: sizes 45..315 step 45, 2,990 boxes."""
    return PriorConfig(
        min_sizes=(45, 90, 135, 180, 225, 270),
        max_sizes=(90, 135, 180, 225, 270, 315),
        aspect_ratios=((1, 2, 3), (1, 2, 3), (1, 2, 3), (1, 2, 3), (1, 2), (1, 2)),
        steps=(16, 32, 64, 100, 150, 300),
        clip=True,
    )


def scaled_channels(channels: Sequence[int], width_mult: float) -> list[int]:
    """Widths times the multiplier, rounded to a multiple of 8, at least 16."""
    return [max(16, int(c * width_mult + 4) // 8 * 8) for c in channels]


def ssdlite_mobilenet_v2(
    num_classes: int,
    width_mult: float = 1.0,
    image_size: int = 300,
    extra_channels: Sequence[int] | None = None,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    backbone_state_dict: Mapping[str, Tensor] | None = None,
    taps: Sequence[int] = TAPS,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> SSD:
    """SSDLite-MobileNetV2.

    Args:
        num_classes: object classes + 1 (background).
        width_mult: MobileNetV2 width multiplier; also scales the extra layers.
        image_size: square input side.
        extra_channels: widths of the extra blocks (default: 512/256/256/128 times ``width_mult``);
            one map per entry.
        priors: prior layout (default: ssds.pytorch's at 300, scaled for other sizes). It must
            describe ``len(taps) + len(extra_channels)`` maps.
        backbone_state_dict: torchvision ``mobilenet_v2`` weights of the same width (keys
            ``features.N.*``), e.g. read by :func:`ssd.model_file.load_state_dict_file`.
        taps: backbone blocks whose outputs are maps (default ssds.pytorch's 13 and 17).
        input_norm: what the weights expect (default torchvision's ImageNet convention).
    """
    extra_channels = list(extra_channels) if extra_channels is not None else scaled_channels(EXTRA_CHANNELS, width_mult)
    prior_cfg = resolve_prior_config(priors, ssds_mobilenet_v2_priors(), 300, image_size)
    backbone = MobileNetV2Backbone(width_mult, taps)
    if backbone_state_dict is not None:
        load_backbone_weights(backbone, backbone_state_dict, "torchvision mobilenet_v2")
    in_channels = backbone.features[backbone.taps[-1]].out_channels
    extras = nn.ModuleList()
    for c in extra_channels:
        extras.append(extra_block(in_channels, c))
        in_channels = c
    for m in extras.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    head, prior_boxes = head_and_priors(backbone, extras, SSDLiteHead, prior_cfg, image_size, num_classes)
    arch = {
        "name": "ssdlite_mobilenet_v2",
        "num_classes": num_classes,
        "width_mult": width_mult,
        "image_size": image_size,
        "extra_channels": extra_channels,
        "priors": prior_cfg.to_dict(),
        "taps": list(backbone.taps),
    }
    norm = InputNorm.from_dict(input_norm)
    if input_norm is not None:
        arch["input_norm"] = norm.to_dict()
    return SSD(backbone, extras, head, prior_boxes, image_size, input_norm=norm, arch=arch)
