"""Batch norm folded into the convolution before it: the inference form of a detector.

In eval mode a ``BatchNorm2d`` is a per-channel affine map of the running statistics,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after a ``Conv2d`` it can be written
into the convolution's weights and bias, so the network runs one operator instead of two
(our SSDLite: 77 batch norms, a third of its operators at batch 1). The folding itself is
torch's :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`; this module finds the pairs.

Every batch norm of our detectors follows its convolution in one ``nn.Sequential``
(torchvision's ``Conv2dNormActivation``, the inverted residuals' projections, the heads),
which is where :func:`fold_batchnorm` looks. A batch norm elsewhere is left as it is and
counted in :attr:`Folded.kept`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class Folded:
    model: nn.Module
    """The folded copy, in eval mode (the original is untouched)."""
    folded: int
    """Batch norms written into their convolutions (and removed from their ``Sequential``)."""
    kept: int
    """Batch norms with no convolution right before them, left in place."""


def fold_batchnorm(model: nn.Module) -> Folded:
    """A copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair of a ``Sequential`` folded.

    The copy is for inference only: its outputs equal the original's in eval mode (to float
    rounding), training it would not train batch norms. Attributes such as ``priors``,
    ``arch`` and ``image_size`` come along with the copy.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules.get(first), module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                del module._modules[second]  # not an Identity: eager mode would still call it
                count += 1
    total = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return Folded(folded, count, total - count)
