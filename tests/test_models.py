import pytest
import torch
import torchvision
from torch.testing import assert_close

from ssd.models import build_model, ssd300_vgg16, ssdlite_mobilenet_v2
from ssd.models.ssd import feature_shapes
from ssd.priors import PriorConfig


@pytest.fixture(scope="module")
def vgg():
    return ssd300_vgg16(num_classes=21)


def test_ssd300_vgg16_layout(vgg):
    shapes = feature_shapes(vgg.backbone, vgg.extras, 300)
    assert [(h, w) for _, h, w in shapes] == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    assert [c for c, _, _ in shapes] == [512, 1024, 512, 256, 256, 256]
    assert vgg.priors.shape == (8732, 4)
    # ssd.pytorch's changes to VGG16
    f = vgg.backbone.features
    assert f[16].ceil_mode and f[30].kernel_size == 3 and f[30].stride == 1
    assert f[31].dilation == (6, 6)


def test_ssdlite_mobilenet_v2_layout():
    model = ssdlite_mobilenet_v2(num_classes=21)
    shapes = feature_shapes(model.backbone, model.extras, 300)
    assert [(h, w) for _, h, w in shapes] == [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert [c for c, _, _ in shapes] == [96, 320, 512, 256, 256, 128]
    assert model.priors.shape == (2990, 4)
    # depthwise-separable head
    branch = model.head.cls_layers[0]
    assert branch[0].groups == branch[0].in_channels == 96


@pytest.mark.parametrize("train", [True, False])
def test_forward_returns_raw_outputs_in_both_modes(train):
    model = ssdlite_mobilenet_v2(num_classes=5, width_mult=0.25, image_size=96).train(train)
    logits, deltas = model(torch.rand(2, 3, 96, 96))
    p = model.priors.shape[0]
    assert logits.shape == (2, p, 5) and deltas.shape == (2, p, 4)


def test_vgg_forward_shapes(vgg):
    logits, deltas = vgg.eval()(torch.rand(1, 3, 300, 300))
    assert logits.shape == (1, 8732, 21) and deltas.shape == (1, 8732, 4)


def test_head_widths_follow_the_priors():
    priors = PriorConfig(min_sizes=(16, 32, 48, 64, 80, 96), max_sizes=None, aspect_ratios=((2,),) * 6)
    model = ssdlite_mobilenet_v2(num_classes=3, width_mult=0.25, image_size=128, priors=priors)
    assert model.head.cls_layers[0][-1].out_channels == 3 * 3  # 1 square + 2 ratios, x 3 classes
    logits, _ = model(torch.rand(2, 3, 128, 128))
    assert logits.shape[1] == model.priors.shape[0]


def test_feature_sizes_are_derived_from_the_backbone():
    model = ssdlite_mobilenet_v2(num_classes=3, width_mult=0.25, image_size=160)
    # maps 10/5/3/2/1/1 at 160 px, 6+6+6+6+4+4 priors per location
    assert model.priors.shape[0] == (100 + 25 + 9 + 4) * 6 + (1 + 1) * 4


def test_build_model_from_arch_rebuilds_the_same_model():
    model = ssdlite_mobilenet_v2(num_classes=4, width_mult=0.35, image_size=128)
    again = build_model(model.arch)
    again.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 128, 128)
    model.eval(), again.eval()
    assert_close(model(x), again(x))
    with pytest.raises(ValueError, match="known models"):
        build_model({"name": "yolo"})


def test_backbone_weights_from_torchvision_state_dict(tmp_path):
    from ssd.model_file import load_state_dict_file

    tv = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(tv.state_dict(), path)
    model = ssdlite_mobilenet_v2(num_classes=3, width_mult=0.5, image_size=96, backbone_state_dict=load_state_dict_file(path))
    assert_close(model.backbone.features[5].conv[0][0].weight, tv.features[5].conv[0][0].weight)

    wrong = torchvision.models.mobilenet_v2(weights=None, width_mult=1.0).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        ssdlite_mobilenet_v2(num_classes=3, width_mult=0.5, image_size=96, backbone_state_dict=wrong)


