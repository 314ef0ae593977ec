"""The benchmark stage's configuration: one frozen dataclass per section, and the whole.

:mod:`pipeline.benchmark` parses the ``benchmark`` section of params.yaml into
:class:`BenchmarkConfig`; the sections are described there and in :mod:`pipeline.bench`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ConfigError, InputPath
from ssd.postprocess import PostprocessConfig


def _positive(where: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"benchmark.{where}.{key}: must be at least 1, got {value}")


def _not_negative(where: str, **values: int) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"benchmark.{where}.{key}: must not be negative, got {value}")


@dataclass(frozen=True)
class ModelsBench:
    files: tuple[InputPath, ...] = (
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
    source_image: InputPath | None = None
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

    def __post_init__(self) -> None:
        _positive("postprocess", batch=self.batch, repeat=self.repeat)
        if self.num_classes < 2:
            raise ConfigError("benchmark.postprocess.num_classes: the background and at least one class, "
                              f"got {self.num_classes}")


@dataclass(frozen=True)
class LoaderBench:
    shards: InputPath = "data/shards/voc"
    """Directory of *.tar shards read by the training loader."""
    image_size: int = 160
    """Square training input (train_voc's model.image_size)."""
    batch_size: int = 16
    num_workers: int = 2
    """Loader worker processes."""
    num_batches: int = 10
    """Timed batches after the first (whose start-up is reported apart)."""
    voc_dir: InputPath | None = None
    """A VOC-layout directory to compare loose JPEG + XML files with the shards; null: skip."""

    def __post_init__(self) -> None:
        _positive("loader", image_size=self.image_size, batch_size=self.batch_size, num_batches=self.num_batches)
        _not_negative("loader", num_workers=self.num_workers)


@dataclass(frozen=True)
class TrainStepBench:
    model: InputPath = "models/ssdlite_voc.pt"
    """Model file whose arch is trained (a frame model; its weights are not used)."""
    shards: InputPath = "data/shards/voc"
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
        _not_negative("train_step", num_workers=self.num_workers, warmup=self.warmup)


@dataclass(frozen=True)
class ConvertBench:
    voc_dir: InputPath = "data/sample/voc"
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
    files: tuple[InputPath, ...] = (
        "models/ssdlite_voc.pt",
        "models/ssdlite_voc-pruned.pt",
        "models/ssdlite_ir.pt",
        "models/lstm_ir.pt",
    )
    """Model files timed in PyTorch; their graphs are {onnx_dir}/{stem}.onnx and {stem}-int8.onnx."""
    onnx_dir: InputPath = "models/deploy"
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
    camera_rounds: int = 8
    """The deployed detector's camera loop: rounds of one block of each variant (pipeline.bench.deployed)."""
    camera_block: int = 20
    """Consecutive frames per block (timed; after ``warmup`` untimed ones)."""

    def __post_init__(self) -> None:
        if not self.files or not self.threads:
            raise ConfigError("benchmark.deployed: list at least one model file and one thread count")
        _positive("deployed", batch=self.batch, repeats=self.repeats, throughput_repeats=self.throughput_repeats,
                  camera_rounds=self.camera_rounds, camera_block=self.camera_block,
                  **{f"threads[{i}]": t for i, t in enumerate(self.threads)})


@dataclass(frozen=True)
class FeedBench:
    source_size: tuple[int, int] = (500, 375)
    """Width and height of the synthetic photo-like JPEGs (the Pascal VOC median)."""
    image_size: int = 300
    """Training input (SSD300)."""
    samples: int = 64
    repeats: int = 3
    """Passes over the samples; the median rate is reported."""
    gpu_rates: dict[str, float] = field(default_factory=lambda: {"nvidia_ssd300_a100_amp_bs64": 663.0})
    """GPU training rates (images/s) to size the workers for: NVIDIA's published SSD300 v1.1 on one A100."""

    def __post_init__(self) -> None:
        _positive("feed", image_size=self.image_size, samples=self.samples, repeats=self.repeats,
                  width=self.source_size[0], height=self.source_size[1])


@dataclass(frozen=True)
class GpuBench:
    """The GPU check (``scripts/gpu_check.sh``, :mod:`pipeline.bench.gpu`); not in the CPU ``dvc repro``."""

    models: tuple[str, ...] = ("ssd300_vgg16", "ssdlite_mobilenet_v2")
    """Our models (SSD300 at 300 px, SSDLite at 320 px), each against torchvision's of its family."""
    precisions: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
    batches: tuple[int, ...] = (32, 64)
    steps: int = 10
    """Timed steps (alternately ours and torchvision's); medians."""
    warmup: int = 3
    option_precision: str = "bf16"
    """channels_last and torch.compile are measured at this precision and the largest batch."""
    compile_backend: str = "inductor"
    loop: tuple[tuple[str, str, int], ...] = (("ssd300_vgg16", "bf16", 64), ("ssdlite_mobilenet_v2", "bf16", 64))
    """(model, precision, batch) runs of the real training stage from the shards."""
    loop_colour: tuple[Literal["worker", "device"], ...] = ("worker", "device")
    """Each loop run with the colour change made by the loader workers (SSD's augmentation) and
    left to the device (``data.augment.photometric_device``)."""
    loop_steps: int = 40
    shards: InputPath = "data/shards/voc"
    num_workers: int = 8
    """Loader workers of the real training loop."""
    inference_batch: int = 64
    latency_repeats: int = 30
    time_limit_s: float = 320.0
    """Parts not started by then are left out (named in the JSON's ``skipped``)."""
    compile_limit_s: float = 100.0
    """torch.compile's part, per model, is stopped after this (named in ``failed``); it starts only
    with this much of ``time_limit_s`` left. On the first H200 run one compile ran past 4 minutes."""
    tests_junit: str | None = None
    """The CUDA tests' JUnit report to count in the JSON (the script passes it)."""
    partial: str | None = None
    """Rewritten before each part with the figures so far and the part under way (the script
    passes ``<out>-partial.json``): what a check killed at its limit measured."""
    dry_run: bool = False
    """On the CPU at the smallest sizes: proves the check runs; its figures say nothing about a GPU."""

    def __post_init__(self) -> None:
        from pipeline.bench.gpu_train import MODELS, PRECISIONS

        for name in self.models + tuple(run[0] for run in self.loop):
            if name not in MODELS:
                raise ConfigError(f"benchmark.gpu: unknown model {name!r}; known: {', '.join(MODELS)}")
        for precision in self.precisions + (self.option_precision,) + tuple(run[1] for run in self.loop):
            if precision not in PRECISIONS:
                raise ConfigError(f"benchmark.gpu: unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        _positive("gpu", steps=self.steps, warmup=self.warmup, loop_steps=self.loop_steps,
                  inference_batch=self.inference_batch, latency_repeats=self.latency_repeats,
                  time_limit_s=self.time_limit_s, compile_limit_s=self.compile_limit_s,
                  **{f"batches[{i}]": b for i, b in enumerate(self.batches)})


@dataclass(frozen=True)
class KernelsBench:
    """ONNX Runtime's convolution kernels by channel width (pipeline.bench.kernels; not in the CPU run's sections)."""

    kinds: tuple[str, ...] = ("depthwise", "pointwise")
    widths: tuple[int, ...] = (8, 16, 24, 32, 40, 48, 64, 96)
    size: int = 160
    """Input side: the sample SSDLite's block 2 sees 160x160 at a 320 px input, 80x80 at 160 px."""
    strides: tuple[int, ...] = (1, 2)
    repeats: int = 200
    warmup: int = 20

    def __post_init__(self) -> None:
        from pipeline.bench.kernels import KINDS

        for kind in self.kinds:
            if kind not in KINDS:
                raise ConfigError(f"benchmark.kernels: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if not self.kinds or not self.widths or not self.strides:
            raise ConfigError("benchmark.kernels: list at least one kind, one width and one stride")
        _positive("kernels", size=self.size, repeats=self.repeats, warmup=self.warmup,
                  **{f"widths[{i}]": w for i, w in enumerate(self.widths)},
                  **{f"strides[{i}]": s for i, s in enumerate(self.strides)})


@dataclass(frozen=True)
class BenchmarkConfig:
    sections: tuple[str, ...] = ("models", "postprocess", "loader", "train_step", "convert", "feed")
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
    feed: FeedBench = field(default_factory=FeedBench)
    gpu: GpuBench = field(default_factory=GpuBench)
    kernels: KernelsBench = field(default_factory=KernelsBench)
