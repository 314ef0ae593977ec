"""Benchmark stage: the project's speed figures, measured and collected in one place.

Usage::

    python -m pipeline.benchmark [--params params.yaml] [--only models,postprocess,...] [--out FILE] [--set key=value ...]

Sections (``sections`` of the ``benchmark`` params, or ``--only``), each a module of
:mod:`pipeline.bench` with a ``run(**settings) -> dict``:

- ``models`` (:mod:`pipeline.bench.models`): for every listed model file, batch-1 latency
  split into pre-processing, forward and post-processing (a temporal model: per-frame
  streaming latency), throughput at a larger batch, parameters and multiply-adds; the
  torchvision SSDLite peer at the same input size; LSTM-SSD against SSDLite;
- ``postprocess`` (:mod:`pipeline.bench.postprocess`): our post-processing against torchvision's;
- ``loader`` (:mod:`pipeline.bench.loader`): training-loader throughput from the shards;
- ``train_step`` (:mod:`pipeline.bench.train_step`): a full training step against forward + backward;
- ``convert`` (:mod:`pipeline.bench.convert`): the ``prepare`` stage's throughput per worker (frames
  and video) and its peak memory converting 1 and many videos;
- ``deployed`` (:mod:`pipeline.bench.deployed`): each model in PyTorch eager, ONNX Runtime float
  and int8 (the deploy stage's graphs), alternately: batch-1 latency parts, throughput, at 1 and 2
  threads; pruned against unpruned, int8 against eager, LSTM-SSD against SSDLite.

Outputs: ``out`` (``metrics/benchmark.json``, for ``dvc metrics diff``): measurements only
(timings, ratios, sizes, counts): the headline figures (``postprocess_share.<model>``: post-processing over
end-to-end latency at batch 1; ``lstm_vs_ssdlite_latency_ratio``: the first LSTM-SSD's
streaming forward over its SSDLite's forward; ``peer_ratio``: our end-to-end latency over
torchvision's SSDLite's), then ``models``, ``peer``, ``lstm_vs_ssdlite`` and one entry per
other section (``postprocess``, ``loader``, ``train_step``, ``convert``); ``setup``
(``reports/benchmark-setup.json``): how they were measured, in the same nesting: the device,
torch version and threads, each model's file, architecture and mode, batch sizes, thresholds
(:func:`split_setup`); ``chart``
(``reports/benchmark.png``, when ``models`` ran): a stacked bar per model of its
latency parts, and the peer.

Figures are timings of the machine that runs the stage; a benchmark is never a test and
no timing is asserted anywhere. A listed model file that does not exist is a one-line
error (exit code 2), before anything is timed.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import cv2
import numpy as np
import torch

from ssd import atomic
from ssd.postprocess import PostprocessConfig
from pipeline.config import ConfigError, load_config, load_params, to_dict
from pipeline.stage import StageError, arg_parser, check_writable, run
from ssd.data.shards import list_shards
from ssd.model_file import ModelFileError, read_model_file

log = logging.getLogger("pipeline.benchmark")


def _positive(where: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"benchmark.{where}.{key}: must be at least 1, got {value}")


@dataclass(frozen=True)
class ModelsBench:
    files: tuple[str, ...] = (
        "models/ssdlite_voc.pt",
        "models/ssdlite_voc-pruned.pt",
        "models/ssdlite_ir.pt",
        "models/lstm_ir.pt",
    )
    """Model files to time (every one must exist); named in the JSON by their stems."""
    batch: int = 16
    """Frames per call for the throughput figure (a temporal model: parallel streams)."""
    repeats: int = 20
    """Timed batch-1 runs; medians are reported."""
    throughput_repeats: int = 5
    """Timed runs at ``batch``: a batch takes 10-20x a frame's time, so fewer."""
    warmup: int = 3
    """Untimed runs first (allocator, kernel selection, CUDA start-up)."""
    source_size: tuple[int, int] = (640, 480)
    """Width and height of the JPEG frame that pre-processing decodes (a typical camera frame)."""
    jpeg_quality: int = 90
    """Quality of the synthetic frame."""
    source_image: str | None = None
    """A JPEG file to decode instead of the synthetic frame (e.g. a frame of the data set: a
    trained model's post-processing has less to sift on frames like those it was trained on)."""
    peer: bool = True
    """Also time torchvision's ssdlite320_mobilenet_v3_large at the first frame model's input size."""
    postprocess: PostprocessConfig = field(default_factory=lambda: PostprocessConfig(score_threshold=0.3))
    """Post-processing of the latency and throughput figures: a deployed detector's (pipeline/detect.py's
    defaults: scores from 0.3). The evaluation's (0.01) is timed too, as ``post_eval_config_ms``:
    it hands NMS thousands of candidates per frame, to score the full precision-recall curve."""

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError("benchmark.models.files: list at least one model file")
        _positive("models", batch=self.batch, repeats=self.repeats, throughput_repeats=self.throughput_repeats,
                  width=self.source_size[0], height=self.source_size[1])  # fmt: skip
        if self.warmup < 0:
            raise ConfigError(f"benchmark.models.warmup: must not be negative, got {self.warmup}")


