import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from ssd.models.ssdlite import ssds_mobilenet_v2_priors
from ssd.models.vgg import ssd300_priors
from ssd.priors import PriorConfig, generate_priors, resolve_prior_config


def reference_priors(image_size, feature_maps, steps, min_sizes, max_sizes, aspect_ratios):
    """ssd.pytorch's PriorBox algorithm, written out with plain loops (independent of ours)."""
    mean = []
    for k, f in enumerate(feature_maps):
        for i, j in itertools.product(range(f), repeat=2):
            f_k = image_size / steps[k]
            cx = (j + 0.5) / f_k
            cy = (i + 0.5) / f_k
            s_k = min_sizes[k] / image_size
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in aspect_ratios[k]:
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    return torch.tensor(mean, dtype=torch.float64).view(-1, 4).clamp(0, 1).float()


def test_ssd300_vgg16_priors_reproduce_ssd_pytorch():
    priors = generate_priors(ssd300_priors(), 300, [38, 19, 10, 5, 3, 1])
    assert priors.shape == (8732, 4)
    ref = reference_priors(
        300, [38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300],
        [30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315],
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    )
    assert_close(priors, ref)


def test_ssdlite_mobilenet_v2_priors_reproduce_ssds_pytorch_baseline():
    cfg = ssds_mobilenet_v2_priors()
    assert cfg.num_anchors_per_location() == [6, 6, 6, 6, 4, 4]
    priors = generate_priors(cfg, 300, [19, 10, 5, 3, 2, 1])
    assert priors.shape == (2990, 4)
    ref = reference_priors(
        300, [19, 10, 5, 3, 2, 1], [16, 32, 64, 100, 150, 300],
        [45, 90, 135, 180, 225, 270], [90, 135, 180, 225, 270, 315],
        [[2, 3]] * 4 + [[2]] * 2,
    )
    assert_close(priors, ref)


def test_hand_computed_one_by_one_map():
    cfg = PriorConfig(min_sizes=(100,), max_sizes=(200,), aspect_ratios=((2,),), clip=False)
    priors = generate_priors(cfg, 200, [1])
    s, s2, r = 0.5, math.sqrt(0.5 * 1.0), math.sqrt(2)
    expected = torch.tensor(
        [[0.5, 0.5, s, s], [0.5, 0.5, s2, s2], [0.5, 0.5, s * r, s / r], [0.5, 0.5, s / r, s * r]]
    )
    assert_close(priors, expected)


def test_clip_and_derived_steps():
    cfg = PriorConfig(min_sizes=(50,), max_sizes=(150,), aspect_ratios=((3,),), clip=True)
    priors = generate_priors(cfg, 100, [2])  # step derived: 50 px, centres at 0.25, 0.75
    assert priors.shape == (2 * 2 * 4, 4)
    assert_close(priors[0, :2], torch.tensor([0.25, 0.25]))
    assert_close(priors[4, :2], torch.tensor([0.75, 0.25]))  # row 0, column 1
    assert priors.max() <= 1.0
    assert_close(priors[1, 2:], torch.tensor([math.sqrt(0.5 * 1.5)] * 2).clamp(max=1))


def test_ratio_one_is_implicit():
    a = PriorConfig(min_sizes=(10,), aspect_ratios=((1, 2),))
    b = PriorConfig(min_sizes=(10,), aspect_ratios=((2,),))
    assert a.num_anchors_per_location() == b.num_anchors_per_location() == [3]


def test_config_round_trip_and_errors():
    cfg = ssds_mobilenet_v2_priors()
    again = PriorConfig.from_dict(cfg.to_dict())
    assert_close(generate_priors(again, 300, [19, 10, 5, 3, 2, 1]), generate_priors(cfg, 300, [19, 10, 5, 3, 2, 1]))
    with pytest.raises(ValueError, match="max_sizes"):
        PriorConfig(min_sizes=(1, 2), max_sizes=(3,))
    with pytest.raises(ValueError, match="feature maps"):
        generate_priors(cfg, 300, [19, 10])


def test_resolve_scales_sizes_and_derives_steps():
    cfg = resolve_prior_config(None, ssds_mobilenet_v2_priors(), 300, 150)
    assert cfg.min_sizes[0] == pytest.approx(22.5)
    assert cfg.steps is None
    assert resolve_prior_config(None, ssd300_priors(), 300, 300) == ssd300_priors()
