"""The deployed detectors: PyTorch eager against ONNX Runtime float and int8, in one run.

For every listed model file ``models/{stem}.pt`` in PyTorch (``eager``, and ``eager_folded``: batch
norm folded into the convolutions, :mod:`ssd.fold`) and its graphs ``{dir}/{stem}.onnx`` and
``{dir}/{stem}-int8.onnx`` (the deploy stage's) in ONNX Runtime (``ort_fp32``, ``ort_int8``), at
each thread count (torch and ONNX Runtime alike); where the deploy stage wrote the int8 graph with
the post-processing inside (``{stem}-int8-detect.onnx``), also ``ort_int8_detect`` (that file:
its ``forward`` includes the post-processing, its ``post`` only splits the outputs per image).
Per runtime:

- ``latency_ms`` at batch 1, split as the models section splits it: ``pre`` (JPEG decode,
  resize, float), ``forward`` (the runtime; LSTM-SSD streaming, its state fed back), ``post``
  (:class:`ssd.postprocess.PostProcessor` with a deployed detector's thresholds), ``total``;
  ``post_share``: post over total;
- ``images_per_s`` at ``batch`` frames per call (LSTM-SSD: ``batch`` streams).

The runtimes of a model run alternately in one loop (each run times one frame of each),
so a change in the machine's load hits all of them alike; the medians are reported. Per model
with a detector graph, ``camera_loop`` (:func:`camera_loop`) times it and the raw int8 graph
with Python post-processing frame after frame, as a camera runs them.

Headline ratios (from the first thread count), forwards at batch 1:

- ``pruned_speedup``: the unpruned model's forward over the pruned one's, per runtime, and
  ``pruned_speedup_fastest`` in the runtime where the two together are fastest;
- ``int8_vs_eager``: the unpruned model's float eager forward over its int8 forward;
- ``lstm_vs_ssdlite``: LSTM-SSD's streaming forward over the SSDLite it is built on, per
  ONNX Runtime variant (timed alternately, forwards only);
- ``post_share``: the post-processing's share of the deployed detector's end-to-end latency in
  ``camera_loop`` (:func:`camera_loop`: the int8 graph with the post-processing inside, frame
  after frame), per model; ``post_share_python``: the same loop's figure for the raw int8 graph
  followed by :class:`ssd.postprocess.PostProcessor`; ``post_share_interleaved``: the detector
  graph's share in the alternating loop above, where every frame starts with cold caches.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import torch
from torch import nn

from pipeline.bench.chain import PARTS, Step, part_ms, source_jpeg, time_steps
from pipeline.bench.models import arch_differences, model_steps
from ssd.errors import InputError
from ssd.fold import fold_batchnorm
from ssd.model_file import load_model_file
from ssd.onnx_detector import DetectionGraph, load_detection_graph, load_onnx_detector
from ssd.postprocess import PostprocessConfig, PostProcessor

RUNTIMES = ("eager", "eager_folded", "ort_fp32", "ort_int8")
#: The int8 graph with its post-processing inside (the deploy stage's ``-int8-detect.onnx``).
DETECT = "ort_int8_detect"
CPU = torch.device("cpu")


def runtimes(file: str, onnx_dir: str, threads: int, postprocess: PostprocessConfig | None = None) -> dict[str, Any]:
    """The model of ``file`` in each runtime (ONNX Runtime sessions with ``threads`` threads), and
    ``ort_int8_detect`` (the int8 graph with its post-processing inside) where the deploy stage wrote it.
    ``postprocess``: the thresholds the Python post-processing is timed with; a detector graph
    built with others is an InputError (the two would not do the same work)."""
    stem = Path(file).stem
    eager, held = load_model_file(file)
    eager.eval()
    models: dict[str, Any] = {"eager": eager, "eager_folded": fold_batchnorm(eager).model}
    for key, name in (("ort_fp32", f"{stem}.onnx"), ("ort_int8", f"{stem}-int8.onnx")):
        models[key], info = load_onnx_detector(Path(onnx_dir) / name, threads)
        _check_same_model(file, held, Path(onnx_dir) / name, info)
    detect = Path(onnx_dir) / f"{stem}-int8-detect.onnx"
    if detect.is_file():
        models[DETECT], info = load_detection_graph(detect, threads)
        _check_same_model(file, held, detect, info)
        if postprocess is not None:
            _check_thresholds(detect, info.get("postprocess", {}), postprocess)
    return models


def _check_same_model(file: str, held: dict[str, Any], graph: Path, info: dict[str, Any]) -> None:
    """A graph found by the model file's stem must have been exported from that model: a model
    retrained with another setting beside its old graphs was timed against them (exit 0)."""
    ours, theirs = held["arch"], info.get("model_arch", {})
    differ = [f"{k} {theirs.get(k)} in the graph, {ours.get(k)} in the file" for k in arch_differences(ours, theirs)]
    if info.get("class_names") != held["class_names"]:
        differ.append(f"classes {info.get('class_names')} in the graph, {held['class_names']} in the file")
    if differ:
        raise InputError(f"{graph}: exported from another model than {file} ({'; '.join(differ)}); run the deploy "
                         "stage again")


def _check_thresholds(path: Path, graph: dict[str, Any], python: PostprocessConfig) -> None:
    keys = ("score_threshold", "nms_threshold", "max_detections")
    differ = [f"{k} {graph.get(k)} in the graph, {getattr(python, k)} here" for k in keys
              if graph.get(k) is None or abs(float(graph[k]) - float(getattr(python, k))) > 1e-9]
    if differ:
        raise InputError(f"{path}: {'; '.join(differ)} (benchmark.models.postprocess): the camera loop would time "
                         "two different post-processings; set them alike (deploy.detect or "
                         "benchmark.models.postprocess)")


def detect_steps(graph: DetectionGraph, pre: Callable[[Any], Any], batch: int) -> list[Step]:
    """pre -> forward (the graph, post-processing included) -> post (its outputs split per image)."""
    state = None

    def forward(images: torch.Tensor) -> list:
        nonlocal state
        out, state = graph.run(images, state if graph.is_temporal else None)
        return out

    return [("pre", pre), ("forward", forward), ("post", lambda out: graph.per_image(out, batch))]


def alternate(models: dict[str, Any], jpeg: bytes, batch: int, repeats: int, warmup: int,
              postprocess: PostprocessConfig) -> dict[str, dict[str, float]]:
    """Milliseconds per part (``pre``, ``forward``, ``post``, ``total``) of every runtime, timed in one loop."""
    chain = []
    for name, model in models.items():
        if isinstance(model, DetectionGraph):
            pre = model_steps(models["ort_int8"], jpeg, batch, CPU, None)[0][1]  # the same decode and resize
            steps = detect_steps(model, pre, batch)
        else:
            steps = model_steps(model, jpeg, batch, CPU, PostProcessor(model.priors, postprocess))
        chain += [(f"{name}/{part}", fn) for part, fn in steps]
    seconds, _ = time_steps(chain, repeats, warmup, CPU)
    return {name: part_ms({part: seconds[f"{name}/{part}"] for part in PARTS}) for name in models}


def camera_loop(raw: nn.Module, detect: DetectionGraph, jpeg: bytes, rounds: int, block: int, warmup: int,
                postprocess: PostprocessConfig) -> dict[str, Any]:
    """The deployed detector as a camera runs it: frame after frame, nothing else in between.

    Blocks of ``block`` consecutive frames of the raw int8 graph followed by
    :class:`ssd.postprocess.PostProcessor` alternate with blocks of the same graph with its
    post-processing inside (``detect``), ``rounds`` times (a change in the machine's load hits
    both alike); per part the median of the blocks' medians. The in-graph post-processing takes
    the detector graph's forward over the raw graph's, plus splitting its outputs per image.
    Why blocks and not the frame-by-frame alternation of :func:`alternate`: there six runtimes
    take turns and each one's frame starts with the caches full of the others' weights, which
    no camera loop does; the in-graph post-processing's ~55 small operators pay for that most.
    """
    python = model_steps(raw, jpeg, 1, CPU, PostProcessor(raw.priors, postprocess))
    graph = detect_steps(detect, python[0][1], 1)
    parts: dict[str, dict[str, list[float]]] = {"python": {p: [] for p in PARTS}, "graph": {p: [] for p in PARTS}}
    for _ in range(rounds):
        for name, steps in (("python", python), ("graph", graph)):
            seconds, _ = time_steps(steps, block, warmup, CPU)
            for part in PARTS:
                parts[name][part].append(seconds[part])
    ms = {name: part_ms({p: statistics.median(v) for p, v in by_part.items()}) for name, by_part in parts.items()}
    post = _graph_post_ms(ms["graph"], ms["python"])
    return {"python_ms": ms["python"], "graph_ms": ms["graph"], "graph_post_ms": round(post, 3),
            "post_share": round(post / ms["graph"]["total"], 4),
            "post_share_python": round(ms["python"]["post"] / ms["python"]["total"], 4)}


def streaming_ratio(lstm: dict[str, nn.Module], ssdlite: dict[str, nn.Module], image_size: int,
                    repeats: int, warmup: int) -> dict[str, Any]:
    """LSTM-SSD's streaming forward over its SSDLite's, per ONNX Runtime variant, all timed in one loop."""
    images = torch.rand(1, 3, image_size, image_size)
    chain, state = [], {}
    for variant in ("ort_fp32", "ort_int8"):
        def stream(_: Any, model: nn.Module = lstm[variant], key: str = variant) -> None:
            state[key] = model(images, state.get(key))[2]

        chain += [(f"lstm/{variant}", stream), (f"ssdlite/{variant}", lambda _, m=ssdlite[variant]: m(images))]
    seconds, _ = time_steps(chain, repeats, warmup, CPU)
    return {variant: {"lstm_ms": round(seconds[f"lstm/{variant}"] * 1e3, 3),
                      "ssdlite_ms": round(seconds[f"ssdlite/{variant}"] * 1e3, 3),
                      "ratio": round(seconds[f"lstm/{variant}"] / seconds[f"ssdlite/{variant}"], 3)}
            for variant in ("ort_fp32", "ort_int8")}


def run(
    files: Sequence[str],
    onnx_dir: str = "models/deploy",
    pruned: Sequence[str] = ("ssdlite_voc", "ssdlite_voc-pruned"),
    lstm: Sequence[str] = ("lstm_ir", "ssdlite_ir"),
    threads: Sequence[int] = (1, 2),
    batch: int = 16,
    repeats: int = 30,
    throughput_repeats: int = 5,
    warmup: int = 5,
    camera_rounds: int = 8,
    camera_block: int = 20,
    source_image: str | None = None,
    postprocess: PostprocessConfig = PostprocessConfig(score_threshold=0.3),
    source_size: Sequence[int] = (640, 480),
    jpeg_quality: int = 90,
) -> dict[str, Any]:
    """The figures of the module docstring; ``pruned``: (unpruned, pruned) stems, ``lstm``: (LSTM-SSD,
    its SSDLite) stems, each pair compared when both are among ``files``. The frame: ``source_image``,
    else a synthetic one of ``source_size`` (width, height) and ``jpeg_quality``, as the models section's."""
    jpeg, width, height = source_jpeg(source_image, source_size, jpeg_quality)
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    per_threads: dict[str, Any] = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            cv2.setNumThreads(t)
            models = {Path(f).stem: runtimes(f, onnx_dir, t, postprocess) for f in files}
            figures: dict[str, Any] = {}
            for stem, rts in models.items():
                latency = alternate(rts, jpeg, 1, repeats, warmup, postprocess)
                rate = alternate(rts, jpeg, batch, throughput_repeats, warmup, postprocess)
                figures[stem] = {rt: {"latency_ms": latency[rt],
                                      "post_share": round(latency[rt]["post"] / latency[rt]["total"], 4),
                                      "images_per_s": round(batch / rate[rt]["total"] * 1e3, 2)} for rt in rts}
            entry: dict[str, Any] = {"models": figures}
            loops = {stem: camera_loop(rts["ort_int8"], rts[DETECT], jpeg, camera_rounds, camera_block, warmup,
                                       postprocess) for stem, rts in models.items() if DETECT in rts}
            if loops:
                entry["camera_loop"] = loops
            if lstm[0] in models and lstm[1] in models:
                size = int(models[lstm[0]]["ort_fp32"].image_size)
                entry["lstm_vs_ssdlite"] = streaming_ratio(models[lstm[0]], models[lstm[1]], size, repeats, warmup)
            per_threads[f"threads_{t}"] = entry
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    return {**headline(per_threads[f"threads_{threads[0]}"], pruned, lstm), "source_size": f"{width}x{height}",
            "batch": batch, **per_threads}