@dataclass(frozen=True)
class PostprocessBench:
    batch: int = 8
    """Images per call (the issue's 8 x 2,990 priors x 21 classes)."""
    num_classes: int = 21
    """Classes including the background (VOC: 21)."""
    repeat: int = 20
    """Timed calls per measurement; the median is reported."""


@dataclass(frozen=True)
class LoaderBench:
    shards: str = "data/shards/voc"
    """Directory of *.tar shards read by the training loader."""
    image_size: int = 160
    """Square training input (train_voc's model.image_size)."""
    batch_size: int = 16
    num_workers: int = 2
    """Loader worker processes."""
    num_batches: int = 10
    """Timed batches after the first (whose start-up is reported apart)."""
    voc_dir: str | None = None
    """A VOC-layout directory to compare loose JPEG + XML files with the shards; null: skip."""

    def __post_init__(self) -> None:
        _positive("loader", image_size=self.image_size, batch_size=self.batch_size, num_batches=self.num_batches)


@dataclass(frozen=True)
class TrainStepBench:
    model: str = "models/ssdlite_voc.pt"
    """Model file whose arch is trained (a frame model; its weights are not used)."""
    shards: str = "data/shards/voc"
    """Frame shards of the model's classes."""
    split: str = "train"
    batch_size: int = 16
    num_workers: int = 2
    steps: int = 5
    """Timed steps of each kind; the median is reported."""
    warmup: int = 2
    """Untimed steps first."""

    def __post_init__(self) -> None:
        _positive("train_step", batch_size=self.batch_size, steps=self.steps)


@dataclass(frozen=True)
class ConvertBench:
    voc_dir: str = "data/sample/voc"
    """A VOC-layout dataset converted to frame shards (images per second, one worker)."""
    videos: int = 8
    """Synthetic videos converted to clip shards, after one alone: throughput and peak memory of both."""
    frames: int = 150
    """Frames per synthetic video."""
    size: tuple[int, int] = (320, 240)
    """Width and height of the synthetic videos."""

    def __post_init__(self) -> None:
        _positive("convert", videos=self.videos, width=self.size[0], height=self.size[1])
        if self.frames < 4:
            raise ConfigError(f"benchmark.convert.frames: at least 4 (one clip), got {self.frames}")


@dataclass(frozen=True)
class DeployedBench:
    files: tuple[str, ...] = (
        "models/ssdlite_voc.pt",
        "models/ssdlite_voc-pruned.pt",
        "models/ssdlite_ir.pt",
        "models/lstm_ir.pt",
    )
    """Model files timed in PyTorch; their graphs are {onnx_dir}/{stem}.onnx and {stem}-int8.onnx."""
    onnx_dir: str = "models/deploy"
    """The deploy stage's out_dir."""
    pruned: tuple[str, str] = ("ssdlite_voc", "ssdlite_voc-pruned")
    """(unpruned, pruned) stems for the pruned_speedup ratios."""
    lstm: tuple[str, str] = ("lstm_ir", "ssdlite_ir")
    """(LSTM-SSD, the SSDLite it is built on) stems for lstm_vs_ssdlite."""
    threads: tuple[int, ...] = (1, 2)
    """Thread counts (torch and ONNX Runtime); the headline ratios are the first one's."""
    batch: int = 16
    repeats: int = 30
    throughput_repeats: int = 5
    warmup: int = 5

    def __post_init__(self) -> None:
        if not self.files or not self.threads:
            raise ConfigError("benchmark.deployed: list at least one model file and one thread count")
        _positive("deployed", batch=self.batch, repeats=self.repeats, throughput_repeats=self.throughput_repeats,
                  **{f"threads[{i}]": t for i, t in enumerate(self.threads)})


