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

The peer (:mod:`pipeline.bench.peer`): torchvision's ``ssdlite320_mobilenet_v3_large`` (random weights, the classes of
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

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.bench.chain import (
    Step, decode_rgb, frame_figures, part_ms, rounded_ratio, source_jpeg, time_steps,
)
from pipeline.bench.peer import build_peer, measure_peer
from ssd.data.transforms import eval_transform
from ssd.model_file import load_model_file
from ssd.models import build_model
from ssd.models.lstm_ssd import TEMPORAL_ARCH_KEYS
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.pruning import ARCH_KEY, count_macs_params


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
    jpeg, width, height = source_jpeg(source_image, source_size, jpeg_quality)
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
# Our models


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
        detections = post((logits, deltas))
    # The evaluation's post-processing on the same outputs (timed alone: it needs no fresh frame).
    evaluation = PostProcessor(model.priors, PostprocessConfig()).to(device)
    eval_post, _ = time_steps([("post", lambda _: evaluation(logits, deltas))], repeats, warmup, device)
    rate, _ = time_steps(model_steps(model, jpeg, batch, device, postprocessor), throughput_repeats, warmup, device)
    arch = getattr(model, "arch", {})
    per_batch = part_ms(rate)
    return {
        "arch": str(arch.get("name", type(model).__name__)),
        "mode": "streaming" if _temporal(model) else "frame",
        "pruned": "yes" if arch.get(ARCH_KEY) else "no",
        "image_size": int(model.image_size),
        "width_mult": float(arch.get("width_mult", 1.0)),
        "num_classes": int(model.num_classes),
        "num_priors": int(model.priors.shape[0]),
        **frame_figures(params, macs, latency, logits, config.score_threshold, detections),
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
    # lstm_ssd_mobilenet_v3_large is built on ssdlite_mobilenet_v3_large, and so on
    arch["name"] = str(lstm_arch["name"]).replace("lstm_ssd_", "ssdlite_", 1)
    return arch


def arch_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys, sorted, where two archs differ; compared as JSON (a graph's metadata went through
    JSON, where tuples are lists), then by value (1 equals 1.0; a mapping's key order doesn't count)."""
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value))

    return [k for k in sorted(set(a) | set(b)) if plain(a.get(k)) != plain(b.get(k))]


def _reference(lstm: nn.Module, models: dict[str, nn.Module]) -> tuple[str, nn.Module, bool]:
    """(name, model, random) of the SSDLite to compare ``lstm`` with: a listed one of its arch, else a fresh one."""
    wanted = ssdlite_arch(lstm.arch)
    for name, model in models.items():
        if not _temporal(model) and dict(model.arch) == wanted:
            return name, model, False
    torch.manual_seed(0)  # random weights, the same ones every run
    model = build_model(wanted).eval().to(lstm.priors.device)
    label = f"random {wanted['name']} w{wanted.get('width_mult')} {wanted.get('image_size')}px"
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
        "forward_ratio": rounded_ratio(seconds["lstm"], seconds["ssdlite"]),
    }
    if lstm.arch.get(ARCH_KEY):
        result["note"] = "the LSTM-SSD is pruned, the reference is not"
    return result
