"""The training stage's configuration: one ``train*`` section of ``params.yaml``.

Parsed by :func:`pipeline.config.load_config` into the frozen :class:`TrainConfig`
(unknown keys and wrong types are one-line errors). Which of these keys may change when
an interrupted run resumes is declared in :data:`pipeline.resume.RESUME_SAFE`.
"""

from __future__ import annotations


from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pipeline.config import InputPath, check_run_name, to_dict
from ssd.bounds import AtLeast, Count, NonEmpty, PositiveFloat, PositiveInt, Seed, Unique
from ssd.data.transforms import AugmentConfig
from ssd.distill import DistillWeights
from ssd.ema import EmaConfig
from ssd.loss import LossConfig
from ssd.optim import OptimConfig
from ssd.postprocess import PostprocessConfig

ValidationMode = Literal["auto", "frames", "video", "per_frame"]


@dataclass(frozen=True)
class PriorsParams:
    min_sizes: tuple[float, ...]
    """Smallest square per map, in input pixels (must fit the smallest objects)."""
    max_sizes: tuple[float, ...] | None = None
    """Second square per map has side sqrt(min * max); null: none."""
    aspect_ratios: tuple[tuple[float, ...], ...] = ()
    """Per map, ratios >= 1 (each r > 1 adds r:1 and 1:r)."""
    steps: tuple[float, ...] | None = None
    """Centre spacing per map in pixels; null: input size / map size."""
    offset: float = 0.5
    clip: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["ssdlite_mobilenet_v2", "ssd300_vgg16", "lstm_ssd_mobilenet_v2",
                  "ssdlite_mobilenet_v3_large", "lstm_ssd_mobilenet_v3_large"] = "ssdlite_mobilenet_v2"
    """Architecture (builder in ssd.models); LSTM-SSD trains on clips (data.kind: clips)."""
    image_size: Annotated[int, AtLeast(32)] = 300
    """Square input side in pixels."""
    width_mult: PositiveFloat = 1.0
    """MobileNet width multiplier (SSDLite and LSTM-SSD only)."""
    reduced_tail: bool = True
    """MobileNetV3 only: halve the last stage's channels (torchvision's COCO SSDLite320 does)."""
    extra_channels: tuple[PositiveInt, ...] | None = None
    """SSDLite extra-layer widths; null: 512/256/256/128 x width_mult."""
    taps: Annotated[tuple[int, ...], NonEmpty(), Unique()] = (13, 17)
    """MobileNetV2 blocks whose outputs are maps (ssds.pytorch: 13, 17; add 6 for a stride-8 map);
    MobileNetV3 has its two maps fixed."""
    placement: Annotated[tuple[str, ...], NonEmpty(), Unique()] = ("backbone",)
    """LSTM-SSD: where the ConvLSTM cells go: backbone (the paper: after the stride-16 map), extras,
    stride8 (on the stride-8 map, tap 6: every later map sees the memory)."""
    state_reduction: PositiveInt = 1
    """LSTM-SSD: state channels = map channels / state_reduction."""
    residual: bool = False
    """LSTM-SSD: cells add a zero-initialised output to their map (start equal to SSDLite)
    instead of replacing it (the paper)."""
    priors: PriorsParams | None = None
    """Prior layout; null: the architecture's reference layout scaled to image_size."""
    backbone_weights: InputPath | None = None
    """torchvision backbone state dict on disk (never downloaded); null: random init."""
    from_file: InputPath | None = None
    """Start from the whole model in this model file (its architecture, pruned widths included,
    and its weights), e.g. to fine-tune a pruned model; the keys above are then the file's: one
    set to other than its default that disagrees with the file is an error."""
    init_weights: InputPath | None = None
    """Copy the same-named, same-shaped weights of this model file into the model built from
    the keys above (e.g. a trained SSDLite into LSTM-SSD, or a converted COCO model into one for
    your classes: the class layers start fresh). The model takes the file's input convention."""

    def arch(self, num_classes: int) -> dict[str, Any]:
        """The builder arguments (what model files store)."""
        arch: dict[str, Any] = {"name": self.name, "num_classes": num_classes, "image_size": self.image_size}
        if self.name in ("ssdlite_mobilenet_v2", "lstm_ssd_mobilenet_v2"):
            arch["taps"] = list(self.taps)
        if self.name in ("ssdlite_mobilenet_v3_large", "lstm_ssd_mobilenet_v3_large"):
            arch["reduced_tail"] = self.reduced_tail
        if self.name != "ssd300_vgg16":
            arch["width_mult"] = self.width_mult
            if self.extra_channels is not None:
                arch["extra_channels"] = list(self.extra_channels)
        if self.name.startswith("lstm_ssd"):
            arch["placement"] = list(self.placement)
            arch["state_reduction"] = self.state_reduction
            if self.residual:
                arch["residual"] = True
        if self.priors is not None:
            arch["priors"] = to_dict(self.priors)
        return arch

    def ignored_keys(self) -> dict[str, str]:
        """The keys this architecture does not read, with why (given ones are refused, never ignored)."""
        reads = {
            "taps": ("MobileNetV2 models", self.name in ("ssdlite_mobilenet_v2", "lstm_ssd_mobilenet_v2")),
            "reduced_tail": ("MobileNetV3 models", self.name.endswith("mobilenet_v3_large")),
            "width_mult": ("MobileNet models", self.name != "ssd300_vgg16"),
            "extra_channels": ("SSDLite and LSTM-SSD models", self.name != "ssd300_vgg16"),
        }
        reads.update({k: ("LSTM-SSD models", self.name.startswith("lstm_ssd"))
                      for k in ("placement", "state_reduction", "residual")})
        return {k: f"only {who} read it (model.name is {self.name})" for k, (who, read) in reads.items() if not read}

    def __post_init__(self) -> None:
        ignored = [k for k in ("init_weights", "backbone_weights") if self.from_file and getattr(self, k)]
        if ignored:
            raise ValueError(f"from_file loads the whole model; {' and '.join(ignored)} would be ignored: give one")
        if self.init_weights and self.backbone_weights:
            raise ValueError("init_weights loads the backbone too, over backbone_weights: give one")


