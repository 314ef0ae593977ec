"""The torchvision peer: ``ssdlite320_mobilenet_v3_large`` (random weights) at our input size with
our thresholds, its own ``forward`` cut into pre -> forward -> post, timed against one of our
models in one loop (:mod:`pipeline.bench.models` describes the figures).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from pipeline.bench.chain import PARTS, Step, decode_rgb, frame_figures, part_ms, rounded_ratio, time_steps
from ssd.postprocess import PostprocessConfig
from ssd.pruning import count_macs_params


def build_peer(num_classes: int, image_size: int, config: PostprocessConfig = PostprocessConfig()) -> nn.Module:
    """torchvision's SSDLite320-MobileNetV3-Large, random weights, run at ``image_size`` with our thresholds."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    peer = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    # The builder fixes 320 x 320 (its kwargs would also reach the backbone builder): its
    # transform resizes every image to fixed_size, so that is where our size goes.
    peer.transform.min_size = (image_size,)
    peer.transform.max_size = image_size
    peer.transform.fixed_size = (image_size, image_size)
    peer.score_thresh = config.score_threshold
    peer.topk_candidates = config.top_k
    peer.nms_thresh = config.nms_threshold
    peer.detections_per_img = config.max_detections
    return peer.eval()


def peer_steps(peer: nn.Module, jpeg: bytes, batch: int, device: torch.device) -> list[Step]:
    """torchvision's ``SSD.forward`` in eval mode, cut into pre -> forward -> post (same calls, same order)."""
    frames = [jpeg] * batch

    def pre(_: Any) -> tuple[Any, list[tuple[int, int]]]:
        # Its input: a list of float [0, 1] images of any size.
        images = [TF.to_dtype(torch.from_numpy(decode_rgb(f)).permute(2, 0, 1).to(device), torch.float32, scale=True)
                  for f in frames]  # fmt: skip
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, _ = peer.transform(images)
        return image_list, sizes

    def forward(x: tuple[Any, list[tuple[int, int]]]) -> tuple:
        image_list, sizes = x
        features = list(peer.backbone(image_list.tensors).values())
        return image_list, sizes, features, peer.head(features)

    def post(x: tuple) -> list[dict[str, Tensor]]:
        image_list, sizes, features, head_outputs = x
        anchors = peer.anchor_generator(image_list, features)
        detections = peer.postprocess_detections(head_outputs, anchors, image_list.image_sizes)
        return peer.transform.postprocess(detections, image_list.image_sizes, sizes)

    return [("pre", pre), ("forward", forward), ("post", post)]


class _PeerNetwork(nn.Module):
    """The peer's backbone and head as one module of one tensor, for counting multiply-adds."""

    def __init__(self, peer: nn.Module):
        super().__init__()
        self.backbone, self.head = peer.backbone, peer.head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.head(list(self.backbone(images).values()))


def measure_peer(
    peer: nn.Module, ours: Sequence[Step], jpeg: bytes, device: torch.device, repeats: int, warmup: int
) -> dict[str, Any]:
    """The peer's latency at batch 1, split as ours, and its network's cost at its input size.

    ``ours``: the batch-1 chain of the model it is compared with. Both chains run alternately
    in one loop (the peer's ignores what ours returns), so a change in the machine's load hits
    both alike; ``ours_ms`` is our latency from that loop, ``ratio`` and ``forward_ratio``
    ours over the peer's.
    """
    size = int(peer.transform.fixed_size[0])
    macs, params = count_macs_params(_PeerNetwork(peer), size)
    steps = peer_steps(peer, jpeg, 1, device)
    both = [(f"ours_{name}", fn) for name, fn in ours] + [(f"peer_{name}", fn) for name, fn in steps]
    seconds, detections = time_steps(both, repeats, warmup, device)
    ours_s = {part: seconds[f"ours_{part}"] for part in PARTS}
    latency = {part: seconds[f"peer_{part}"] for part in PARTS}
    with torch.inference_mode():  # its scores, as ours: how much its post-processing had to sift
        (_, pre), (_, forward), _ = steps
        logits = forward(pre(None))[3]["cls_logits"]
    return {
        "model": "torchvision ssdlite320_mobilenet_v3_large",
        "image_size": size,
        "num_classes": int(peer.head.classification_head.num_columns),
        **frame_figures(params, macs, latency, logits, peer.score_thresh, detections),
        "ours_ms": part_ms(ours_s)["total"],
        "ratio": rounded_ratio(sum(ours_s.values()), sum(latency.values())),
        "forward_ratio": rounded_ratio(ours_s["forward"], latency["forward"]),
    }