def test_l2norm_finite_in_half_precision(vgg):
    from ssd.models.vgg import L2Norm

    layer = L2Norm(512)
    x = torch.full((1, 512, 2, 2), 300.0, dtype=torch.bfloat16)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert_close(y.float().pow(2).sum(1).sqrt(), torch.full((1, 2, 2), 20.0), rtol=0.02, atol=0)


def test_stride8_tap_adds_a_finer_map():
    priors = PriorConfig(min_sizes=(12, 24, 44, 72, 100, 128, 150), aspect_ratios=((2,),) * 7)
    model = ssdlite_mobilenet_v2(num_classes=3, width_mult=0.5, image_size=160, taps=(6, 13, 17), priors=priors)
    shapes = feature_shapes(model.backbone, model.extras, 160)
    assert [h for _, h, _ in shapes] == [20, 10, 5, 3, 2, 1, 1]
    assert model.arch["taps"] == [6, 13, 17]
    again = build_model(model.arch)
    assert again.priors.shape == model.priors.shape
    with pytest.raises(ValueError, match="taps"):
        ssdlite_mobilenet_v2(num_classes=3, taps=(13, 6))


def test_frozen_batchnorm_uses_and_keeps_the_running_statistics():
    from ssd.models.ssd import freeze_batchnorm

    torch.manual_seed(0)
    model = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn:  # statistics a batch would not reproduce
        m.running_mean.fill_(0.3)
        m.running_var.fill_(2.0)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(images)
    model.train()
    freeze_batchnorm(model)
    assert all(not m.training for m in bn) and model.head.training
    logits, deltas = model(images)
    torch.testing.assert_close((logits, deltas), expected)
    assert all(torch.all(m.running_mean == 0.3) and torch.all(m.running_var == 2.0) for m in bn)
    (logits.sum() + deltas.sum()).backward()
    assert all(m.weight.grad is not None for m in bn)  # the affine parameters still learn


@pytest.mark.parametrize("build", [
    lambda: ssdlite_mobilenet_v2(7, width_mult=0.5, image_size=160),
    lambda: ssd300_vgg16(5),
], ids=["ssdlite", "ssd300"])
def test_class_layers_start_at_the_background_prior(build):
    # Almost every prior is background; a head starting at 1/C per class spends its first
    # hundreds of steps learning only that (docs/training.md: seed 2 at step 300, 0.34 -> 0.69).
    from ssd.models.heads import BACKGROUND_PRIOR

    torch.manual_seed(0)
    model = build().eval()
    num_classes = model.head.num_classes
    for branch in model.head.cls_layers:
        conv = branch[-1] if isinstance(branch, torch.nn.Sequential) else branch
        probs = torch.softmax(conv.bias.view(-1, num_classes), dim=1)
        assert_close(probs[:, 0], torch.full_like(probs[:, 0], BACKGROUND_PRIOR))
        assert_close(probs[:, 1:], torch.full_like(probs[:, 1:], (1 - BACKGROUND_PRIOR) / (num_classes - 1)))
    for branch in model.head.box_layers:  # the box layers are left at zero bias
        conv = branch[-1] if isinstance(branch, torch.nn.Sequential) else branch
        assert not conv.bias.any()
    with torch.no_grad():
        logits, _ = model(torch.rand(1, 3, model.image_size, model.image_size))
    assert torch.softmax(logits, dim=-1)[..., 0].mean() > 0.9


def test_background_prior_must_be_a_probability():
    model = ssdlite_mobilenet_v2(3, width_mult=0.5, image_size=96)
    with pytest.raises(ValueError, match=r"background prior must be in \(0, 1\), got 1.0"):
        model.head.init_background_prior(1.0)
