"""Prior (default) boxes of SSD, from a config and the feature-map sizes.

The layout is the one of the SSD paper (arXiv 1512.02325, section 2.2) as
implemented by ssd.pytorch and ssds.pytorch: on map ``k`` of size ``f_k``,
centres at ``((j + offset) * step_k, (i + offset) * step_k) / image_size``;
at each centre a square box of side ``min_size_k``, a square of side
``sqrt(min_size_k * max_size_k)`` (when max sizes are given), and for every
aspect ratio ``r > 1`` the pair ``(w, h) = (s * sqrt(r), s / sqrt(r))`` and its
transpose. The order is: map, row, column, then the boxes of one location in
the order just listed; the heads emit their predictions in the same order.

The priors are the single source of truth for the heads' widths:
:meth:`PriorConfig.num_anchors_per_location`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorConfig:
    """How priors are laid out on the feature maps. Sizes and steps in pixels of the input image."""

    min_sizes: tuple[float, ...]
    """Side of the small square box on each map (one entry per map)."""
    max_sizes: tuple[float, ...] | None = None
    """Each map's second square has side ``sqrt(min * max)``; ``None``: no second square."""
    aspect_ratios: tuple[tuple[float, ...], ...] = ()
    """Per map, the ratios ``r >= 1``; each ``r > 1`` adds boxes ``r:1`` and ``1:r``. Ratio 1 is
    always present (listing it, as ssds.pytorch configs do, changes nothing). Empty: squares only."""
    steps: tuple[float, ...] | None = None
    """Distance between neighbouring centres on each map; ``None``: ``image_size / map size``."""
    offset: float = 0.5
    """Centre of cell ``(i, j)`` is at ``(j + offset, i + offset) * step``."""
    clip: bool | Literal["wh"] = True
    """``True``: clamp the ``(cx, cy, w, h)`` values to ``[0, 1]``, as ssd.pytorch does;
    ``"wh"``: clamp only the sizes, as torchvision's ``DefaultBoxGenerator`` does (centres
    past the image edge stay); ``False``: no clamping."""

    def __post_init__(self) -> None:
        n = len(self.min_sizes)
        if n == 0:
            raise ValueError("PriorConfig needs at least one feature map (min_sizes is empty)")
        for name in ("max_sizes", "aspect_ratios", "steps"):
            value = getattr(self, name)
            if value is not None and name != "aspect_ratios" and len(value) != n:
                raise ValueError(f"PriorConfig.{name} has {len(value)} entries, min_sizes has {n}")
        if self.aspect_ratios and len(self.aspect_ratios) != n:
            raise ValueError(f"PriorConfig.aspect_ratios has {len(self.aspect_ratios)} entries, min_sizes has {n}")
        for ratios in self.aspect_ratios:
            if any(r < 1 for r in ratios):
                raise ValueError(f"aspect ratios must be >= 1 (1/r is added for each r), got {list(ratios)}")
        if self.clip not in (True, False, "wh"):
            raise ValueError(f"clip must be true, false or 'wh', got {self.clip!r}")
        if any(s <= 0 for s in self.min_sizes):
            raise ValueError(f"min_sizes must be positive, got {list(self.min_sizes)}")

    @property
    def num_maps(self) -> int:
        return len(self.min_sizes)

    def _ratios(self, k: int) -> list[float]:
        if not self.aspect_ratios:
            return []
        # Ratio 1 is implicit; keep the order given, drop duplicates.
        out: list[float] = []
        for r in self.aspect_ratios[k]:
            if r != 1 and r not in out:
                out.append(float(r))
        return out

    def num_anchors_per_location(self) -> list[int]:
        """Boxes per location on each map: 1 (+1 with max sizes) + 2 per ratio > 1."""
        squares = 2 if self.max_sizes is not None else 1
        return [squares + 2 * len(self._ratios(k)) for k in range(self.num_maps)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers), as stored in model files and params."""
        return {
            "min_sizes": list(self.min_sizes),
            "max_sizes": None if self.max_sizes is None else list(self.max_sizes),
            "aspect_ratios": [list(r) for r in self.aspect_ratios],
            "steps": None if self.steps is None else list(self.steps),
            "offset": self.offset,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorConfig":
        """Inverse of :meth:`to_dict`; missing optional keys take their defaults."""
        unknown = set(d) - {"min_sizes", "max_sizes", "aspect_ratios", "steps", "offset", "clip"}
        if unknown:
            raise ValueError(f"unknown prior config keys: {sorted(unknown)}")
        return cls(
            min_sizes=tuple(float(s) for s in d["min_sizes"]),
            max_sizes=None if d.get("max_sizes") is None else tuple(float(s) for s in d["max_sizes"]),
            aspect_ratios=tuple(tuple(float(r) for r in rs) for rs in d.get("aspect_ratios") or ()),
            steps=None if d.get("steps") is None else tuple(float(s) for s in d["steps"]),
            offset=float(d.get("offset", 0.5)),
            clip="wh" if d.get("clip") == "wh" else bool(d.get("clip", True)),
        )

    def scaled(self, factor: float) -> "PriorConfig":
        """The same layout for an input ``factor`` times larger (sizes and steps scaled)."""
        return PriorConfig(
            min_sizes=tuple(s * factor for s in self.min_sizes),
            max_sizes=None if self.max_sizes is None else tuple(s * factor for s in self.max_sizes),
            aspect_ratios=self.aspect_ratios,
            steps=None if self.steps is None else tuple(s * factor for s in self.steps),
            offset=self.offset,
            clip=self.clip,
        )


def generate_priors(
    config: PriorConfig, image_size: int, feature_sizes: Sequence[int | tuple[int, int]]
) -> Tensor:
    """Priors for a square ``image_size`` input with the given feature-map sizes.

    Args:
        config: the layout; ``config.num_maps`` must equal ``len(feature_sizes)``.
        image_size: input side in pixels.
        feature_sizes: per map, ``f`` (square) or ``(height, width)``.

    Returns:
        ``Tensor[P, 4]`` float32 ``(cx, cy, w, h)`` normalised to ``[0, 1]``,
        ``P = sum(h_k * w_k * num_anchors_per_location()[k])``.
    """
    if len(feature_sizes) != config.num_maps:
        raise ValueError(
            f"the model has {len(feature_sizes)} feature maps but the prior config describes {config.num_maps}"
        )
    per_map = []
    for k, size in enumerate(feature_sizes):
        fh, fw = (size, size) if isinstance(size, int) else size
        step_y = step_x = None
        if config.steps is not None:
            step_y = step_x = config.steps[k] / image_size
        else:
            step_y, step_x = 1.0 / fh, 1.0 / fw
        # Box sizes of one location, normalised: [A, 2] (w, h).
        s = config.min_sizes[k] / image_size
        wh = [(s, s)]
        if config.max_sizes is not None:
            s2 = math.sqrt(s * config.max_sizes[k] / image_size)
            wh.append((s2, s2))
        for r in config._ratios(k):
            q = math.sqrt(r)
            wh += [(s * q, s / q), (s / q, s * q)]
        wh_t = torch.tensor(wh, dtype=torch.float64)
        if config.clip == "wh":
            wh_t = wh_t.clamp(min=0.0, max=1.0)
        cy = (torch.arange(fh, dtype=torch.float64) + config.offset) * step_y
        cx = (torch.arange(fw, dtype=torch.float64) + config.offset) * step_x
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [fh, fw]
        centres = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)  # [fh*fw, 1, 2]
        a = wh_t.shape[0]
        boxes = torch.cat((centres.expand(-1, a, 2), wh_t.expand(centres.shape[0], a, 2)), dim=-1)
        per_map.append(boxes.reshape(-1, 4))
    priors = torch.cat(per_map, dim=0)
    if config.clip is True:
        priors = priors.clamp(min=0.0, max=1.0)
    return priors.to(torch.float32)


def resolve_prior_config(
    given: PriorConfig | Mapping[str, Any] | None,
    reference: PriorConfig,
    reference_size: int,
    image_size: int,
) -> PriorConfig:
    """The prior config a builder uses.

    ``given`` (a config or its dict form) wins. Otherwise the architecture's
    ``reference`` layout, made for ``reference_size``: as it is at that size;
    at another size with sizes scaled to keep the same fraction of the image,
    and steps derived from the feature maps (a reference step in pixels would
    no longer match the maps).
    """
    if isinstance(given, PriorConfig):
        return given
    if given is not None:
        return PriorConfig.from_dict(given)
    if image_size == reference_size:
        return reference
    s = reference.scaled(image_size / reference_size)
    return PriorConfig(s.min_sizes, s.max_sizes, s.aspect_ratios, None, s.offset, s.clip)
