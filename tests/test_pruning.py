"""Channel pruning: channels really go, every consumer follows, outputs keep their shapes, files rebuild."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.models.mobilenetv2 import InvertedResidual

from ssd.model_file import ModelFileError, load_model_file, read_model_file, save_model_file
from ssd.models import build_model, ssd300_vgg16, ssdlite_mobilenet_v2
from ssd.pruning import (
    ARCH_KEY,
    PruneConfig,
    count_macs_params,
    module_widths,
    prune_model,
    rebuild_model,
    resize_modules,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ssdlite_mobilenet_v2(num_classes=4, width_mult=0.5, image_size=SIZE).eval()


@pytest.fixture(scope="module")
def pruned():
    """(original, pruned copy, result) at 50% uniform."""
    original = tiny()
    model = copy.deepcopy(original)
    result = prune_model(model, PruneConfig(ratio=0.5))
    return original, model, result


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_parameters_and_multiply_adds_drop(pruned):
    original, model, _ = pruned
    macs0, params0 = count_macs_params(original)
    macs1, params1 = count_macs_params(model)
    # Half the channels of (almost) every layer: about a quarter of each 1x1 convolution's
    # weights and work is left, a half of each depthwise one's.
    print(f"\n50% uniform, width 0.5 @ {SIZE}px: params {params0} -> {params1} (-{1 - params1 / params0:.0%}), "
          f"MACs {macs0} -> {macs1} (-{1 - macs1 / macs0:.0%})")
    assert params1 <= 0.4 * params0
    assert macs1 <= 0.45 * macs0
    assert params1 == sum(p.numel() for p in model.parameters())


def test_channels_are_physically_removed(pruned):
    original, model, result = pruned
    before, after = _convs(original), _convs(model)
    narrower = [n for n in before if after[n].out_channels < before[n].out_channels]
    assert len(narrower) > 0.8 * len(before) - 12  # all but the 12 prediction convolutions (and 8-wide ones)
    for conv in after.values():
        assert conv.weight.shape == (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    assert result.channels_after <= 0.52 * result.channels_before
    assert result.widths == model.arch[ARCH_KEY]
    assert set(result.widths) <= set(module_widths(model))


def test_outputs_keep_their_shapes(pruned):
    original, model, _ = pruned
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits0, deltas0 = original(x)
        logits1, deltas1 = model(x)
    assert logits1.shape == logits0.shape == (2, original.priors.shape[0], 4)
    assert deltas1.shape == deltas0.shape
    assert_close(model.priors, original.priors)
    head0, head1 = original.head, model.head
    for b0, b1 in zip([*head0.cls_layers, *head0.box_layers], [*head1.cls_layers, *head1.box_layers]):
        assert b1[-1].out_channels == b0[-1].out_channels  # the predictors keep their outputs
        assert b1[-1].in_channels < b0[-1].in_channels  # ... and lose inputs with their feature map


def test_depthwise_convolutions_stay_depthwise(pruned):
    original, model, _ = pruned
    before, after = _convs(original), _convs(model)
    depthwise = [n for n, c in before.items() if c.groups > 1]
    assert depthwise
    for n in depthwise:
        c = after[n]
        assert c.groups == c.in_channels == c.out_channels, n
    assert any(after[n].groups < before[n].groups for n in depthwise)
    # every batch norm matches the convolution before it
    modules = list(model.modules())
    for a, b in itertools.pairwise(modules):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            assert b.num_features == a.out_channels


def test_residual_additions_stay_consistent(pruned):
    _, model, _ = pruned
    blocks = [m for m in model.backbone.modules() if isinstance(m, InvertedResidual) and m.use_res_connect]
    assert blocks
    for block in blocks:
        first = next(m for m in block.conv.modules() if isinstance(m, nn.Conv2d))
        last = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d)][-1]
        assert first.in_channels == last.out_channels
    # and it trains: a training-mode forward and backward run, gradients have the weights' shapes
    trainable = copy.deepcopy(model).train()
    logits, deltas = trainable(torch.rand(2, 3, SIZE, SIZE))
    (logits.square().mean() + deltas.square().mean()).backward()
    for p in trainable.parameters():
        assert p.grad is not None and p.grad.shape == p.shape


def _kill_upper_half(model: nn.Module) -> None:
    """Make the upper half of every layer's channels dead: zero weights in and out, zero BN affine.

    Their activations are exactly zero and their group L1 norm is zero, so pruning 50% must
    remove exactly them and leave the outputs unchanged.
    """
    first = model.backbone.features[0][0]
    predictors = {b[-1] for b in [*model.head.cls_layers, *model.head.box_layers]}
    cells = list(model.temporal.values()) if hasattr(model, "temporal") else []
    in_cells = {m for c in cells for m in c.modules()}
    with torch.no_grad():
        for m in model.modules():
            if m in in_cells:
                continue
            if isinstance(m, nn.Conv2d):
                if m not in predictors:
                    m.weight[m.out_channels // 2 :] = 0
                if m.groups == 1 and m is not first:
                    m.weight[:, m.in_channels // 2 :] = 0
            elif isinstance(m, nn.BatchNorm2d):
                half = m.num_features // 2
                m.weight[half:] = 0
                m.bias[half:] = 0
                m.running_mean.uniform_(-1, 1)  # would show if the tracing forward updated them
                m.running_var.uniform_(0.5, 2)
        for cell in cells:
            _kill_cell(cell)


def _kill_cell(cell: nn.Module) -> None:
    # Dead: the upper half of the inputs x, of the hidden units (h, c and their four gates) and of
    # the bottleneck units. A dead unit's gates are all 0 before the activations, so its c and h
    # stay exactly 0 (phi(0) = 0), whatever the forget bias.
    m, n = cell.in_channels, cell.hidden_channels
    nb = cell.bottleneck[1].out_channels
    dead_concat = [*range(m // 2, m), *range(m + n // 2, m + n)]
    dw_b, pw_b, dw_g, pw_g = cell.bottleneck[0], cell.bottleneck[1], cell.gates[0], cell.gates[1]
    dw_b.weight[dead_concat] = 0
    pw_b.weight[:, dead_concat] = 0
    pw_b.weight[nb // 2 :] = 0
    pw_b.bias[nb // 2 :] = 0
    dw_g.weight[nb // 2 :] = 0
    pw_g.weight[:, nb // 2 :] = 0
    for g in range(4):
        pw_g.weight[g * n + n // 2 : (g + 1) * n] = 0
        if g != 1:  # keep the forget bias of 1
            pw_g.bias[g * n + n // 2 : (g + 1) * n] = 0
    if cell.project is not None:
        cell.project.weight[:, n // 2 :] = 0
        cell.project.weight[cell.out_channels // 2 :] = 0


def test_removing_dead_channels_leaves_the_outputs_unchanged():
    model = tiny(seed=3)
    _kill_upper_half(model)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    model.train()  # pruning must restore the mode and leave batch-norm statistics alone
    result = prune_model(model, PruneConfig(ratio=0.5, round_to=None))
    assert model.training
    assert result.channels_after * 2 == result.channels_before
    model.eval()
    for name, conv in _convs(model).items():  # only the dead halves went
        if conv.out_channels > 1 and conv.groups == 1:
            assert conv.weight.flatten(1).abs().sum(1).min() > 0, name
    with torch.no_grad():
        actual = model(x)
    assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "placement, state_reduction, residual",
    [(("backbone",), 1, False), (("backbone", "extras"), 2, False), (("backbone", "extras"), 1, True)],
    ids=["paper", "projected", "residual"],
)
def test_lstm_ssd_cells_are_pruned_with_the_model(placement, state_reduction, residual):
    # "paper": one cell on block 13 whose h is the map (hidden units = output channels);
    # "projected": cells everywhere, their state half as wide, a 1x1 projection after each;
    # "residual": each cell's projected output added to its input map.
    torch.manual_seed(4)
    arch = {"name": "lstm_ssd_mobilenet_v2", "num_classes": 4, "width_mult": 0.5, "image_size": SIZE,
            "placement": list(placement), "state_reduction": state_reduction, "residual": residual}
    model = build_model(arch).eval()
    with torch.no_grad():  # a recurrence strong enough to show in the state if it were cut wrong
        for cell in model.temporal.values():
            for conv in (cell.bottleneck[1], cell.gates[1]):
                conv.weight.mul_(4)
            if residual:  # not the zero start: the added path must survive pruning too
                cell.project.weight.normal_()
    _kill_upper_half(model)
    clip = torch.rand(2, 4, 3, SIZE, SIZE)
    with torch.no_grad():
        logits0, deltas0, state0 = model.forward_clip(clip)
    macs0, _ = count_macs_params(model)
    widths0 = {k: (c.in_channels, c.hidden_channels, c.bottleneck[1].out_channels) for k, c in model.temporal.items()}
    result = prune_model(model, PruneConfig(ratio=0.5, round_to=None))
    for k, cell in model.temporal.items():  # every width of every cell halved
        assert (cell.in_channels, cell.hidden_channels, cell.bottleneck[1].out_channels) == tuple(
            w // 2 for w in widths0[k]
        )
        assert cell.gates[1].out_channels == 4 * cell.hidden_channels
        assert f"temporal.{k}.bottleneck" in result.groups
    assert count_macs_params(model)[0] < 0.4 * macs0
    with torch.no_grad():  # only dead units went: the same predictions through the recurrence
        logits1, deltas1, state = model.forward_clip(clip)
        assert_close(logits1, logits0, atol=1e-5, rtol=1e-4)
        assert_close(deltas1, deltas0, atol=1e-5, rtol=1e-4)
        assert [s.shape[1] for s in state] == [s.shape[1] for s in model.init_state(1)]
        for before, after in zip(state0, state):  # the live units' h and c, after 4 frames
            assert after.shape[1] * 2 == before.shape[1]
            assert_close(after, before[:, : after.shape[1]], atol=1e-5, rtol=1e-4)
        streamed = model(clip[:, 0])[0]
        assert_close(streamed, logits1[:, 0], atol=1e-5, rtol=1e-4)
    again = rebuild_model(model.arch)
    again.load_state_dict(model.state_dict())
    again.eval()
    with torch.no_grad():
        assert_close(again.forward_clip(clip)[0], logits1)


def test_lowest_l1_filters_are_removed():
    model = tiny(seed=1)
    conv = model.extras[0][0]  # its channels feed only its own block: a group of its own
    with torch.no_grad():
        conv.weight[[1, 4, 6]] *= 1e-3
    original = conv.weight.detach().clone()
    prune_model(model, PruneConfig(ratio=0.5, ignore=("backbone.*",)))  # keeps the conv's inputs
    kept = conv.weight.detach()
    assert kept.shape[0] == original.shape[0] // 2
    # the survivors are original filters, in their original order, and none of the weak ones
    idx = [int(torch.nonzero((original == row).flatten(1).all(1))[0]) for row in kept]
    assert idx == sorted(idx)
    assert not {1, 4, 6} & set(idx)


def test_model_file_round_trip_in_a_fresh_process(pruned, tmp_path):
    _, model, _ = pruned
    path = tmp_path / "pruned.pt"
    save_model_file(path, model, ["a", "b", "c"], meta={"pruning": {"ratio": 0.5}})
    assert read_model_file(path)["arch"][ARCH_KEY] == model.arch[ARCH_KEY]
    x = torch.rand(1, 3, SIZE, SIZE)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from ssd.model_file import load_model_file; "
        "m, info = load_model_file(sys.argv[1]); x = torch.load(sys.argv[2]); "
        "torch.save(m(x), sys.argv[3]); print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert_close(torch.load(tmp_path / "y.pt"), model(x))
    loaded, info = load_model_file(path)
    assert loaded.arch == model.arch and info["meta"] == {"pruning": {"ratio": 0.5}}


def test_pruning_again_merges_the_recorded_widths(pruned, tmp_path):
    _, once, _ = pruned
    twice = copy.deepcopy(once)
    prune_model(twice, PruneConfig(ratio=0.5, round_to=None))
    assert set(twice.arch[ARCH_KEY]) >= set(once.arch[ARCH_KEY])
    assert count_macs_params(twice)[0] < count_macs_params(once)[0]
    path = tmp_path / "twice.pt"
    save_model_file(path, twice, ["a", "b", "c"])
    loaded, _ = load_model_file(path)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert_close(loaded(x), twice(x))


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_uniform_and_global_modes(mode):
    model = tiny(seed=2)
    for m in model.modules():  # uneven layers, so that the global ranking has something to rank
        if isinstance(m, nn.Conv2d) and m.out_channels % 3 == 0:
            m.weight.data *= 0.2
    macs0, _ = count_macs_params(model)
    result = prune_model(model, PruneConfig(ratio=0.5, mode=mode, max_layer_ratio=0.75))
    assert 0.4 <= result.channels_after / result.channels_before <= 0.6
    kept = [a / b for b, a in result.groups.values()]
    if mode == "uniform":
        assert all(k >= 0.5 for k in kept) and min(kept) == 0.5
    else:
        assert min(kept) >= 0.25  # max_layer_ratio
        assert max(kept) > 0.5 > min(kept)  # groups lose different fractions
    assert count_macs_params(model)[0] < 0.6 * macs0
    logits, deltas = model(torch.rand(1, 3, SIZE, SIZE))
    assert logits.shape == (1, model.priors.shape[0], 4) and deltas.shape == (1, model.priors.shape[0], 4)


def test_global_mode_keeps_max_layer_ratio_after_rounding():
    """Rounding the kept widths to multiples of 8 went down past the cap: groups of 48 kept 8,
    83% removed with max_layer_ratio 0.8."""
    model = tiny(seed=3)
    result = prune_model(model, PruneConfig(ratio=0.8, mode="global", max_layer_ratio=0.8, round_to=8))
    over = {g: (b, a) for g, (b, a) in result.groups.items() if (b - a) / b > 0.8 + 1e-9}
    assert not over
    assert any((b - a) / b > 0.7 for b, a in result.groups.values())  # the cap was reached somewhere


def test_round_to_rounds_kept_widths():
    model = tiny()
    prune_model(model, PruneConfig(ratio=0.6, round_to=8))
    assert all(c.out_channels % 8 == 0 for n, c in _convs(model).items() if not n.startswith("head"))


def test_too_high_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        PruneConfig(ratio=1.0)
    with pytest.raises(ValueError, match="above max_layer_ratio"):
        PruneConfig(ratio=0.9, mode="global", max_layer_ratio=0.8)
    model = tiny()
    widths = module_widths(model)
    with pytest.raises(ValueError, match=r"ratio 0.97 would leave no channel of the \d+ of \S+"):
        prune_model(model, PruneConfig(ratio=0.97, round_to=None))
    assert module_widths(model) == widths  # nothing was touched


def test_ratio_zero_changes_nothing():
    model = tiny()
    arch, widths = dict(model.arch), module_widths(model)
    result = prune_model(model, PruneConfig(ratio=0.0))
    assert result.channels_after == result.channels_before and result.widths == {}
    assert model.arch == arch and module_widths(model) == widths


def test_ignore_patterns_keep_output_channels():
    model = tiny()
    before = {n: c.out_channels for n, c in _convs(model).items()}
    prune_model(model, PruneConfig(ratio=0.5, ignore=("extras.*",)))
    after = _convs(model)
    assert all(after[n].out_channels == before[n] for n in before if n.startswith("extras."))
    assert after["extras.0.0"].in_channels < before["backbone.features.17.conv.2"]  # inputs still follow
    with pytest.raises(ValueError, match="matches no module"):
        prune_model(tiny(), PruneConfig(ignore=("nothing.here",)))


def test_rebuild_refuses_widths_that_do_not_fit():
    arch = dict(tiny().arch)
    with pytest.raises(ValueError, match="lacks"):
        rebuild_model({**arch, ARCH_KEY: {"backbone.nowhere": {"num_features": 4}}})
    with pytest.raises(ValueError, match="expected keys"):
        rebuild_model({**arch, ARCH_KEY: {"extras.0.1": {"channels": 4}}})
    with pytest.raises(ValueError, match="can't be resized"):
        resize_modules(tiny(), {"extras.0.2": {"num_features": 4}})  # a ReLU6
    assert rebuild_model(arch).arch == arch  # unpruned: just build_model


def test_model_file_with_mismatched_widths_is_refused(pruned, tmp_path):
    _, model, _ = pruned
    path = tmp_path / "m.pt"
    save_model_file(path, model, ["a", "b", "c"])
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["arch"][ARCH_KEY]))
    payload["arch"][ARCH_KEY].pop(name)
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="can't rebuild the model"):
        load_model_file(path)


def test_count_macs_params_by_hand():
    class One(nn.Module):
        image_size = 8

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)

        def forward(self, x):
            return self.conv(x)

    assert count_macs_params(One()) == (8 * 8 * 8 * 3 * 9, 8 * 3 * 9)
    assert count_macs_params(One(), image_size=4) == (4 * 4 * 8 * 3 * 9, 8 * 3 * 9)


def test_ssd300_vgg16_prunes():
    torch.manual_seed(0)
    model = ssd300_vgg16(num_classes=3).eval()
    params0 = sum(p.numel() for p in model.parameters())
    prune_model(model, PruneConfig(ratio=0.5))  # checks itself that the output shapes are unchanged
    features = model.backbone.features
    assert model.backbone.l2norm.weight.numel() == features[21].out_channels == 256  # conv4_3's scale follows
    assert features[31].out_channels == features[33].in_channels == 512
    assert [c.in_channels for c in model.head.cls_layers] == [256, 512, 256, 128, 128, 128]
    assert [c.out_channels for c in model.head.box_layers] == [16, 24, 24, 24, 16, 16]
    assert sum(p.numel() for p in model.parameters()) < 0.3 * params0
    again = rebuild_model(model.arch)
    assert module_widths(again) == module_widths(model)