@dataclass(frozen=True)
class BenchmarkConfig:
    sections: tuple[str, ...] = ("models", "postprocess", "loader", "train_step", "convert")
    """Which benchmarks to run, in order."""
    out: str = "metrics/benchmark.json"
    """Where the JSON goes."""
    setup: str = "reports/benchmark-setup.json"
    """Where the description of the measurements goes (device, files, batch sizes, thresholds)."""
    chart: str = "reports/benchmark.png"
    """Where the latency chart goes (written when the models section runs)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models and training steps run; auto: CUDA when available. Loaders run on the CPU."""
    threads: int = 0
    """torch (and OpenCV) CPU threads; 0 keeps the libraries' defaults."""
    models: ModelsBench = field(default_factory=ModelsBench)
    postprocess: PostprocessBench = field(default_factory=PostprocessBench)
    loader: LoaderBench = field(default_factory=LoaderBench)
    train_step: TrainStepBench = field(default_factory=TrainStepBench)
    convert: ConvertBench = field(default_factory=ConvertBench)
    deployed: DeployedBench = field(default_factory=DeployedBench)


Section = Callable[[BenchmarkConfig, str], dict[str, Any]]


def _models(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import models

    settings = {**to_dict(cfg.models), "postprocess": cfg.models.postprocess}
    try:
        return models.run(device=device, **settings)
    except ModelFileError as e:
        raise StageError(str(e)) from None


def _postprocess(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import postprocess

    return {"postprocess": postprocess.run(**to_dict(cfg.postprocess))}


def _loader(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import loader

    c = cfg.loader
    return {"loader": loader.run(c.shards, c.image_size, c.batch_size, c.num_workers, c.num_batches, c.voc_dir)}


def _train_step(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import train_step

    c = cfg.train_step
    try:
        arch = read_model_file(c.model)["arch"]
    except ModelFileError as e:
        raise StageError(str(e)) from None
    if "placement" in arch:  # an LSTM-SSD arch: its step needs clips, this benchmark feeds frames
        raise StageError(f"{c.model}: benchmark.train_step needs a frame model (SSD/SSDLite), not {arch.get('name')}")
    shards = [str(p) for p in list_shards(c.shards, c.split)]
    figures = train_step.run(
        shards, arch["num_classes"], arch, batch_size=c.batch_size, num_workers=c.num_workers, steps=c.steps,
        warmup=c.warmup, device=device,
    )  # fmt: skip
    return {"train_step": {"model": Path(c.model).stem, **figures}}


def _convert(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import convert

    c = cfg.convert
    return {"convert": convert.run(c.voc_dir, c.videos, c.frames, c.size)}


def _deployed(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import deployed

    if device != "cpu":
        raise StageError("benchmark.deployed times ONNX Runtime on the CPU: run it with benchmark.device cpu")
    c = cfg.deployed
    return {"deployed": deployed.run(**to_dict(c), source_image=cfg.models.source_image,
                                     postprocess=cfg.models.postprocess)}


SECTIONS: dict[str, Section] = {
    "models": _models,
    "postprocess": _postprocess,
    "loader": _loader,
    "train_step": _train_step,
    "convert": _convert,
    "deployed": _deployed,
}


def check_inputs(cfg: BenchmarkConfig, names: list[str]) -> None:
    """Every file the chosen sections read exists: one-line :class:`StageError` otherwise, before any timing."""
    if "models" in names:
        for f in cfg.models.files:
            if not Path(f).is_file():
                raise StageError(f"{f}: model file not found (listed in benchmark.models.files)")
        image = cfg.models.source_image
        if image is not None:
            if not Path(image).is_file():
                raise StageError(f"{image}: image not found (benchmark.models.source_image)")
            if cv2.imdecode(np.fromfile(image, np.uint8), cv2.IMREAD_COLOR) is None:
                raise StageError(f"{image}: not an image OpenCV can decode (benchmark.models.source_image)")
        stems = [Path(f).stem for f in cfg.models.files]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise StageError(f"benchmark.models.files: two files named {repeated[0]!r}; the JSON names models by file stem")
    if "loader" in names and not list(Path(cfg.loader.shards).glob("*.tar")):
        raise StageError(f"{cfg.loader.shards}: no .tar shards (benchmark.loader.shards)")
    if "train_step" in names:
        if not Path(cfg.train_step.model).is_file():
            raise StageError(f"{cfg.train_step.model}: model file not found (benchmark.train_step.model)")
        if not Path(cfg.train_step.shards).is_dir() or not list_shards(cfg.train_step.shards, cfg.train_step.split):
            raise StageError(f"{cfg.train_step.shards}: no {cfg.train_step.split} shards (benchmark.train_step.shards)")
    if "deployed" in names:
        for f in cfg.deployed.files:
            stem = Path(f).stem
            if not Path(f).is_file():
                raise StageError(f"{f}: model file not found (listed in benchmark.deployed.files)")
            for name, what in ((f"{stem}.onnx", "float"), (f"{stem}-int8.onnx", "int8")):
                if not (Path(cfg.deployed.onnx_dir) / name).is_file():
                    raise StageError(f"{Path(cfg.deployed.onnx_dir) / name}: {what} graph not found (benchmark.deployed."
                                     "onnx_dir: the deploy stage writes it)")
    if "convert" in names and not (Path(cfg.convert.voc_dir) / "Annotations").is_dir():
        raise StageError(f"{cfg.convert.voc_dir}: no VOC-layout dataset (benchmark.convert.voc_dir)")


def benchmark(cfg: BenchmarkConfig, names: list[str]) -> dict[str, Any]:
    """Run the sections ``names``; the JSON's content (device first, then each section's figures)."""
    device = _resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        cv2.setNumThreads(cfg.threads)
    result: dict[str, Any] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for name in names:
        log.info("benchmark %s ...", name)
        t0 = time.perf_counter()
        result.update(SECTIONS[name](cfg, device))
        log.info("benchmark %s done in %.1f s", name, time.perf_counter() - t0)
    return result


#: Numbers that say how something was measured, not what was measured: with the texts (device,
#: file names, modes), they go to the setup file, so `dvc metrics diff` compares measurements only.
SETUP_NUMBERS = frozenset({
    "threads", "batch", "batch_size", "image_size", "width_mult", "num_classes", "num_priors", "num_batches",
    "num_workers", "score_threshold", "nms_threshold", "top_k", "max_detections",
})


def split_setup(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, setup)`` of a benchmark result, both in its nesting: strings and the
    :data:`SETUP_NUMBERS` keys go to ``setup``, every other value (timings, ratios, costs, counts,
    checks) to ``metrics``. Sections left empty on one side are dropped from it."""
    metrics: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            m, s = split_setup(value)
            if m:
                metrics[key] = m
            if s:
                setup[key] = s
        elif isinstance(value, str) or key in SETUP_NUMBERS:
            setup[key] = value
        else:
            metrics[key] = value
    return metrics, setup


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", help="comma-separated sections to run (default: the params' sections)")
    parser.add_argument("--out", help="output JSON path (default: the params' out)")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load_config(BenchmarkConfig, load_params(args.params), "benchmark", args.overrides, args.params)
        names = args.only.split(",") if args.only else list(cfg.sections)
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            raise StageError(f"unknown benchmark section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        check_inputs(cfg, names)
        out = args.out or cfg.out
        check_writable(Path(out).parent, Path(cfg.setup).parent)
        result = benchmark(cfg, names)
        metrics, setup = split_setup(result)
        atomic.write_json(cfg.setup, setup)
        atomic.write_json(out, metrics)
        log.info("wrote %s and %s", out, cfg.setup)
        if "models" in result:
            from pipeline.bench.chart import latency_chart

            title = f"{result['device']}, {result['threads']} thread(s), {result['source_size']} JPEG frames"
            atomic.write_bytes(cfg.chart, latency_chart(result["models"], result.get("peer"), title))
            log.info("wrote %s", cfg.chart)
        return 0

    return run(body)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("benchmark.device is cuda, but no CUDA device is available")
    return device


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    raise SystemExit(main())
