"""The prune stage's configuration (:class:`PruneStageConfig`, a ``prune`` section of the params
file): what is pruned and how (:class:`ssd.pruning.PruneConfig`), the fine-tuning of the pruned
model and of its control (:class:`FinetuneConfig`), the evaluations and the latency timing.
The stage itself is :mod:`pipeline.prune`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import InputPath, check_run_name
from pipeline.train_config import DataConfig
from ssd.bounds import PositiveInt, Seed
from ssd.distill import DistillWeights
from ssd.loss import LossConfig
from ssd.optim import OptimConfig
from ssd.postprocess import PostprocessConfig
from ssd.pruning import PruneConfig


@dataclass(frozen=True)
class PruneDistill(DistillWeights):
    teacher: Literal["control", "source"] = "control"
    """control: the control once fine-tuned (needs ``control: true``; it is fine-tuned first, from
    the labels only); source: the model file that was pruned (the control learns from it too)."""


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 1000
    """Optimiser steps of fine-tuning after pruning (Li et al. retrain after the cut); 0: none,
    the pruned weights are the output."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to fine-tune on (shards, split, batch size, workers, augmentation), as in training."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=50))
    """A fifth of training's default learning rate: the weights are trained, only the damage of
    the cut needs repairing."""
    loss: LossConfig = field(default_factory=LossConfig)
    seed: Seed = 0
    """Seeds the data order and augmentation of the fine-tuning."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Through Accelerate; null: Accelerate's choice (as in training). fp16 needs a GPU."""
    channels_last: bool = False
    """Model and images in NHWC memory order, as the training key of that name (for GPUs; on a CPU
    it changes the batch norm's arithmetic, see that key)."""
    frozen_batchnorm: bool | None = None
    """Batch norm keeps its running statistics while fine-tuning, as the training key of that name;
    null: as the source model was trained (its file's ``meta.train_config``; false if it doesn't say).
    A model trained with frozen statistics (an LSTM-SSD on clips) lost them to the fine-tuning's
    small batches."""
    checkpoint_every: PositiveInt = 200
    """Steps between fine-tuning checkpoints (what a preempted run resumes from)."""
    log_every: PositiveInt = 10
    """Steps between log lines and plot rows."""
    distill: PruneDistill | None = None
    """Fine-tune the pruned model on the labels and on an unpruned teacher's outputs
    (:mod:`ssd.distill`: class distributions and boxes, prior for prior); null: labels only."""
    control: bool = True
    """Also fine-tune the *unpruned* model for the same steps with the same data, optimiser and
    seed, and report its mAP (``map_voc.control``): a model that has not plateaued gains from
    extra steps whether it was pruned or not, so only this comparison shows what pruning cost.
    false: half the fine-tuning time, and no fair baseline."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"finetune.steps must not be negative, got {self.steps}")
        if self.distill and self.distill.teacher == "control" and not self.control:
            raise ValueError("finetune.distill.teacher 'control' needs finetune.control: true (or teacher: source)")


@dataclass(frozen=True)
class EvalSettings:
    enabled: bool = True
    """Evaluate before pruning, after pruning and after fine-tuning; false: mAP is null."""
    shards: InputPath = "data/shards/voc"
    """Directory with manifest.json and the {split}-NNNNNN.tar shards (the model's classes)."""
    split: str = "val"
    mode: Literal["auto", "frames", "video", "per_frame"] = "auto"
    """As the evaluate stage's mode (auto: frames, or video for a temporal model on clips)."""
    batch_size: int = 16
    num_workers: int = 2
    """Loader worker processes (0: load in this process)."""
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    voc_metric: Literal["voc07", "voc2010"] = "voc07"
    """Which VOC AP is reported as map_voc."""


@dataclass(frozen=True)
class LatencyConfig:
    runs: int = 30
    """Timed forwards per model and batch size; the median is reported."""
    batch: int = 16
    """The larger batch timed besides batch 1 (throughput: per-layer overheads, which don't
    shrink with the channels, weigh less than at batch 1)."""
    warmup: int = 5
    """Untimed forwards first (allocator, kernel selection)."""
    threads: int = 0
    """torch CPU threads while timing; 0 keeps torch's default."""

    def __post_init__(self) -> None:
        if self.runs < 1 or self.batch < 1 or self.warmup < 0 or self.threads < 0:
            raise ValueError("latency: runs and batch must be at least 1, warmup and threads not negative")


@dataclass(frozen=True)
class PruneStageConfig:
    model: InputPath = "models/ssdlite_voc.pt"
    """The model file to prune (written by a train stage)."""
    name: str | None = None
    """Names the outputs; null: the model file's stem."""
    pruning: PruneConfig = field(default_factory=PruneConfig)
    """How many channels go and how they are chosen (ratio, mode, round_to, ignore, ...)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"

    def __post_init__(self) -> None:
        if self.name is not None:
            check_run_name(self.name, "name")
