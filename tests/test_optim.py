
import pytest
import torch

from ssd.optim import OptimConfig, build_optimizer, group_factors, lr_factor


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
    plain, decayed = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3, 3, 3])] and decayed["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)


def test_invalid_values_rejected():
    with pytest.raises(ValueError, match="grad_accum"):
        OptimConfig(grad_accum=0)


def test_backbone_frozen_for_the_first_steps():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 1)

        def forward(self, x):
            return self.head(self.backbone(x))

    torch.manual_seed(0)
    net = Net()
    cfg = OptimConfig(name="adamw", lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.1)
    opt = build_optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, group_factors(opt, cfg, 10, freeze_backbone_steps=3))
    before = net.backbone.weight.detach().clone()
    head_before = net.head.weight.detach().clone()
    for step in range(4):
        opt.zero_grad()
        net(torch.randn(4, 2)).sum().backward()
        opt.step()
        sched.step()
        if step == 2:
            torch.testing.assert_close(net.backbone.weight, before)  # frozen, weight decay too
            assert not torch.equal(net.head.weight, head_before)
    assert not torch.equal(net.backbone.weight, before)  # learns from step 3 on


def test_lr_factors_by_name_prefix_longest_match_wins():
    model = torch.nn.ModuleDict(
        {
            "backbone": torch.nn.Linear(2, 2),
            "temporal": torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}),
            "temporalx": torch.nn.Linear(2, 2),  # a prefix of the name, not of the module path
        }
    )
    config = OptimConfig(lr=0.01, lr_factors={"temporal": 10.0, "temporal.b": 2.0})
    optimizer = build_optimizer(model, config)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    expected = {"backbone": 0.01, "temporal.a": 0.1, "temporal.b": 0.02, "temporalx": 0.01}
    for name, p in model.named_parameters():
        prefix = next(k for k in sorted(expected, key=len, reverse=True) if name.startswith(k + "."))
        assert lr_of[id(p)] == pytest.approx(expected[prefix]), name
    with pytest.raises(ValueError, match="lr_factors"):
        OptimConfig(lr_factors={"temporal": 0.0})
