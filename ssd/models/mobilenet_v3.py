"""SSDLite with the MobileNetV3-Large backbone, laid out as torchvision's ``ssdlite320_mobilenet_v3_large``.

The MobileNetV3 paper (arXiv 1905.02244, section 6.3) attaches the first SSDLite
map to the *expansion* layer of the first stride-32 block (C4), not to a block's
output: the backbone is torchvision's ``mobilenet_v3_large`` feature stack cut
in two there, ``features.0`` (start to C4's 1x1 expansion, stride 16, 672
channels) and ``features.1`` (C4's depthwise convolution to the end, stride 32,
960 channels, 480 with the reduced tail of the paper's Table 6, which
torchvision's COCO model uses). Four extra blocks (as :func:`ssd.models.ssdlite.extra_block`)
give 512/256/256/128 channels; the head is :class:`ssd.models.heads.SSDLiteHead`.
Batch norms use torchvision's detection settings (eps 0.001, momentum 0.03). At
320 px the maps are 20/10/5/3/2/1 and there are 3,234 priors.

The module names are torchvision's (``backbone.features.0.*`` ...), so its
detection weights convert by renaming the extras and head only
(:mod:`ssd.weights.torchvision_ssd`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torchvision
from torch import Tensor, nn

from ssd.models.heads import SSDLiteHead
from ssd.models.input_norm import InputNorm
from ssd.models.ssd import SSD, head_and_priors, load_backbone_weights
from ssd.models.ssdlite import EXTRA_CHANNELS, extra_block, scaled_channels
from ssd.priors import PriorConfig, resolve_prior_config

#: torchvision's batch-norm settings for its SSDLite.
BN_EPS, BN_MOMENTUM = 0.001, 0.03

#: torchvision's SSDLite input: [0, 1] RGB mapped to [-1, 1].
MINUS_ONE_TO_ONE = InputNorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class MobileNetV3Backbone(nn.Module):
    """``Tensor[B, 3, S, S] -> [C4 expansion (S/16), last block (S/32)]``.

    Args:
        stack: the ``features`` of a torchvision ``mobilenet_v3_large`` (with its weights,
            if any): the backbone is cut from it, so ImageNet weights load by loading that
            network first.
    """

    #: Both stages' outputs are maps (what LSTM-SSD's feature path reads).
    taps = (0, 1)

    def __init__(self, stack: nn.Sequential):
        super().__init__()
        c4 = [i for i, b in enumerate(stack) if getattr(b, "_is_cn", False)][-1]  # first stride-32 block
        self.features = nn.Sequential(
            nn.Sequential(*stack[:c4], stack[c4].block[0]),
            nn.Sequential(stack[c4].block[1:], *stack[c4 + 1:]),
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        c4 = self.features[0](x)
        return [c4, self.features[1](c4)]


def mobilenet_v3_large_priors() -> PriorConfig:
    """torchvision's SSDLite320 priors: scales 0.2..0.95 (and 1.0), ratios 2 and 3 on every map."""
    scales = [0.2 + (0.95 - 0.2) * k / 5 for k in range(6)] + [1.0]
    return PriorConfig(
        min_sizes=tuple(s * 320 for s in scales[:-1]),
        max_sizes=tuple(s * 320 for s in scales[1:]),
        aspect_ratios=((2, 3),) * 6,
        steps=None,
        clip="wh",
    )


def ssdlite_mobilenet_v3_large(
    num_classes: int,
    image_size: int = 320,
    width_mult: float = 1.0,
    reduced_tail: bool = True,
    extra_channels: Sequence[int] | None = None,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    backbone_state_dict: Mapping[str, Tensor] | None = None,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> SSD:
    """SSDLite-MobileNetV3-Large.

    Args:
        num_classes: object classes + 1 (background).
        image_size: square input side; the default priors are for 320.
        width_mult: MobileNetV3 width multiplier.
        reduced_tail: halve the channels of the last stage (torchvision's COCO model does).
        extra_channels: widths of the extra blocks (default 512/256/256/128 times ``width_mult``).
        priors: prior layout (default :func:`mobilenet_v3_large_priors`, scaled for other sizes).
        backbone_state_dict: torchvision ``mobilenet_v3_large`` weights of the same width and
            tail (keys ``features.N.*``), e.g. read by :func:`ssd.model_file.load_state_dict_file`.
        input_norm: what the weights expect (default: ``[-1, 1]``, torchvision's SSDLite).
    """
    norm_layer = partial(nn.BatchNorm2d, eps=BN_EPS, momentum=BN_MOMENTUM)
    net = torchvision.models.mobilenet_v3_large(weights=None, width_mult=width_mult, reduced_tail=reduced_tail,
                                                norm_layer=norm_layer)
    if backbone_state_dict is not None:
        load_backbone_weights(net, backbone_state_dict, "torchvision mobilenet_v3_large")
    backbone = MobileNetV3Backbone(net.features)
    extra_channels = list(extra_channels) if extra_channels is not None else scaled_channels(EXTRA_CHANNELS, width_mult)
    in_channels = backbone.features[1][-1].out_channels
    extras = nn.ModuleList()
    for c in extra_channels:
        extras.append(extra_block(in_channels, c))
        in_channels = c
    prior_cfg = resolve_prior_config(priors, mobilenet_v3_large_priors(), 320, image_size)
    head, prior_boxes = head_and_priors(backbone, extras, SSDLiteHead, prior_cfg, image_size, num_classes)
    for m in [*extras.modules(), *head.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = BN_EPS, BN_MOMENTUM
    norm = InputNorm.from_dict(input_norm) if input_norm is not None else MINUS_ONE_TO_ONE
    arch = {
        "name": "ssdlite_mobilenet_v3_large",
        "num_classes": num_classes,
        "image_size": image_size,
        "width_mult": width_mult,
        "reduced_tail": reduced_tail,
        "extra_channels": extra_channels,
        "priors": prior_cfg.to_dict(),
        "input_norm": norm.to_dict(),
    }
    return SSD(backbone, extras, head, prior_boxes, image_size, input_norm=norm, arch=arch)
