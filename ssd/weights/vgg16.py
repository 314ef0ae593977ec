"""ImageNet VGG16 weights into SSD300's backbone (:class:`ssd.models.vgg.VGG16Backbone`).

SSD (Liu et al. 2016, section 3, "Base network") turns VGG16's fc6 and fc7 into
convolutions and subsamples their parameters: conv6 is a 3x3 convolution with
dilation 6 and 1,024 outputs, conv7 a 1x1 convolution with 1,024 outputs. fc6
(``4096 x 512*7*7``) seen as a ``4096 x 512 x 7 x 7`` convolution keeps every
4th output and every 3rd tap in each spatial direction (taps 0, 3, 6: the
dilated kernel then spans the same 7x7 field); fc7 keeps every 4th output and
every 4th input. This is the "reduced fc" VGG16 of DeepLab that the SSD
authors started from; ssd.pytorch ships it as ``vgg16_reducedfc.pth``.

Two layouts are read:

* torchvision's ``vgg16`` state dict (``features.N.*``, ``classifier.0/3/6.*``):
  RGB ``[0, 1]`` ImageNet-standardised input; fc6/fc7 subsampled here;
* ssd.pytorch's ``vgg16_reducedfc.pth`` (``N.weight`` for N in 0..33, conv6 at 31
  and conv7 at 33 already reduced): converted from Caffe, so BGR ``0..255``
  minus the Caffe ImageNet mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from ssd.models.input_norm import IMAGENET, InputNorm

#: Indices of conv6 and conv7 in :class:`ssd.models.vgg.VGG16Backbone`'s ``features``.
CONV6, CONV7 = 31, 33

#: The Caffe VGG16 convention: BGR, 0..255, minus the ImageNet mean, not divided by a std.
CAFFE_VGG = InputNorm(channels="bgr", scale=255.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0))


@dataclass
class BackboneWeights:
    """A backbone state dict in :class:`VGG16Backbone`'s keys and the input its weights expect."""

    state_dict: dict[str, Tensor]
    input_norm: InputNorm
    layout: str
    """Which layout it was read from (for the log)."""


def subsample_fc6(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``fc6 [4096, 25088], [4096] -> conv6 [1024, 512, 3, 3], [1024]`` (every 4th output, taps 0/3/6)."""
    w = weight.reshape(weight.shape[0], 512, 7, 7)
    return w[::4, :, ::3, ::3].contiguous(), bias[::4].contiguous()


def subsample_fc7(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``fc7 [4096, 4096], [4096] -> conv7 [1024, 1024, 1, 1], [1024]`` (every 4th output and input)."""
    return weight[::4, ::4, None, None].contiguous(), bias[::4].contiguous()


def _is_reduced_fc(state_dict: Mapping[str, Tensor]) -> bool:
    return f"{CONV6}.weight" in state_dict and "0.weight" in state_dict


def vgg16_backbone_weights(state_dict: Mapping[str, Tensor]) -> BackboneWeights:
    """Read either layout of the module docstring (or this backbone's own keys) into backbone keys.

    Raises ``ValueError`` naming a few keys when the dict is neither.
    """
    if _is_reduced_fc(state_dict):
        state = {f"features.{k}": v for k, v in state_dict.items() if k.split(".")[0].isdigit()}
        return BackboneWeights(state, CAFFE_VGG, "ssd.pytorch vgg16_reducedfc")
    if "features.0.weight" not in state_dict:
        first = ", ".join(list(state_dict)[:4])
        raise ValueError(
            f"not VGG16 weights (keys {first}, ...): expected torchvision's vgg16 "
            "('features.0.weight', 'classifier.0.weight', ...) or ssd.pytorch's vgg16_reducedfc ('0.weight' .. '33.weight')"
        )
    state = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    layout = "torchvision vgg16"
    if "classifier.0.weight" in state_dict and "classifier.3.weight" in state_dict:
        w6, b6 = subsample_fc6(state_dict["classifier.0.weight"], state_dict["classifier.0.bias"])
        w7, b7 = subsample_fc7(state_dict["classifier.3.weight"], state_dict["classifier.3.bias"])
        state.update({f"features.{CONV6}.weight": w6, f"features.{CONV6}.bias": b6,
                      f"features.{CONV7}.weight": w7, f"features.{CONV7}.bias": b7})
        layout += " (fc6/fc7 subsampled into conv6/conv7)"
    return BackboneWeights(state, IMAGENET, layout)
