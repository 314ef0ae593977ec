import math

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import box_convert

from ssd import boxes as B


def random_boxes(n, generator=None):
    xy = torch.rand(n, 2, generator=generator) * 0.7
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
    return torch.cat((xy, xy + wh), dim=1)


def test_conversions_match_torchvision_and_round_trip():
    g = torch.Generator().manual_seed(0)
    b = random_boxes(50, g)
    c = B.xyxy_to_cxcywh(b)
    assert_close(c, box_convert(b, "xyxy", "cxcywh"))
    assert_close(B.cxcywh_to_xyxy(c), b)
    # any leading shape
    assert B.xyxy_to_cxcywh(b.view(5, 10, 4)).shape == (5, 10, 4)


def test_iou_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_boxes(30, g), random_boxes(40, g)
    assert_close(B.box_iou(a, b), tv_box_iou(a, b))


def test_iou_of_zero_area_boxes_is_zero_not_nan():
    a = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.4]])
    iou = B.box_iou(a, a)
    assert torch.isfinite(iou).all()
    assert_close(iou, torch.zeros(2, 2))


def test_encode_then_decode_returns_the_boxes():
    g = torch.Generator().manual_seed(2)
    gt = random_boxes(100, g)
    priors = B.xyxy_to_cxcywh(random_boxes(100, g))
    assert_close(B.decode(B.encode(gt, priors), priors), gt, atol=1e-6, rtol=1e-5)


def test_encode_hand_computed():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    gt = torch.tensor([[0.42, 0.35, 0.62, 0.55]])  # centre (0.52, 0.45), size (0.2, 0.2)
    expected = torch.tensor([[0.02 / (0.1 * 0.2), -0.05 / (0.1 * 0.4), 0.0, math.log(0.5) / 0.2]])
    assert_close(B.encode(gt, prior), expected)


def test_zero_size_target_encodes_finite():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.3, 0.3, 0.3, 0.6]])  # zero width
    assert torch.isfinite(B.encode(gt, prior)).all()


def test_decode_clamps_before_exp():
    prior = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    out = B.decode(deltas, prior)
    assert torch.isfinite(out).all()
    w = out[0, 2] - out[0, 0]
    assert_close(w, torch.tensor(0.1 * 1000 / 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_low_precision_finite(dtype):
    prior = torch.tensor([[0.5, 0.5, 0.1, 0.1]], dtype=dtype)
    deltas = torch.tensor([[5.0, -5.0, 100.0, -100.0]], dtype=dtype)
    assert torch.isfinite(B.decode(deltas, prior)).all()


def test_valid_boxes():
    b = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.1, 0.2], [0.3, 0.3, 0.2, 0.4]])
    assert B.valid_boxes(b).tolist() == [True, False, False]


def test_decode_numpy_equals_decode_then_clip():
    from ssd.boxes import clip_boxes, decode, decode_numpy

    g = torch.Generator().manual_seed(0)
    priors = torch.cat([torch.rand(500, 2, generator=g), 0.05 + 0.5 * torch.rand(500, 2, generator=g)], 1)
    deltas = torch.randn(500, 4, generator=g) * 2
    deltas[:5, 2:] = 50.0  # past the exp clamp
    expected = clip_boxes(decode(deltas, priors))
    got = decode_numpy(deltas.numpy(), priors.numpy())
    assert got.dtype == expected.numpy().dtype
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-6, rtol=0)
