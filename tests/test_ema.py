"""The EMA of the weights (ssd.ema): torch's AveragedModel with a warming-up decay."""

from __future__ import annotations

import torch
from torch import nn

from ssd.ema import averaged, ema_decay


def test_decay_warms_up_then_holds():
    assert ema_decay(0.998, 0) == 0.1
    assert ema_decay(0.998, 90) == 0.91
    assert ema_decay(0.998, 10_000) == 0.998


def test_average_follows_the_recurrence_for_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = averaged(model, decay=0.5)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the batch-norm running statistics
        current = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        ema.update_parameters(model)
        if expected is None:  # the first update copies
            expected = current
        else:
            d = min(0.5, (1 + n) / (10 + n))
            expected = {k: d * expected[k] + (1 - d) * current[k] for k in expected}
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert "1.running_mean" in expected  # the statistics were averaged, not copied
    assert not torch.allclose(got["1.running_mean"], model.state_dict()["1.running_mean"])
    assert int(ema.n_averaged) == 6


def test_the_average_is_a_separate_copy_and_its_state_round_trips():
    model = nn.Linear(3, 2)
    ema = averaged(model, decay=0.9)
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(ema.module.weight, model.weight)
    other = averaged(nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight) and int(other.n_averaged) == 1
