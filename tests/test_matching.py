import torch
from torch.testing import assert_close

from ssd.boxes import xyxy_to_cxcywh
from ssd.matching import IGNORE, match, match_batch

# Four priors side by side on one row, each 0.25 wide.
PRIORS_XYXY = torch.tensor(
    [[0.0, 0.0, 0.25, 0.25], [0.25, 0.0, 0.5, 0.25], [0.5, 0.0, 0.75, 0.25], [0.75, 0.0, 1.0, 0.25]]
)
PRIORS = xyxy_to_cxcywh(PRIORS_XYXY)


def test_threshold_and_labels():
    gt = torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.0, 0.7, 0.25]])  # IoU 1 with p0, 0.8 with p2
    boxes, labels = match(gt, torch.tensor([3, 5]), PRIORS)
    assert labels.tolist() == [3, 0, 5, 0]
    assert_close(boxes[0], gt[0])
    assert_close(boxes[2], gt[1])


def test_best_prior_is_forced_positive_below_threshold():
    gt = torch.tensor([[0.3, 0.0, 0.4, 0.1]])  # tiny: IoU with p1 = 0.01/0.0625 = 0.16
    _, labels = match(gt, torch.tensor([2]), PRIORS)
    assert labels.tolist() == [0, 2, 0, 0]


def test_forced_prior_goes_to_its_own_box_not_the_better_overlapping_one():
    # Box a overlaps p1 well; box b (tiny, inside p1) has p1 as its only overlap: p1 is forced to b.
    a = torch.tensor([0.25, 0.0, 0.5, 0.25])
    b = torch.tensor([0.3, 0.05, 0.35, 0.1])
    boxes, labels = match(torch.stack([a, b]), torch.tensor([1, 2]), PRIORS)
    assert labels[1] == 2
    assert_close(boxes[1], b)


def test_difficult_boxes_are_ignored_not_negative_and_not_forced():
    gt = torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.0, 0.75, 0.25], [0.8, 0.0, 0.85, 0.05]])
    difficult = torch.tensor([False, True, True])
    _, labels = match(gt, torch.tensor([1, 2, 3]), PRIORS, difficult)
    # p2 matches a difficult box: ignored; the tiny difficult box forces nothing (p3 background).
    assert labels.tolist() == [1, 0, IGNORE, 0]


def test_zero_size_boxes_are_dropped():
    gt = torch.tensor([[0.5, 0.0, 0.5, 0.25], [0.0, 0.0, 0.25, 0.25]])  # first has zero width
    boxes, labels = match(gt, torch.tensor([4, 1]), PRIORS)
    assert labels.tolist() == [1, 0, 0, 0]
    assert torch.isfinite(boxes).all()


def test_no_objects_all_background():
    boxes, labels = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), PRIORS)
    assert labels.tolist() == [0, 0, 0, 0]
    assert boxes.shape == (4, 4)


def test_match_batch_stacks():
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 0.25, 0.25]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "difficult": torch.zeros(0, dtype=torch.bool)},
    ]
    boxes, labels = match_batch(targets, PRIORS)
    assert boxes.shape == (2, 4, 4)
    assert labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]