@dataclass(frozen=True)
class DataConfig:
    shards: InputPath = "data/shards/voc"
    """Directory with manifest.json and the {split}-NNNNNN.tar shards."""
    split: str = "train"
    """Which split of the manifest to train on."""
    kind: Literal["frames", "clips", "frames_from_clips"] = "frames"
    """frames: frame shards; frames_from_clips: every frame of clip shards (per-frame baseline)."""
    batch_size: PositiveInt = 16
    """Samples per process per micro-batch."""
    num_workers: Count = 2
    """Loader worker processes per training process (0: load in the training process)."""
    streams: PositiveInt = 2
    """Independent sample streams per process; fixed so that the data order doesn't depend on
    num_workers (which must divide it)."""
    shuffle_buffer: PositiveInt = 256
    """Samples held per stream for shuffling."""
    sequence_clips: Count = 0
    """LSTM-SSD on clips: carry the detached state from each clip to the next clip of its
    video (truncated backpropagation through time). Each batch position then walks through
    runs of up to this many consecutive clips of one video, augmented alike; 0: every clip
    starts from a zero state."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.sequence_clips and self.kind != "clips":
            raise ValueError(f"sequence_clips carries an LSTM state between clips: it needs kind 'clips', not {self.kind!r}")


@dataclass(frozen=True)
class ValidationConfig:
    every: Count = 0
    """Steps between validations, plus one at the end; 0: no validation (and no best model)."""
    split: str = "val"
    """The split of data.shards validated on."""
    modes: Annotated[tuple[ValidationMode, ...], NonEmpty(), Unique()] = ("auto",)
    """Evaluation modes (the evaluate stage's): the first picks the best model, the others are
    logged beside it (LSTM-SSD: [video, per_frame], its memory on and off). auto: frames on frame
    shards; on clip shards video for LSTM-SSD, per_frame for the others."""
    metric: Literal["voc07", "voc2010"] = "voc07"
    """The VOC mAP that is logged and picks the best model."""
    patience: Count = 0
    """Stop after this many validations without a better mAP; 0: never stop early."""
    batch_size: PositiveInt = 16
    """Images per forward pass and process (video mode feeds one frame at a time)."""
    num_workers: Count = 1
    """Loader worker processes per process while validating."""
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    """Detections kept for the mAP (the evaluate stage's default: score 0.01, 200 per image)."""

    def __post_init__(self) -> None:
        if self.patience and not self.every:
            raise ValueError(f"patience {self.patience} needs validations (every > 0); it would be ignored")


@dataclass(frozen=True)
class DistillConfig(DistillWeights):
    teacher: InputPath | None = None
    """A model file to learn from besides the labels (:mod:`ssd.distill`): same classes and priors
    as the model trained, a frame model; null: no distillation. The prune stage sets it to its
    fine-tuned control (or to the model it pruned)."""


@dataclass(frozen=True)
class TrainConfig:
    name: str = "ssdlite"
    """Run name: names the model file, metrics, plots, logs and checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    """Exponential moving average of the weights: validation and the model file use it."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    steps: PositiveInt = 1000
    """Optimiser steps in the whole run."""
    seed: Seed = 0
    """Seeds the model initialisation and the data order and augmentation."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Through Accelerate; null: Accelerate's choice (accelerate config, accelerate launch
    --mixed_precision, ACCELERATE_MIXED_PRECISION; none of them: full precision). fp16 needs a GPU."""
    tf32: bool = True
    """float32 matmuls and convolutions in TF32 on NVIDIA Ampere and later GPUs (tensor cores,
    10-bit mantissa); no effect on CPUs, older GPUs or with bf16/fp16. false: IEEE float32."""
    channels_last: bool = False
    """Model and images in NHWC memory order (``torch.channels_last``): what tensor-core
    convolutions want with bf16/fp16; measured, not assumed, by the GPU check (docs/gpu.md). On a
    CPU it makes a SSDLite step 0.7-0.8x as long but is not the same arithmetic: torch's CPU batch
    norm in NHWC is 10-30x less exact in training (docs/training.md), and the sample's VOC run
    ended 3.7 points lower with it, so the CPU recipes leave it off."""
    compile: str | None = None
    """A torch.compile backend, through Accelerate ("inductor"; null: the launcher's
    --dynamo_backend, else none). The first steps are slow while it compiles."""
    checkpoint_every: PositiveInt = 200
    """Steps between checkpoints (what a run killed without notice falls back to)."""
    keep_last: PositiveInt = 2
    """Complete checkpoints kept while the run is unfinished."""
    keep_checkpoints: bool = False
    """Keep the checkpoints once the run has finished."""
    log_every: PositiveInt = 10
    """Steps between log lines, TensorBoard points and plot rows."""
    freeze_backbone_steps: Count = 0
    """Hold the backbone still for the first steps (LSTM-SSD's stage-wise training from SSDLite):
    its weights and its batch norm's running statistics."""
    frozen_batchnorm: bool = False
    """Batch norm uses and keeps its running statistics (eval mode) instead of each batch's:
    for fine-tuning a trained model on batches of few, correlated samples (LSTM-SSD's clips:
    4 clips x 8 frames hold only 4 scenes, whose statistics are not the data's)."""
    max_nonfinite: Count = 5
    """Consecutive steps with a non-finite loss (each skipped) before the run stops."""
    trace: bool = False
    """Debug: write each process's sample keys and weight checksum per step to runs/{name}/trace-rankN.jsonl."""
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"

    def __post_init__(self) -> None:
        check_run_name(self.name, "name")


@dataclass
class RunPaths:
    model: Path
    best_model: Path
    metrics: Path
    plots: Path
    val_plots: Path
    logs: Path
    checkpoints: Path

    @classmethod
    def of(cls, cfg: TrainConfig) -> "RunPaths":
        return cls(
            model=Path(cfg.models_dir) / f"{cfg.name}.pt",
            best_model=Path(cfg.models_dir) / f"{cfg.name}-best.pt",
            metrics=Path(cfg.metrics_dir) / f"train-{cfg.name}.json",
            plots=Path(cfg.plots_dir) / f"train-{cfg.name}.csv",
            val_plots=Path(cfg.plots_dir) / f"val-{cfg.name}.csv",
            logs=Path(cfg.runs_dir) / cfg.name,
            checkpoints=Path(cfg.checkpoints_dir) / cfg.name,
        )


