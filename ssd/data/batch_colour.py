"""SSD's photometric distortion (torchvision's ``RandomPhotometricDistort``) made on a whole
batch at once, each sample with its own draws.

torchvision's colour kernels take one factor per call, so replaying the distortion image by image
launches some hundred small kernels per image: 1.0-1.2 ms per image on an H200 (the GPU check's
``colour_ms_per_image``, 2026-12-04), half an SSD300 step at batch 64, which made the colour
change on the GPU slower than leaving it to 8 loader workers. Here each step runs once for the
batch with per-sample factors, 1 (the identity, exactly) where a sample's draw skipped the step,
through the same formulas as torchvision's kernels and the same fused operations, so the result
equals the image-by-image path (bit for bit on this project's CPU; tests/test_batch_colour.py
asks 1e-6).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
# The colour-space kernels torchvision's adjust_hue runs; private, so the hue step falls back to
# adjust_hue image by image (only on the samples whose draw asked for it) if they move.
try:
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
except ImportError:  # pragma: no cover - another torchvision layout
    _hsv_to_rgb = _rgb_to_hsv = None

#: The columns of a parameter row: factors (1 where not drawn), hue shift and whether hue was
#: drawn, and the channel order.
COLUMNS = ("brightness", "contrast_before", "contrast_after", "saturation", "hue", "hue_on", "c0", "c1", "c2")


def draw(distort: v2.RandomPhotometricDistort) -> Tensor:
    """One sample's parameters ``[len(COLUMNS)]``, drawn from torch's global generator exactly as
    ``distort`` draws them when it changes an image (its ``make_params``)."""
    p = distort.make_params([torch.zeros(1, 3, 1, 1)])
    contrast = 1.0 if p["contrast_factor"] is None else float(p["contrast_factor"])
    order = p["channel_permutation"] if p["channel_permutation"] is not None else torch.arange(3)
    return torch.tensor([
        1.0 if p["brightness_factor"] is None else float(p["brightness_factor"]),
        contrast if p["contrast_before"] else 1.0,
        1.0 if p["contrast_before"] else contrast,
        1.0 if p["saturation_factor"] is None else float(p["saturation_factor"]),
        0.0 if p["hue_factor"] is None else float(p["hue_factor"]),
        float(p["hue_factor"] is not None),
        *order.tolist(),
    ], dtype=torch.float64)


def _blend(image: Tensor, other: Tensor, p: Tensor, column: int) -> Tensor:
    """torchvision's blend of a float image in [0, 1] with ``other``, by the per-sample ratio in
    ``p[:, column]`` (float64). ``1 - ratio`` is taken in float64 and the sum fused as torchvision's
    ``add_(other, alpha=1 - ratio)`` fuses it: the same floats, not merely close ones."""
    ratio = p[:, column].to(image.dtype).view(-1, 1, 1, 1)
    rest = (1.0 - p[:, column]).to(image.dtype).view(-1, 1, 1, 1)
    return image.mul(ratio).addcmul_(other.expand_as(image), rest).clamp_(0.0, 1.0)


def _contrast(images: Tensor, p: Tensor, column: int) -> Tensor:
    mean = F.rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, p, column)


def _hue(images: Tensor, shift: Tensor, on: Tensor) -> Tensor:
    index = on.nonzero().flatten()
    if len(index) == 0:
        return images
    chosen, shifts = images[index], shift[index]
    if _rgb_to_hsv is None:  # pragma: no cover
        changed = torch.stack([F.adjust_hue(img, float(s)) for img, s in zip(chosen, shifts)])
    else:
        h, s, v = _rgb_to_hsv(chosen).unbind(dim=-3)
        h = h.add(shifts.view(-1, 1, 1)).remainder_(1.0)
        changed = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    images = images.clone()
    images[index] = changed
    return images


def apply(images: Tensor, params: Tensor) -> Tensor:
    """``images`` float ``[N, 3, H, W]`` in [0, 1] and their :func:`draw` rows ``[N, len(COLUMNS)]``
    (any device) -> the distorted images, in torchvision's order: brightness, contrast (when
    drawn first), saturation, hue, contrast (when drawn last), channel order."""
    if images.ndim != 4 or images.shape[1] != 3 or params.shape != (images.shape[0], len(COLUMNS)):
        raise ValueError(f"expected images [N, 3, H, W] and params [N, {len(COLUMNS)}], "
                         f"got {tuple(images.shape)} and {tuple(params.shape)}")
    p = params.to(images.device, torch.float64)
    out = images.mul(p[:, 0].to(images.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    out = _contrast(out, p, 1)
    out = _blend(out, F.rgb_to_grayscale(out), p, 3)
    out = _hue(out, p[:, 4].to(images.dtype), p[:, 5] > 0)
    out = _contrast(out, p, 2)
    order = p[:, 6:9].long().view(-1, 3, 1, 1).expand_as(out)
    return out.gather(1, order)
