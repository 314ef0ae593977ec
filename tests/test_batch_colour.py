"""SSD's photometric distortion made on a whole batch (ssd.data.batch_colour) against
torchvision's RandomPhotometricDistort made image by image with the same draws."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchvision.transforms import v2

from ssd.data import batch_colour
from ssd.data.transforms import DEFERRED_COLOUR, AugmentConfig, DeviceColour


def states(count: int) -> list[bytes]:
    out = []
    for seed in range(count):
        torch.manual_seed(100 + seed)
        out.append(torch.get_rng_state().numpy().tobytes())
    return out


def one_by_one(distort: v2.Transform, images: torch.Tensor, recorded: list[bytes]) -> torch.Tensor:
    out = []
    for image, state in zip(images, recorded):
        torch.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        out.append(distort(image))
    return torch.stack(out)


def test_a_batch_with_every_mix_of_draws_equals_torchvision_image_by_image():
    distort = v2.RandomPhotometricDistort(p=0.5)
    recorded = states(48)
    images = torch.rand(48, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    expected = one_by_one(distort, images, recorded)
    rows = []
    for state in recorded:
        torch.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        rows.append(batch_colour.draw(distort))
    params = torch.stack(rows)
    cols = {name: params[:, i] for i, name in enumerate(batch_colour.COLUMNS)}
    # the batch holds samples with each step drawn and skipped, and both contrast orders
    for name in ("brightness", "saturation"):
        assert (cols[name] == 1).any() and (cols[name] != 1).any()
    assert (cols["contrast_before"] != 1).any() and (cols["contrast_after"] != 1).any()
    assert (cols["hue_on"] == 0).any() and (cols["hue_on"] == 1).any()
    assert (params[:, 6:] != torch.arange(3)).any(dim=1).any()
    assert_close(batch_colour.apply(images, params), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("clips", [False, True])
def test_device_colour_makes_the_batch_at_once_and_equals_the_image_by_image_path(clips, monkeypatch):
    cfg = AugmentConfig(photometric_first=False, photometric_p=0.5, photometric_device=True)
    colour = DeviceColour(cfg, batch=True)  # by default only on a GPU: on a CPU image by image is faster
    recorded = states(12)
    shape = (12, 3, 3, 20, 20) if clips else (12, 3, 20, 20)
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    targets = [[{DEFERRED_COLOUR: s}] * 3 if clips else {DEFERRED_COLOUR: s} for s in recorded]
    calls = []
    real_apply = batch_colour.apply
    monkeypatch.setattr(batch_colour, "apply", lambda *a: calls.append(a[0].shape) or real_apply(*a))
    got = colour(images, targets)
    assert calls == [(36, 3, 20, 20) if clips else (12, 3, 20, 20)]  # one call for the whole batch
    assert_close(got, one_by_one(colour.colour, images, recorded), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg, batch", [
    ({}, None),  # SSD's distortion on CPU images: image by image (faster there)
    ({"channel_shuffle_p": 0.0}, True),  # a composition of its own: always image by image
])
def test_when_the_batch_is_not_made_at_once(cfg, batch, monkeypatch):
    colour = DeviceColour(AugmentConfig(photometric_first=False, photometric_device=True, **cfg), batch=batch)
    monkeypatch.setattr(batch_colour, "apply", lambda *a: pytest.fail("made at once"))
    images = torch.rand(3, 3, 8, 8)
    assert colour(images, [{DEFERRED_COLOUR: s} for s in states(3)]).shape == images.shape


def test_apply_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\] and params \[N, 9\], got \(2, 3, 4, 4\) and \(3, 9\)"):
        batch_colour.apply(torch.rand(2, 3, 4, 4), torch.ones(3, 9))
