"""The input convention a detector's weights were trained with.

Every stage hands the model RGB images scaled to ``[0, 1]``; the model turns
them into what its weights expect, as the first step of its forward (so an
exported graph does it too). Weights from elsewhere expect other things:
torchvision's ImageNet backbones ``[0, 1]`` RGB standardised with ImageNet
statistics; Caffe-trained VGG16 (ssd.pytorch's ``vgg16_reducedfc.pth``)
BGR in ``0..255`` minus a per-channel mean; torchvision's SSDLite ``[-1, 1]``.
:class:`InputNorm` says which, and travels with the model (``arch["input_norm"]``
and the model file's ``input`` entry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

#: ImageNet statistics (RGB, [0, 1] scale): torchvision backbones are trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputNorm:
    """``network input = (pixels[channels] * scale - mean) / std``, per channel.

    ``mean`` and ``std`` are in the network's channel order and in the scaled
    range (e.g. Caffe VGG16: ``channels="bgr", scale=255, mean=(104, 117, 123), std=(1, 1, 1)``).
    """

    channels: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.channels not in ("rgb", "bgr"):
            raise ValueError(f"input channels must be 'rgb' or 'bgr', got {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"input mean and std need 3 values each, got {list(self.mean)} and {list(self.std)}")
        if not self.scale > 0 or not all(s > 0 for s in self.std):
            raise ValueError(f"input scale and std must be positive, got {self.scale} and {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "mean": list(d["mean"]), "std": list(d["std"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "InputNorm" | None) -> "InputNorm":
        if d is None:
            return cls()
        if isinstance(d, InputNorm):
            return d
        unknown = set(d) - {"channels", "scale", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown input keys: {sorted(unknown)}")
        return cls(
            channels=d.get("channels", "rgb"),
            scale=float(d.get("scale", 1.0)),
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
        )

    def unit_mean_std(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` as ``Tensor[1, 3, 1, 1]`` for ``[0, 1]`` pixels (the model's buffers)."""
        mean = torch.tensor(self.mean, dtype=torch.float64) / self.scale
        std = torch.tensor(self.std, dtype=torch.float64) / self.scale
        return mean.float().view(1, 3, 1, 1), std.float().view(1, 3, 1, 1)


#: The convention of torchvision's ImageNet backbones (and of models trained here).
IMAGENET = InputNorm()
