"""The distillation loss (ssd.distill): against torch's KL divergence, and what it teaches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssd.distill import DistillWeights, distillation_loss


def outputs(seed: int, batch: int = 2, priors: int = 50, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, priors, classes, generator=g) * 2, torch.randn(batch, priors, 4, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_class_term_is_torchs_kl_divergence_over_the_teachers_soft_object_count(temperature):
    student, teacher = outputs(0), outputs(1)
    out = distillation_loss(student, teacher, DistillWeights(temperature=temperature, box_weight=0.0))
    t_logp = F.log_softmax(teacher[0] / temperature, dim=-1)
    s_logp = F.log_softmax(student[0] / temperature, dim=-1)
    reference = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True) * temperature**2
    objects = (1 - F.softmax(teacher[0], dim=-1)[..., 0]).sum()
    assert out["distill_class"].item() == pytest.approx((reference / objects).item(), rel=1e-5)
    assert out["distill_loss"].item() == pytest.approx(out["distill_class"].item(), rel=1e-6)


def test_box_term_counts_only_where_the_teacher_sees_an_object():
    student, teacher = outputs(0), outputs(1)
    t_logits = teacher[0].clone()
    t_logits[0, :10, 0] = 50.0  # certain background: these priors' boxes mean nothing
    moved = student[1].clone()
    moved[0, :10] += 100.0
    a = distillation_loss(student, (t_logits, teacher[1]))
    b = distillation_loss((student[0], moved), (t_logits, teacher[1]))
    assert b["distill_box"].item() == pytest.approx(a["distill_box"].item(), rel=1e-5)
    moved[0, 20] += 1.0  # a prior with some foreground probability does count
    c = distillation_loss((student[0], moved), (t_logits, teacher[1]))
    assert c["distill_box"] > a["distill_box"]


def test_zero_and_no_gradient_when_the_student_already_matches():
    teacher = outputs(3)
    student = tuple(t.clone().requires_grad_() for t in teacher)
    out = distillation_loss(student, teacher, DistillWeights(weight=2.0, temperature=2.0))
    assert out["distill_loss"].abs().item() < 1e-6
    out["distill_loss"].backward()
    assert all(s.grad.abs().max().item() < 1e-6 for s in student)


def test_descending_it_moves_the_student_to_the_teacher():
    teacher = outputs(4)
    logits, deltas = (t.clone().requires_grad_() for t in outputs(5))
    opt = torch.optim.Adam([logits, deltas], lr=0.1)
    first = None
    for _ in range(300):
        loss = distillation_loss((logits, deltas), teacher)["distill_loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first
    probs = F.softmax(logits, -1)
    assert torch.allclose(probs, F.softmax(teacher[0], -1), atol=0.02)
    assert not teacher[0].requires_grad  # the teacher is read, never trained


def test_weight_scales_the_total_only():
    student, teacher = outputs(0), outputs(1)
    one = distillation_loss(student, teacher, DistillWeights(weight=1.0, box_weight=0.5))
    three = distillation_loss(student, teacher, DistillWeights(weight=3.0, box_weight=0.5))
    assert three["distill_loss"].item() == pytest.approx(3 * one["distill_loss"].item(), rel=1e-6)
    assert three["distill_class"].item() == pytest.approx(one["distill_class"].item(), rel=1e-6)
    assert one["distill_loss"].item() == pytest.approx(
        one["distill_class"].item() + 0.5 * one["distill_box"].item(), rel=1e-6)


def test_different_priors_are_an_error():
    with pytest.raises(ValueError, match="same priors and classes"):
        distillation_loss(outputs(0, priors=50), outputs(1, priors=40))
