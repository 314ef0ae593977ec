"""Model latency and throughput, split into pre-processing, forward and post-processing.

For every model file, on one device (figures in milliseconds, medians over ``repeats``
runs after ``warmup`` untimed ones):

- ``latency_ms`` (batch 1, one frame at a time), per part:

  - ``pre``: decode a JPEG frame of the source size (OpenCV, BGR -> RGB), resize to the
    model's input and convert to float (:func:`ssd.data.transforms.eval_transform`, the
    evaluation loader's steps), copy to the device;
  - ``forward``: the model. A temporal model (LSTM-SSD) carries its state from call to
    call, as when streaming a video: its figure is the per-frame *streaming* latency;
  - ``post``: :class:`ssd.postprocess.PostProcessor` on the model's real outputs, with the
    config given (the benchmark stage: a deployed detector's, scores from 0.3); the
    evaluation's config (scores from 0.01, up to 200 detections) is timed on the same
    outputs too, as ``post_eval_config_ms``;
  - ``total``: the sum of the three medians, so ``share`` (each part over the total)
    adds up to 1 and the chart's stacked bars add up to the total.

- ``throughput``: ``batch`` frames per call (a temporal model: ``batch`` streams side by
  side), median over ``throughput_repeats`` runs: ms per batch for each part, images/s.
- ``params``, ``macs``: :func:`ssd.pruning.count_macs_params` at the model's input size.

Post-processing time depends on the scores: a random-weight or barely trained model
emits flat scores, so every prior passes the 0.01 threshold for every class and the
post-processing hits its ``top_k`` limits (its worst case); a trained model's scores are
peaked and far fewer candidates reach NMS. ``candidates_per_image`` (class scores above
the threshold, of the measured frame) tells which case a figure is.

The peer: torchvision's ``ssdlite320_mobilenet_v3_large`` (random weights, the classes of
the first unpruned frame model listed), its transform set to that model's input size, end to end
with its own code and the same post-processing thresholds as ours, split the same way:
``pre`` = decode + float conversion + its transform (normalise, resize, batch);
``forward`` = backbone + head; ``post`` = anchors (it rebuilds them on every call) +
``postprocess_detections`` + boxes back to the source size. Its chain and our model's run
alternately in one loop (load changes hit both alike): ``peer_ratio`` is our end-to-end
latency over the peer's, ``peer.forward_ratio`` the same for the forwards only (which,
unlike the post-processing, does not depend on the weights).

LSTM-SSD against SSDLite: each temporal model's streaming forward against the forward of
an SSDLite of the same architecture (width, input size, taps, extras, priors, classes): a
listed model if one matches, else a random-weight one built from the LSTM model's arch
without its temporal keys. The two forwards are timed alternately in one loop, so a
change in the machine's load hits both alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ssd.data.transforms import eval_transform
from ssd.model_file import load_model_file
from ssd.models import build_model
from ssd.models.lstm_ssd import TEMPORAL_ARCH_KEYS
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.pruning import ARCH_KEY, count_macs_params

#: One step of a timed chain: a name and a function of the previous step's output.
Step = tuple[str, Callable[[Any], Any]]

PARTS = ("pre", "forward", "post")


def run(
    files: Sequence[str],
    device: str = "cpu",
    batch: int = 16,
    repeats: int = 20,
    throughput_repeats: int = 5,
    warmup: int = 3,
    source_size: Sequence[int] = (640, 480),
    jpeg_quality: int = 90,
    source_image: str | None = None,
    peer: bool = True,
    postprocess: PostprocessConfig = PostprocessConfig(),
) -> dict[str, Any]:
    """Measure every model file of ``files`` (plus the peer and the LSTM-SSD comparison).

    Returns ``{"postprocess_share": {name: share}, "lstm_vs_ssdlite_latency_ratio": r,
    "peer_ratio": r, "models": {name: figures}, "peer": figures, "lstm_vs_ssdlite":
    {lstm name: figures}}`` (the two ratios only when they can be computed); names are the
    files' stems. The frame pre-processing decodes: the JPEG file ``source_image``, else a
    synthetic one of ``source_size`` (width, height) and ``jpeg_quality``.
    """
    dev = torch.device(device)
    if source_image is not None:
        jpeg = Path(source_image).read_bytes()
        height, width = decode_rgb(jpeg).shape[:2]
    else:
        width, height = (int(s) for s in source_size)
        jpeg = synthetic_jpeg(width, height, jpeg_quality)
    models = {Path(f).stem: load_model_file(f, map_location=dev)[0] for f in files}
    if len(models) != len(files):
        raise ValueError(f"model files must have distinct names (stems): {list(files)}")

    figures = {
        name: {"file": str(f), **measure_model(model, jpeg, dev, batch, repeats, throughput_repeats, warmup, postprocess)}
        for (name, model), f in zip(models.items(), files)
    }
    comparisons = {
        name: compare_lstm(name, models, dev, repeats, warmup)
        for name, model in models.items()
        if _temporal(model)
    }
    frame_models = [name for name, model in models.items() if not _temporal(model)]
    peer_figures = None
    if peer and frame_models:
        # Compared with the first unpruned frame model (the peer is not pruned either).
        ours = next((n for n in frame_models if not models[n].arch.get(ARCH_KEY)), frame_models[0])
        model = models[ours]
        peer_model = build_peer(model.num_classes, model.image_size, postprocess).to(dev)
        chain = model_steps(model, jpeg, 1, dev, PostProcessor(model.priors, postprocess).to(dev))
        peer_figures = {"compared_with": ours, **measure_peer(peer_model, chain, jpeg, dev, repeats, warmup)}
        peer_ratio = peer_figures.pop("ratio")  # a headline figure: top level only

    # Headline figures first: what `dvc metrics diff` readers look for.
    result: dict[str, Any] = {"postprocess_share": {name: fig["share"]["post"] for name, fig in figures.items()}}
    if comparisons:
        result["lstm_vs_ssdlite_latency_ratio"] = next(iter(comparisons.values()))["forward_ratio"]
    if peer_figures is not None:
        result["peer_ratio"] = peer_ratio
    result["source_size"] = f"{width}x{height}"
    result["models"] = figures
    if peer_figures is not None:
        result["peer"] = peer_figures
    if comparisons:
        result["lstm_vs_ssdlite"] = comparisons
    return result


# ---------------------------------------------------------------------------------------------
# Timing


def time_steps(steps: Sequence[Step], repeats: int, warmup: int, device: torch.device) -> tuple[dict[str, float], Any]:
    """Run the chain ``steps`` ``warmup + repeats`` times; median seconds of each step over the last ``repeats``.

    Each step gets the previous step's output (the first gets ``None``). On CUDA the device is
    synchronised around every step, so each one's queued kernels are counted in its own time.
    Returns the medians and the last run's final output.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    value: Any = None
    with torch.inference_mode():
        for i in range(warmup + repeats):
            value = None
            sync()
            t0 = time.perf_counter()
            for name, fn in steps:
                value = fn(value)
                sync()
                t1 = time.perf_counter()
                if i >= warmup:
                    times[name].append(t1 - t0)
                t0 = t1
    return {name: statistics.median(t) for name, t in times.items()}, value


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    ms = {part: round(seconds[part] * 1e3, 3) for part in PARTS}
    ms["total"] = round(sum(seconds[part] for part in PARTS) * 1e3, 3)
    return ms


