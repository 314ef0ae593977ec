"""The SSD detector, assembled from parts passed in.

``SSD(backbone, extras, head, priors)``: the backbone returns its feature maps
(a list, highest resolution first), each extra layer turns the last map into a
smaller one, and the head predicts class logits and box offsets for every
prior of every map. The priors are computed once by the builder, from the
feature-map sizes this very backbone produces at the input size, and stored
as a buffer.

``forward`` returns raw predictions in train and eval mode alike; the loss
(:mod:`ssd.loss`) and the post-processing (:mod:`ssd.postprocess`) are
separate modules.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ssd.priors import generate_priors

from ssd.models.input_norm import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, InputNorm  # noqa: F401


class SSD(nn.Module):
    """Single-shot detector.

    Args:
        backbone: ``Tensor[B, 3, S, S] -> list[Tensor[B, C_k, H_k, W_k]]``.
        extras: layers each taking the previous last map and producing the next map.
        head: ``list of maps -> (Tensor[B, P, C], Tensor[B, P, 4])``.
        priors: ``Tensor[P, 4]`` cxcywh normalised, in the head's output order.
        image_size: the square input side the priors were made for.
        input_norm: what the weights expect (channel order, scale, mean, std); the
            forward turns the ``[0, 1]`` RGB input into it.
        arch: the builder's name and arguments (plain data), stored in model files
            so the model can be rebuilt.
    """

    def __init__(
        self,
        backbone: nn.Module,
        extras: nn.ModuleList,
        head: nn.Module,
        priors: Tensor,
        image_size: int,
        input_norm: InputNorm = IMAGENET,
        arch: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.extras = extras
        self.head = head
        self.image_size = image_size
        self.arch = dict(arch or {})
        self.register_buffer("priors", priors.detach().clone())
        self.input_norm = input_norm
        self.bgr = input_norm.channels == "bgr"
        mean, std = input_norm.unit_mean_std()  # for [0, 1] pixels
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def normalize(self, images: Tensor) -> Tensor:
        """``[0, 1]`` RGB -> what the weights expect (:attr:`input_norm`)."""
        if self.bgr:
            images = images.flip(1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def extra_features(self, last: Tensor) -> list[Tensor]:
        """The extra layers' maps, computed from the backbone's last map."""
        maps = []
        for layer in self.extras:
            last = layer(last)
            maps.append(last)
        return maps

    def features(self, images: Tensor) -> list[Tensor]:
        """All feature maps the head reads, highest resolution first."""
        maps = list(self.backbone(self.normalize(images)))
        return maps + self.extra_features(maps[-1])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``Tensor[B, 3, S, S]`` RGB in ``[0, 1]`` -> ``(class_logits [B, P, C], box_deltas [B, P, 4])``."""
        return self.head(self.features(images))


@torch.no_grad()
def feature_shapes(
    backbone: nn.Module, extras: Sequence[nn.Module], image_size: int
) -> list[tuple[int, int, int]]:
    """``(channels, height, width)`` of every map backbone + extras produce at ``image_size``.

    Runs one dummy forward in eval mode (so batch norm doesn't mind a batch of
    one) and restores the modules' modes. ``ValueError`` when ``image_size`` is too small
    for the layers (a map would shrink to nothing).
    """
    modes = [(m, m.training) for m in [backbone, *extras]]
    for m, _ in modes:
        m.eval()
    try:
        device = next(backbone.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        maps = list(backbone(x))
        last = maps[-1]
        for layer in extras:
            last = layer(last)
            maps.append(last)
    except RuntimeError as e:  # a convolution or pooling with nothing left to work on
        if "size" not in str(e):
            raise
        raise ValueError(f"image_size {image_size} is too small for this architecture: "
                         f"a feature map would be empty ({str(e).strip().splitlines()[0][:120]})") from None
    finally:
        for m, mode in modes:
            m.train(mode)
    return [(int(t.shape[1]), int(t.shape[2]), int(t.shape[3])) for t in maps]


def head_and_priors(
    backbone: nn.Module, extras: Sequence[nn.Module], head_type: Any, prior_cfg: Any, image_size: int, num_classes: int
) -> tuple[nn.Module, Tensor]:
    """The head for the maps ``backbone`` and ``extras`` produce at ``image_size``, and their priors.

    ``head_type(in_channels, num_anchors, num_classes)`` is built with the prior config's
    priors per location (the priors fix the head's widths); returns ``(head, Tensor[P, 4] priors)``.
    """
    shapes = feature_shapes(backbone, extras, image_size)
    head = head_type([c for c, _, _ in shapes], prior_cfg.num_anchors_per_location(), num_classes)
    return head, generate_priors(prior_cfg, image_size, [(h, w) for _, h, w in shapes])


def load_backbone_weights(backbone: nn.Module, state_dict: Mapping[str, Tensor], source: str = "backbone weights"):
    """Load weights in the backbone's own keys (``features.N.*``; other keys ignored) and log what loaded.

    Layers the weights don't cover start fresh, and the log names them (with the backbone's
    ``layer_labels`` and ``by_design`` attributes, when it has them). Raises ``ValueError``
    naming the first key whose shape doesn't match (weights of another width), or when no
    key matches. Returns the :class:`ssd.weights.loading.LoadReport`.
    """
    from ssd.weights.loading import load_matching

    own = backbone.state_dict()
    if not any(k in own for k in state_dict):
        raise ValueError(f"{source}: no backbone weights match (expected keys like 'features.0.weight', "
                         f"got {', '.join(list(state_dict)[:3])}, ...)")
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{source}: weight {k}: shape {tuple(v.shape)} does not match {tuple(own[k].shape)}")
    report = load_matching(backbone, {k: v for k, v in state_dict.items() if k in own}, source,
                           labels=getattr(backbone, "layer_labels", None), by_design=getattr(backbone, "by_design", None))
    report.log()
    return report


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every batch-norm layer of ``model`` in eval mode (call after ``model.train()``).

    They then normalise with their running statistics and stop updating them, as in
    evaluation; their affine weights still train. For fine-tuning a trained detector
    on batches whose statistics are not the data's, such as a few clips of a few
    scenes each.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
