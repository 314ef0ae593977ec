"""Knowledge distillation for SSD: a student learns the outputs of a teacher with the same priors.

Used to recover a pruned detector: the model it was cut from is the teacher (Hinton et al.,
arXiv 1503.02531; for detectors, Chen et al., NeurIPS 2017, "Learning Efficient Object
Detection Models with Knowledge Distillation"). Both models predict for the same ``P`` priors
and ``C`` classes, so every prior's outputs are matched directly, without any matching step:

- **classes**: the KL divergence from the teacher's class distribution to the student's, both at
  temperature ``T`` (multiplied by ``T**2``, so the gradients keep their size as ``T`` changes);
- **boxes**: smooth-L1 between the student's and the teacher's offsets, where the teacher sees an
  object: each prior weighted by the teacher's foreground probability ``1 - p(background)``.

Both sums are divided by the batch's total teacher foreground probability (at least 1): the
teacher's soft count of objects, the distillation's counterpart of the MultiBox loss's number of
positives, so the two losses are on the same scale. Almost every prior is confident background
for both models and adds almost nothing; what is learnt is concentrated where the teacher
detects something and on the background priors it is unsure of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F
from torch import Tensor

from ssd.bounds import Above, AtLeast


@dataclass(frozen=True)
class DistillWeights:
    weight: Annotated[float, AtLeast(0)] = 1.0
    """Weight of the distillation loss added to the MultiBox loss."""
    temperature: Annotated[float, Above(0)] = 1.0
    """Softmax temperature of both class distributions (Hinton et al.'s ``T``)."""
    box_weight: Annotated[float, AtLeast(0)] = 1.0
    """Weight of the box term within the distillation loss."""


def distillation_loss(
    student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], weights: DistillWeights = DistillWeights()
) -> dict[str, Tensor]:
    """The distillation loss of a batch.

    Args:
        student: ``(class_logits [B, P, C], box_deltas [B, P, 4])`` of the model being trained.
        teacher: the same from the teacher (no gradient flows into it).
        weights: temperature and weights.

    Returns:
        ``{"distill_loss": weighted sum (already multiplied by ``weights.weight``),
        "distill_class": class term, "distill_box": box term}``, float32 scalars.
    """
    s_logits, s_deltas = (t.float() for t in student)
    t_logits, t_deltas = (t.detach().float() for t in teacher)
    if s_logits.shape != t_logits.shape or s_deltas.shape != t_deltas.shape:
        raise ValueError(
            f"student outputs {tuple(s_logits.shape)}/{tuple(s_deltas.shape)} and teacher outputs "
            f"{tuple(t_logits.shape)}/{tuple(t_deltas.shape)} differ: distillation needs the same priors and classes"
        )
    temp = weights.temperature
    t_logp = F.log_softmax(t_logits / temp, dim=-1)
    s_logp = F.log_softmax(s_logits / temp, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [B, P]
    foreground = 1.0 - F.softmax(t_logits, dim=-1)[..., 0]  # [B, P], at temperature 1
    normaliser = foreground.sum().clamp(min=1.0)
    class_term = kl.sum() * temp**2 / normaliser
    box = F.smooth_l1_loss(s_deltas, t_deltas, reduction="none", beta=1.0).sum(-1)  # [B, P]
    box_term = (box * foreground).sum() / normaliser
    total = weights.weight * (class_term + weights.box_weight * box_term)
    return {"distill_loss": total, "distill_class": class_term, "distill_box": box_term}