def headline(entry: dict[str, Any], pruned: Sequence[str], lstm: Sequence[str]) -> dict[str, Any]:
    """The ratios of the module docstring from one thread count's figures."""
    figures = entry["models"]
    out: dict[str, Any] = {}
    forward = {stem: {rt: f["latency_ms"]["forward"] for rt, f in rts.items()} for stem, rts in figures.items()}
    if pruned[0] in forward and pruned[1] in forward:
        big, small = forward[pruned[0]], forward[pruned[1]]
        out["pruned_speedup"] = {rt: round(big[rt] / small[rt], 3) for rt in RUNTIMES}
        fastest = min(RUNTIMES, key=lambda rt: big[rt] + small[rt])
        out["pruned_speedup_fastest"] = out["pruned_speedup"][fastest]
        out["fastest_runtime"] = fastest
    first = pruned[0] if pruned[0] in forward else next(iter(forward))
    out["int8_vs_eager"] = round(forward[first]["eager"] / forward[first]["ort_int8"], 3)
    out["int8_vs_eager_end_to_end"] = round(figures[first]["eager"]["latency_ms"]["total"]
                                            / figures[first]["ort_int8"]["latency_ms"]["total"], 3)
    if "lstm_vs_ssdlite" in entry:
        out["lstm_vs_ssdlite"] = {v: r["ratio"] for v, r in entry["lstm_vs_ssdlite"].items()}
    loops = entry.get("camera_loop", {})
    out["post_share"] = {stem: loop["post_share"] for stem, loop in loops.items()}
    out["post_share_python"] = {stem: loop["post_share_python"] for stem, loop in loops.items()}
    out["post_share_interleaved"] = {stem: _interleaved_share(rts) for stem, rts in figures.items() if DETECT in rts}
    return out


def _graph_post_ms(detect: dict[str, float], raw: dict[str, float]) -> float:
    """The detector graph's post-processing (ms): its forward over the raw int8 graph's, plus
    splitting its outputs per image; ``detect`` and ``raw`` are the two's :func:`_ms` parts."""
    return max(detect["forward"] - raw["forward"], 0.0) + detect["post"]


def _interleaved_share(rts: dict[str, Any]) -> float:
    """The detector graph's post-processing share in :func:`alternate`'s loop (caches left cold by
    the other runtimes)."""
    detect = rts[DETECT]["latency_ms"]
    return round(_graph_post_ms(detect, rts["ort_int8"]["latency_ms"]) / detect["total"], 4)
