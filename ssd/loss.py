"""The MultiBox loss of SSD (arXiv 1512.02325, section 2.2, "Training objective").

``L = (L_conf + L_loc) / max(1, N)`` with ``N`` the number of positive priors
in the batch; ``L_loc`` is smooth-L1 on the encoded offsets of the positives;
``L_conf`` is cross-entropy over the positives and the hardest negatives, at
most ``neg_pos_ratio`` (3) negatives per positive in each image.

It is computed in float32 whatever the autocast dtype of the model's outputs,
so it stays finite under fp16/bf16 mixed precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd.bounds import Above, AtLeast, AtMost, Count
from ssd.boxes import VARIANCES, encode
from ssd.matching import match_batch


@dataclass(frozen=True)
class LossConfig:
    iou_threshold: Annotated[float, Above(0), AtMost(1)] = 0.5
    """IoU from which a prior is matched to a ground-truth box (the paper's 0.5)."""
    neg_pos_ratio: Annotated[float, AtLeast(0)] = 3.0
    """Hard negatives kept per positive in each image (the paper's 3:1)."""
    min_negatives: Count = 3
    """Negatives kept in an image with no positives, so background-only images still teach
    the classifier what background looks like (0 reproduces ssd.pytorch, where they add nothing)."""
    box_weight: Annotated[float, AtLeast(0)] = 1.0
    """Weight of the localisation term (the paper's alpha = 1)."""


class MultiBoxLoss(nn.Module):
    """MultiBox loss over a batch.

    Args:
        priors: ``Tensor[P, 4]`` cxcywh, the model's priors.
        config: thresholds and weights.
    """

    def __init__(self, priors: Tensor, config: LossConfig = LossConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("priors", priors.detach().clone(), persistent=False)

    def forward(
        self, class_logits: Tensor, box_deltas: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Loss of a batch.

        Args:
            class_logits: ``Tensor[B, P, C]`` raw scores (class 0 is the background).
            box_deltas: ``Tensor[B, P, 4]`` predicted offsets.
            targets: per image ``{"boxes": Tensor[N, 4] xyxy normalised, "labels": int64 Tensor[N]
                (>= 1), "difficult": bool Tensor[N] (optional)}``. Zero-size boxes are dropped.

        Returns:
            ``{"loss", "box_loss", "class_loss"}`` scalars (``loss`` is the one to
            backpropagate) and ``"num_positives"`` (a float scalar, for logging).
        """
        cfg = self.config
        class_logits = class_logits.float()
        box_deltas = box_deltas.float()
        with torch.no_grad():
            matched, labels = match_batch(targets, self.priors, cfg.iou_threshold)  # [B,P,4], [B,P]
        positive = labels > 0
        num_pos = positive.sum(dim=1)  # [B]
        normaliser = num_pos.sum().clamp(min=1).float()

        # Localisation: smooth-L1 on the positives' encoded offsets.
        box_targets = encode(matched, self.priors.unsqueeze(0), VARIANCES)
        box_loss = F.smooth_l1_loss(box_deltas[positive], box_targets[positive], reduction="sum", beta=1.0)

        # Confidence: cross-entropy per prior, then hard negative mining.
        ce = F.cross_entropy(
            class_logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
        ).view_as(labels)  # [B, P]
        negative_pool = labels == 0  # ignored priors (label -1) are neither positive nor negative
        with torch.no_grad():
            mining = torch.where(negative_pool, ce, torch.full_like(ce, -1.0))
            order = mining.argsort(dim=1, descending=True)
            rank = order.argsort(dim=1)
            wanted = (num_pos.float() * cfg.neg_pos_ratio).long()
            wanted = torch.where(num_pos == 0, torch.full_like(wanted, cfg.min_negatives), wanted)
            num_neg = torch.minimum(wanted, negative_pool.sum(dim=1))
            negative = negative_pool & (rank < num_neg.unsqueeze(1))
        class_loss = ce[positive | negative].sum()

        box_loss = box_loss / normaliser
        class_loss = class_loss / normaliser
        return {
            "loss": class_loss + cfg.box_weight * box_loss,
            "box_loss": box_loss,
            "class_loss": class_loss,
            "num_positives": num_pos.sum().float(),
        }
