import pytest
import torch
from torch.testing import assert_close

from ssd.boxes import encode
from ssd.loss import LossConfig, MultiBoxLoss
from ssd.priors import PriorConfig, generate_priors

PRIORS = generate_priors(PriorConfig(min_sizes=(20, 40), max_sizes=(40, 80), aspect_ratios=((2,), (2,))), 80, [4, 2])


def target(boxes, labels, difficult=None):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64)}
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult)
    return t


def outputs(batch, num_classes=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = PRIORS.shape[0]
    logits = torch.randn(batch, p, num_classes, generator=g).to(dtype).requires_grad_()
    deltas = torch.randn(batch, p, 4, generator=g).to(dtype).requires_grad_()
    return logits, deltas


def test_image_without_objects_finite_zero_box_loss():
    loss = MultiBoxLoss(PRIORS)
    logits, deltas = outputs(1)
    out = loss(logits, deltas, [target([], [])])
    assert torch.isfinite(out["loss"])
    assert out["box_loss"].item() == 0.0
    assert out["class_loss"].item() > 0  # min_negatives background priors still teach the classifier
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()


def test_empty_image_adds_nothing_with_min_negatives_zero():
    loss = MultiBoxLoss(PRIORS, LossConfig(min_negatives=0))
    logits, deltas = outputs(1)
    out = loss(logits, deltas, [target([], [])])
    assert out["loss"].item() == 0.0


def test_hand_computed_loss_matches_definition():
    """Recompute the loss with plain loops: positives, 3:1 hardest negatives, normalised by N."""
    loss = MultiBoxLoss(PRIORS, LossConfig(min_negatives=0))
    logits, deltas = outputs(2, seed=3)
    targets = [target([[0.1, 0.1, 0.4, 0.45], [0.5, 0.5, 0.9, 0.8]], [1, 3]), target([[0.0, 0.2, 0.3, 0.3]], [2])]
    out = loss(logits, deltas, targets)

    from ssd.matching import match

    total_pos, cls_sum, box_sum = 0, 0.0, 0.0
    for b, t in enumerate(targets):
        matched, labels = match(t["boxes"], t["labels"], PRIORS)
        ce = torch.nn.functional.cross_entropy(logits[b].detach(), labels, reduction="none")
        pos = [i for i in range(len(labels)) if labels[i] > 0]
        negs = sorted((i for i in range(len(labels)) if labels[i] == 0), key=lambda i: -ce[i].item())
        chosen = pos + negs[: 3 * len(pos)]
        cls_sum += sum(ce[i].item() for i in chosen)
        enc = encode(matched, PRIORS)
        for i in pos:
            box_sum += torch.nn.functional.smooth_l1_loss(deltas[b, i].detach(), enc[i], reduction="sum").item()
        total_pos += len(pos)
    assert out["num_positives"].item() == total_pos
    assert out["class_loss"].item() == pytest.approx(cls_sum / total_pos, rel=1e-5)
    assert out["box_loss"].item() == pytest.approx(box_sum / total_pos, rel=1e-5)


def test_difficult_priors_are_neither_positive_nor_negative():
    loss = MultiBoxLoss(PRIORS, LossConfig(min_negatives=0))
    logits, deltas = outputs(1, seed=4)
    hard = loss(logits, deltas, [target([[0.1, 0.1, 0.4, 0.45]], [1], [True])])
    assert hard["num_positives"].item() == 0
    assert hard["loss"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_under_autocast_with_tiny_boxes(dtype):
    loss = MultiBoxLoss(PRIORS)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, PRIORS.shape[0], 8)
    targets = [target([[0.5, 0.5, 0.5 + 1e-4, 0.5 + 1e-4], [0.1, 0.1, 0.9, 0.9]], [1, 2]), target([], [])]
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x) * 100  # large activations in low precision
        out = loss(y[..., :4], y[..., 4:], targets)
    assert out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_zero_width_ground_truth_is_dropped():
    loss = MultiBoxLoss(PRIORS)
    logits, deltas = outputs(1, seed=5)
    with_bad = loss(logits, deltas, [target([[0.3, 0.3, 0.3, 0.6], [0.1, 0.1, 0.4, 0.45]], [1, 2])])
    without = loss(logits, deltas, [target([[0.1, 0.1, 0.4, 0.45]], [2])])
    assert torch.isfinite(with_bad["loss"])
    assert_close(with_bad["loss"], without["loss"])
