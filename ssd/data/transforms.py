"""SSD data augmentation and the evaluation resize, on frames and on clips.

Built from ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes``, in
the order of the SSD recipe (Liu et al. 2016, sec. 2.2 "Data augmentation",
and the torchvision detection reference)::

    photometric distortion -> zoom-out (mean fill) -> IoU-constrained crop
    -> horizontal flip -> resize to S x S -> drop degenerate boxes -> float [0, 1]

Inputs and outputs, for one frame::

    image   uint8 Tensor[3, H, W], RGB
    target  {"boxes": float32 Tensor[N, 4] (x1, y1, x2, y2) normalised to [0, 1],
             "labels": int64 Tensor[N], "difficult": bool Tensor[N]}
    ->  float32 Tensor[3, S, S] in [0, 1] (the model normalises itself),
        target of the same form with N' <= N boxes, still normalised.

A clip (``uint8 Tensor[T, 3, H, W]`` and one target per frame) goes through the
same v2 call as one image with a leading time dimension, so one draw of the
random parameters applies to every frame: the same colour change, zoom, crop
and flip. ``RandomIoUCrop`` accepts a single ``BoundingBoxes``, so the frames'
boxes are concatenated with a per-box frame index that travels with the labels
through ``SanitizeBoundingBoxes`` and splits them back afterwards.

Randomness comes from torch's global CPU generator (that is what v2 uses); the
loaders seed it per sample, see :mod:`ssd.data.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from ssd.data import batch_colour

__all__ = ["AugmentConfig", "DetectionTransform", "DeviceColour", "eval_transform", "train_transform"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the SSD training augmentation."""

    # Chance of each colour distortion (brightness, contrast, saturation, hue, channel
    # permutation), each drawn independently, as in the SSD Caffe recipe.
    photometric_p: float = 0.5
    # Colour distortion before the geometry, as in SSD, so the zoom-out fill is exactly the mean.
    # False applies it last, to the S x S float image: about 1.8x the throughput for VOC-sized
    # images at S=300 (the hue change dominates the augmentation cost), and the fill then gets
    # the image's colour change too.
    photometric_first: bool = True
    # With photometric_first false: the loader workers draw the colour change but leave it to the
    # training process, which applies it on the device to the whole batch (DeviceColour), the
    # same draws to the same images: the workers' share of the augmentation drops by about 40%
    # (the feed benchmark), and the boxes are those of the worker path exactly.
    photometric_device: bool = False
    # Largest hue shift, as a fraction of the hue circle (torchvision's and SSD's 0.05).
    hue: float = 0.05
    # Chance of a random permutation of the colour channels; None: photometric_p, as in SSD.
    # Where colour is what tells classes apart (the generated sample), 0 keeps that cue.
    channel_shuffle_p: float | None = None
    # SSD "expansion": half the images are placed on a larger canvas, which makes
    # small objects and teaches the small-scale priors.
    zoom_out_p: float = 0.5
    # Canvas side up to 4x the image side (SSD: up to 16x the area).
    zoom_out_max: float = 4.0
    # Zoom-out canvas colour, RGB in [0, 1]: the dataset mean, so that after the model's
    # normalisation the padding is close to zero. ImageNet's mean, which VOC's is near.
    fill_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    # SSD samples a patch for every image; RandomIoUCrop's own options include
    # "keep the whole image" (min IoU 1.0), so 1.0 here is the paper's recipe.
    crop_p: float = 1.0
    # Patch side between 0.3 and 1 of the image side (SSD: area in [0.1, 1]).
    crop_min_scale: float = 0.3
    crop_max_scale: float = 1.0
    # Patch aspect ratio between 1/2 and 2, as in SSD.
    crop_min_aspect: float = 0.5
    crop_max_aspect: float = 2.0
    # Minimum IoU with some box that a patch must reach, one option drawn per image; 0.0 is
    # "any patch that contains a box centre", 1.0 is "keep the whole image" (SSD's options).
    crop_min_ious: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    # Patches tried per IoU option before another option is drawn (torchvision's default).
    crop_trials: int = 40
    # Horizontal flip of half the images.
    flip_p: float = 0.5
    # Boxes narrower or shorter than this many output pixels after augmentation are dropped
    # (with their labels); 1 is the smallest SanitizeBoundingBoxes accepts.
    min_box_size: float = 1.0

    def __post_init__(self) -> None:
        if self.photometric_device and self.photometric_first:
            raise ValueError("AugmentConfig.photometric_device: needs photometric_first false (the device applies "
                             "the colour change after the resize)")
        if self.channel_shuffle_p is not None and not 0.0 <= self.channel_shuffle_p <= 1.0:
            raise ValueError(f"AugmentConfig.channel_shuffle_p: a probability in [0, 1], got {self.channel_shuffle_p}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"AugmentConfig.hue: in [0, 0.5], got {self.hue}")
        for name in ("photometric_p", "zoom_out_p", "crop_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentConfig.{name}: a probability in [0, 1], got {p}")
        if self.zoom_out_max < 1.0:
            raise ValueError(f"AugmentConfig.zoom_out_max: at least 1, got {self.zoom_out_max}")
        if not 0.0 < self.crop_min_scale <= self.crop_max_scale <= 1.0:
            raise ValueError(
                f"AugmentConfig.crop_min_scale/crop_max_scale: need 0 < min <= max <= 1, "
                f"got {self.crop_min_scale}, {self.crop_max_scale}"
            )
        if not 0.0 < self.crop_min_aspect <= self.crop_max_aspect:
            raise ValueError(
                f"AugmentConfig.crop_min_aspect/crop_max_aspect: need 0 < min <= max, "
                f"got {self.crop_min_aspect}, {self.crop_max_aspect}"
            )
        if not self.crop_min_ious or max(self.crop_min_ious) < 1.0:
            # Without a "keep the whole image" option RandomIoUCrop searches forever when no
            # patch can reach the IoU it drew (e.g. 0.9 with a box smaller than the smallest patch).
            raise ValueError(f"AugmentConfig.crop_min_ious: must include 1.0, got {self.crop_min_ious}")
        if len(self.fill_mean) != 3 or not all(0.0 <= m <= 1.0 for m in self.fill_mean):
            raise ValueError(f"AugmentConfig.fill_mean: three values in [0, 1], got {self.fill_mean}")
        if self.crop_trials < 1:
            raise ValueError(f"AugmentConfig.crop_trials: at least 1, got {self.crop_trials}")
        if self.min_box_size < 1.0:
            raise ValueError(f"AugmentConfig.min_box_size: at least 1, got {self.min_box_size}")


def _box_companions(inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    # What SanitizeBoundingBoxes must filter together with the boxes.
    return inputs["labels"], inputs["difficult"], inputs["frame"]


class _BatchedIoUCrop(v2.RandomIoUCrop):
    """``RandomIoUCrop`` with its patch search drawn for all trials of an option at once.

    torchvision tries the ``trials`` patches of a drawn IoU option one at a time in a Python
    loop of small tensor ops; that search was half the augmentation time (about 13 ms of
    25 ms for a 500x375 image). Drawing all trials as one tensor and taking the first that
    passes the same checks picks from the same distribution. The crop itself, the marking of
    boxes whose centre falls outside the patch and everything after are torchvision's.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = v2.query_size(flat_inputs)
        boxes = v2.get_bounding_boxes(flat_inputs)
        xyxy = v2.functional.convert_bounding_box_format(
            boxes.as_subclass(Tensor), old_format=boxes.format, new_format=tv_tensors.BoundingBoxFormat.XYXY
        )
        cx = 0.5 * (xyxy[:, 0] + xyxy[:, 2])  # [N]
        cy = 0.5 * (xyxy[:, 1] + xyxy[:, 3])
        while True:
            min_iou = self.options[int(torch.randint(len(self.options), (1,)))]
            if min_iou >= 1.0:  # "keep the whole image"
                return {}
            scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)
            new_w = (orig_w * scale[:, 0]).long()  # [K], truncated like int() in torchvision
            new_h = (orig_h * scale[:, 1]).long()
            offset = torch.rand(self.trials, 2)
            left = ((orig_w - new_w) * offset[:, 0]).long()
            top = ((orig_h - new_h) * offset[:, 1]).long()
            right, bottom = left + new_w, top + new_h
            aspect = new_w / new_h.clamp(min=1)
            ok = (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio) & (new_w > 0) & (new_h > 0)
            # Boxes whose centre is inside each patch: [N, K].
            inside = (left < cx[:, None]) & (cx[:, None] < right) & (top < cy[:, None]) & (cy[:, None] < bottom)
            patches = torch.stack([left, top, right, bottom], dim=1).to(xyxy.dtype)
            iou = box_iou(xyxy, patches).masked_fill(~inside, -1.0)  # only boxes centred inside count
            ok &= inside.any(dim=0) & (iou.max(dim=0).values >= min_iou)
            if ok.any():
                k = int(ok.nonzero()[0])
                return {
                    "top": int(top[k]),
                    "left": int(left[k]),
                    "height": int(new_h[k]),
                    "width": int(new_w[k]),
                    "is_within_crop_area": inside[:, k],
                }


class DetectionTransform:
    """Augmentation (or none) shared by all frames of a sample, then resize to ``size`` x ``size``.

    ``cfg=None`` is the evaluation transform: resize only. Call with one frame
    (``transform(image, target)``) or with a clip (``transform.clip(frames, targets)``).
    :func:`train_transform` and :func:`eval_transform` are the usual ways to build one.
    """

    def __init__(self, size: int, cfg: AugmentConfig | None):
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.cfg = cfg
        self._to_float = v2.ToDtype(torch.float32, scale=True)
        if cfg is None:
            return
        fill = tuple(round(255 * m) for m in cfg.fill_mean)  # images are still uint8 at zoom-out
        colour = _colour_distortion(cfg)
        zoom_out = v2.RandomZoomOut(
            fill={tv_tensors.Image: fill, "others": 0}, side_range=(1.0, cfg.zoom_out_max), p=cfg.zoom_out_p
        )
        # Colour and zoom-out need no boxes.
        self._augment = v2.Compose([colour, zoom_out] if cfg.photometric_first else [zoom_out])
        self._late_colour = None if cfg.photometric_first else colour
        # The IoU crop needs at least one box (see clip()).
        self._crop: v2.Transform | None = None
        if cfg.crop_p > 0:
            self._crop = _BatchedIoUCrop(
                min_scale=cfg.crop_min_scale,
                max_scale=cfg.crop_max_scale,
                min_aspect_ratio=cfg.crop_min_aspect,
                max_aspect_ratio=cfg.crop_max_aspect,
                sampler_options=list(cfg.crop_min_ious),
                trials=cfg.crop_trials,
            )
            if cfg.crop_p < 1:
                self._crop = v2.RandomApply([self._crop], p=cfg.crop_p)
        self._finish = v2.Compose(
            [
                v2.RandomHorizontalFlip(p=cfg.flip_p),
                v2.Resize((size, size), antialias=True),
                # Resize scales by float32(size / width) and doesn't clamp: an edge at the width can
                # land at size + 8e-6, and SanitizeBoundingBoxes drops a box past the canvas (1% of
                # the sample's boxes at 160 px, every box touching the right edge of a 600 px photo
                # at 320 px, the same ones every epoch, trained as background).
                v2.ClampBoundingBoxes(),
                # Removes boxes RandomIoUCrop marked as outside the patch (centre outside) and
                # boxes that became too small, with their labels, difficult flags and frame index.
                v2.SanitizeBoundingBoxes(min_size=cfg.min_box_size, labels_getter=_box_companions),
            ]
        )

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``uint8 Tensor[3, H, W]`` and its target -> ``float32 Tensor[3, S, S]`` and the new target."""
        images, targets = self.clip(image.unsqueeze(0), [target])
        return images[0], targets[0]

    def clip(self, frames: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """``uint8 Tensor[T, 3, H, W]`` and T targets -> ``float32 Tensor[T, 3, S, S]`` and T targets.

        One parameter draw for the whole clip: every frame gets the same colour change,
        zoom-out, crop and flip.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape [T, 3, H, W], got {tuple(frames.shape)}")
        if len(targets) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} frames but {len(targets)} targets")
        if self.cfg is None:
            # Evaluation: resize only. Normalised boxes do not change under a resize.
            image = v2.functional.resize(frames, [self.size, self.size], antialias=True)
            return self._to_float(image), [dict(t) for t in targets]

        height, width = frames.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]) * scale
        sample = {
            "image": tv_tensors.Image(frames),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.cat([t["labels"] for t in targets]),
            "difficult": torch.cat([t["difficult"] for t in targets]),
            # Which frame each box belongs to, filtered along with the labels.
            "frame": torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.int64) for i, t in enumerate(targets)]),
        }
        sample = self._augment(sample)
        # RandomIoUCrop never finds a patch around no boxes (it would loop until it draws
        # "keep the whole image"), so images without boxes skip it.
        if self._crop is not None and len(sample["labels"]) > 0:
            sample = self._crop(sample)
        sample = self._finish(sample)

        out_boxes = (sample["boxes"].as_subclass(Tensor) / self.size).clamp_(0.0, 1.0)
        out = []
        for i in range(len(targets)):
            keep = sample["frame"] == i
            out.append(
                {
                    "boxes": out_boxes[keep].to(torch.float32),
                    "labels": sample["labels"][keep],
                    "difficult": sample["difficult"][keep],
                }
            )
        image = self._to_float(sample["image"])
        if self._late_colour is not None and self.cfg.photometric_device:
            state = torch.get_rng_state()
            self._late_colour(torch.zeros(1, 3, 1, 1))  # the same draws as on the image (none depends on its size)
            for t in out:
                t[DEFERRED_COLOUR] = state.numpy().tobytes()
        elif self._late_colour is not None:
            image = self._late_colour(image)
        return image.as_subclass(Tensor), out


#: The target key under which a worker leaves the generator state its colour draws start from
#: (``photometric_device``); bytes, so that moving a batch to the device leaves it on the CPU.
DEFERRED_COLOUR = "colour_rng"


class DeviceColour:
    """The colour change the loader workers drew and left (``photometric_device``), applied where
    the batch is: ``images`` float ``[B, 3, S, S]`` (clips ``[B, T, 3, S, S]``, one draw per clip)
    and their targets (a dict per frame sample, a list of dicts per clip) -> the images changed.

    Each sample's draws are replayed from the state its worker recorded, so the parameters are the
    worker path's own, and torch's CPU generator is left as it was. On a GPU, SSD's own distortion
    (the default hue and channel-shuffle chance) is made on the whole batch at once
    (:mod:`ssd.data.batch_colour`); on a CPU, or for another composition, image by image.
    ``batch``: force one or the other (None: by the images' device).

    Why by device: image by image is launch-bound on a GPU (1.0-1.2 ms per image on an H200),
    while on this project's 2-core CPU the batch at once was 2-3 times slower than image by
    image (64 images of 300 px: 6.3-17.9 ms against 3.0-5.7 ms per image), each image's
    passes staying in cache.
    """

    def __init__(self, cfg: AugmentConfig, batch: bool | None = None):
        if not cfg.photometric_device:
            raise ValueError("DeviceColour: the augmentation does not defer its colour change (photometric_device)")
        self.colour = _colour_distortion(cfg)
        self.batch = batch if isinstance(self.colour, v2.RandomPhotometricDistort) else False

    def __call__(self, images: Tensor, targets: list[Any]) -> Tensor:
        batched = images.device.type != "cpu" if self.batch is None else self.batch
        out = images if batched else images.clone()
        rows = []
        with torch.random.fork_rng(devices=[]):
            for i, target in enumerate(targets):
                first = target[0] if isinstance(target, list) else target
                if DEFERRED_COLOUR not in first:
                    raise ValueError(f"sample {i} of the batch carries no colour draws ({DEFERRED_COLOUR!r}): "
                                     "its loader's augmentation has photometric_device off")
                torch.set_rng_state(torch.frombuffer(bytearray(first[DEFERRED_COLOUR]), dtype=torch.uint8))
                if batched:
                    rows.append(batch_colour.draw(self.colour))
                else:
                    out[i] = self.colour(images[i])
        if not batched:
            return out
        params = torch.stack(rows)
        if images.ndim == 5:  # clips: one draw per clip, made on each of its frames
            frames = images.shape[1]
            return batch_colour.apply(images.flatten(0, 1), params.repeat_interleave(frames, 0)).view_as(images)
        return batch_colour.apply(images, params)


def _colour_distortion(cfg: AugmentConfig) -> v2.Transform:
    """SSD's photometric distortion; with a channel-shuffle chance or hue range of its own,
    the same steps (brightness, contrast, saturation, hue, channel permutation, each with its
    own draw) composed from torchvision's pieces."""
    shuffle_p = cfg.photometric_p if cfg.channel_shuffle_p is None else cfg.channel_shuffle_p
    if shuffle_p == cfg.photometric_p and cfg.hue == 0.05:
        return v2.RandomPhotometricDistort(p=cfg.photometric_p)
    p = cfg.photometric_p
    steps = [
        v2.RandomApply([v2.ColorJitter(brightness=(0.875, 1.125))], p=p),
        v2.RandomApply([v2.ColorJitter(contrast=(0.5, 1.5))], p=p),
        v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))], p=p),
    ]
    if cfg.hue > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(hue=(-cfg.hue, cfg.hue))], p=p))
    if shuffle_p > 0:
        steps.append(v2.RandomApply([v2.RandomChannelPermutation()], p=shuffle_p))
    return v2.Compose(steps)


def train_transform(size: int, cfg: AugmentConfig = AugmentConfig()) -> DetectionTransform:
    """The SSD training augmentation (see the module docstring) to a square ``size`` input."""
    return DetectionTransform(size, cfg)


def eval_transform(size: int) -> DetectionTransform:
    """Resize to a square ``size`` input and convert to float; boxes unchanged (they are normalised)."""
    return DetectionTransform(size, None)