def _shares(seconds: dict[str, float]) -> dict[str, float]:
    total = sum(seconds[part] for part in PARTS)
    return {part: round(seconds[part] / total, 4) for part in PARTS}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


# ---------------------------------------------------------------------------------------------
# Our models


def synthetic_jpeg(width: int, height: int, quality: int = 90, seed: int = 0) -> bytes:
    """A ``width`` x ``height`` JPEG with the detail of a photo: smooth colour fields, shapes, sensor noise.

    A flat or pure-noise image would decode faster or slower than a real frame: JPEG decoding
    time follows the amount of detail.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(2, min(width, height) // 30), max(3, min(width, height) // 6)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), r, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + r, y + r), colour, -1)
    img = np.clip(img.astype(np.int16) + rng.normal(0, 6, img.shape).astype(np.int16), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode the benchmark frame")
    return data.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 ``[H, W, 3]`` RGB, as the loaders decode (EXIF orientation ignored)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError(f"cannot decode the benchmark frame ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _temporal(model: nn.Module) -> bool:
    return bool(getattr(model, "is_temporal", False))


def model_steps(model: nn.Module, jpeg: bytes, batch: int, device: torch.device, postprocessor: PostProcessor) -> list[Step]:
    """The chain pre -> forward -> post for ``batch`` copies of the frame ``jpeg``.

    A temporal model's state lives in the closure: every call continues the stream(s).
    """
    transform = eval_transform(model.image_size)
    frames = [jpeg] * batch

    def pre(_: Any) -> Tensor:
        rgb = torch.from_numpy(np.stack([decode_rgb(f) for f in frames])).permute(0, 3, 1, 2)  # [B, 3, H, W]
        images, _ = transform.clip(rgb, [{} for _ in frames])  # resize, to float [0, 1]
        return images.to(device)

    temporal = _temporal(model)
    state = None

    def forward(images: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal state
        if not temporal:
            return model(images)
        logits, deltas, state = model(images, state)
        return logits, deltas

    def post(out: tuple[Tensor, Tensor]) -> list[dict[str, Tensor]]:
        return postprocessor(*out)

    return [("pre", pre), ("forward", forward), ("post", post)]


def measure_model(
    model: nn.Module,
    jpeg: bytes,
    device: torch.device,
    batch: int,
    repeats: int,
    throughput_repeats: int,
    warmup: int,
    config: PostprocessConfig = PostprocessConfig(),
) -> dict[str, Any]:
    """Latency at batch 1, throughput at ``batch``, cost, for one of our models (module docstring)."""
    model = model.eval()
    macs, params = count_macs_params(model)
    postprocessor = PostProcessor(model.priors, config).to(device)
    steps = model_steps(model, jpeg, 1, device, postprocessor)
    latency, _ = time_steps(steps, repeats, warmup, device)
    with torch.inference_mode():  # one more frame, untimed: what the post-processing had to sift
        (_, pre), (_, forward), (_, post) = steps
        logits, deltas = forward(pre(None))
        candidates = int((torch.softmax(logits.float(), dim=-1)[..., 1:] > config.score_threshold).sum())
        detections = post((logits, deltas))
    # The evaluation's post-processing on the same outputs (timed alone: it needs no fresh frame).
    evaluation = PostProcessor(model.priors, PostprocessConfig()).to(device)
    eval_post, _ = time_steps([("post", lambda _: evaluation(logits, deltas))], repeats, warmup, device)
    rate, _ = time_steps(model_steps(model, jpeg, batch, device, postprocessor), throughput_repeats, warmup, device)
    arch = getattr(model, "arch", {})
    per_batch = _ms(rate)
    return {
        "arch": str(arch.get("name", type(model).__name__)),
        "mode": "streaming" if _temporal(model) else "frame",
        "pruned": "yes" if arch.get(ARCH_KEY) else "no",
        "image_size": int(model.image_size),
        "width_mult": float(arch.get("width_mult", 1.0)),
        "num_classes": int(model.num_classes),
        "num_priors": int(model.priors.shape[0]),
        "params": params,
        "macs": macs,
        "latency_ms": _ms(latency),
        "share": _shares(latency),
        "candidates_per_image": candidates,
        "detections_per_image": len(detections[0]["labels"]),
        "post_eval_config_ms": round(eval_post["post"] * 1e3, 3),
        "throughput": {
            "batch": batch,
            "images_per_s": round(batch / (per_batch["total"] / 1e3), 2),
            "ms_per_batch": per_batch,
        },
    }


# ---------------------------------------------------------------------------------------------
# LSTM-SSD against SSDLite


def ssdlite_arch(lstm_arch: dict[str, Any]) -> dict[str, Any]:
    """The arch of the SSDLite an LSTM-SSD arch is built on (no temporal keys, no pruning)."""
    arch = {k: v for k, v in lstm_arch.items() if k not in TEMPORAL_ARCH_KEYS and k != ARCH_KEY}
    arch["name"] = "ssdlite_mobilenet_v2"
    return arch


def _reference(lstm: nn.Module, models: dict[str, nn.Module]) -> tuple[str, nn.Module, bool]:
    """(name, model, random) of the SSDLite to compare ``lstm`` with: a listed one of its arch, else a fresh one."""
    wanted = ssdlite_arch(lstm.arch)
    for name, model in models.items():
        if not _temporal(model) and dict(model.arch) == wanted:
            return name, model, False
    torch.manual_seed(0)  # random weights, the same ones every run
    model = build_model(wanted).eval().to(lstm.priors.device)
    label = f"random ssdlite_mobilenet_v2 w{wanted.get('width_mult')} {wanted.get('image_size')}px"
    return label, model, True


def compare_lstm(name: str, models: dict[str, nn.Module], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Streaming forward of the temporal model ``models[name]`` against the forward of its SSDLite, timed alternately.

    Forwards only: pre-processing is the same for both, and post-processing depends on the
    weights (a trained LSTM-SSD against a random-weight reference would compare score
    distributions, not architectures).
    """
    lstm = models[name]
    ref_name, ref, random = _reference(lstm, models)
    images = torch.rand(1, 3, lstm.image_size, lstm.image_size, device=device)
    state = None

    def lstm_forward(_: Any) -> None:
        nonlocal state
        _, _, state = lstm(images, state)

    # One chain of two steps: every run times one forward of each, back to back.
    seconds, _ = time_steps([("lstm", lstm_forward), ("ssdlite", lambda _: ref(images))], repeats, warmup, device)
    result: dict[str, Any] = {
        "reference": ref_name,
        "random_reference": "yes" if random else "no",
        "lstm_forward_ms": round(seconds["lstm"] * 1e3, 3),
        "ssdlite_forward_ms": round(seconds["ssdlite"] * 1e3, 3),
        "forward_ratio": _ratio(seconds["lstm"], seconds["ssdlite"]),
    }
    if lstm.arch.get(ARCH_KEY):
        result["note"] = "the LSTM-SSD is pruned, the reference is not"
    return result


# ---------------------------------------------------------------------------------------------
# The torchvision peer


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
        candidates = int((torch.softmax(logits.float(), dim=-1)[..., 1:] > peer.score_thresh).sum())
    return {
        "model": "torchvision ssdlite320_mobilenet_v3_large",
        "image_size": size,
        "num_classes": int(peer.head.classification_head.num_columns),
        "params": params,
        "macs": macs,
        "latency_ms": _ms(latency),
        "share": _shares(latency),
        "candidates_per_image": candidates,
        "detections_per_image": len(detections[0]["labels"]),
        "ours_ms": _ms(ours_s)["total"],
        "ratio": _ratio(sum(ours_s.values()), sum(latency.values())),
        "forward_ratio": _ratio(ours_s["forward"], latency["forward"]),
    }
