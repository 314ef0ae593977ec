import math

import pytest
import torch

from ssd.optim import OptimConfig, build_optimizer, lr_factor


def test_warmup_then_cosine():
    f = lr_factor(OptimConfig(warmup_steps=10, warmup_factor=0.1, schedule="cosine"), total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_milestones():
    f = lr_factor(OptimConfig(warmup_steps=0, schedule="step", milestones=(0.5, 0.75), gamma=0.1), total_steps=100)
    assert [f(0), f(49), f(50), f(74), f(75), f(99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3, 3, 3])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)


def test_invalid_values_rejected():
    with pytest.raises(ValueError, match="grad_accum"):
        OptimConfig(grad_accum=0)
