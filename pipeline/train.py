"""Train a detector with Accelerate: one process, many GPUs, many machines, spot instances.

Usage::

    accelerate launch -m pipeline.train --section train_voc [--set optim.lr=0.002 ...]
    python -m pipeline.train --section train_voc          # one process
    python -m pipeline.launch train --section train_voc   # what the DVC stage runs: every GPU, or the CPU

The ``--section`` of ``params.yaml`` (default ``train``) is parsed into a
frozen :class:`TrainConfig`; ``--set key=value`` overrides it; unknown or
mistyped keys are an error that lists the valid ones. Outputs (``{name}`` is
the config's ``name``):

- ``models/{name}.pt``: the model file (:mod:`ssd.model_file`), written once, atomically;
- ``metrics/train-{name}.json``: final loss, steps, images/s, wall time, skipped steps;
- ``plots/train-{name}.csv``: per-step loss, its parts, learning rate, gradient norm;
- ``runs/{name}/``: TensorBoard logs (and the effective config, ``config.yaml``);
- ``checkpoints/{name}/``: periodic checkpoints while the run is unfinished.

Preemption: on SIGTERM or SIGINT every process finishes the current step, a
checkpoint is saved, and the run exits with code **75** (``EX_TEMPFAIL``:
"try again"). Running the same command again resumes from the newest complete
checkpoint (mid-epoch included; the data stream is deterministic in the step,
so nothing is replayed or skipped). A run killed without notice resumes from
its last periodic checkpoint. A checkpoint of another model or data config is
refused (exit code 2) unless ``--restart`` is given. When the run finishes,
its checkpoints are deleted (``keep_checkpoints: true`` keeps them).

Exit codes: 0 finished, 2 bad configuration or input, 75 preempted (resume by rerunning).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from pipeline import checkpoints
from ssd import atomic
from pipeline.config import flatten, load_config, load_params, to_dict
from pipeline.datasets import read_manifest
from pipeline.stage import StageError, arg_parser, run
from ssd.data.transforms import AugmentConfig
from ssd.loss import LossConfig, MultiBoxLoss
from ssd.model_file import ModelFileError, load_model_file, load_state_dict_file, save_model_file
from ssd.models import build_model
from ssd.models.ssd import freeze_batchnorm
from ssd.clip_loss import clip_loss
from ssd.state_carry import StateCarry, clip_keys
from ssd.optim import OptimConfig, build_optimizer, group_factors

log = logging.getLogger("pipeline.train")

#: Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint.
EXIT_PREEMPTED = 75


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
    name: Literal["ssdlite_mobilenet_v2", "ssd300_vgg16", "lstm_ssd_mobilenet_v2"] = "ssdlite_mobilenet_v2"
    """Architecture (builder in ssd.models); LSTM-SSD trains on clips (data.kind: clips)."""
    image_size: int = 300
    """Square input side in pixels."""
    width_mult: float = 1.0
    """MobileNetV2 width multiplier (SSDLite only)."""
    extra_channels: tuple[int, ...] | None = None
    """SSDLite extra-layer widths; null: 512/256/256/128 x width_mult."""
    taps: tuple[int, ...] = (13, 17)
    """MobileNetV2 blocks whose outputs are maps (ssds.pytorch: 13, 17; add 6 for a stride-8 map)."""
    placement: tuple[str, ...] = ("backbone",)
    """LSTM-SSD: where the ConvLSTM cells go: backbone (the paper: after the stride-16 map), extras,
    stride8 (on the stride-8 map, tap 6: every later map sees the memory)."""
    state_reduction: int = 1
    """LSTM-SSD: state channels = map channels / state_reduction."""
    residual: bool = False
    """LSTM-SSD: cells add a zero-initialised output to their map (start equal to SSDLite)
    instead of replacing it (the paper)."""
    priors: PriorsParams | None = None
    """Prior layout; null: the architecture's reference layout scaled to image_size."""
    backbone_weights: str | None = None
    """torchvision backbone state dict on disk (never downloaded); null: random init."""
    from_file: str | None = None
    """Start from the whole model in this model file (its architecture, pruned widths included,
    and its weights), e.g. to fine-tune a pruned model; the keys above are then ignored."""
    init_weights: str | None = None
    """Copy the same-named, same-shaped weights of this model file into the model built from
    the keys above (e.g. a trained SSDLite into LSTM-SSD)."""

    def arch(self, num_classes: int) -> dict[str, Any]:
        """The builder arguments (what model files store)."""
        arch: dict[str, Any] = {"name": self.name, "num_classes": num_classes, "image_size": self.image_size}
        if self.name in ("ssdlite_mobilenet_v2", "lstm_ssd_mobilenet_v2"):
            arch["width_mult"] = self.width_mult
            arch["taps"] = list(self.taps)
            if self.extra_channels is not None:
                arch["extra_channels"] = list(self.extra_channels)
        if self.name == "lstm_ssd_mobilenet_v2":
            arch["placement"] = list(self.placement)
            arch["state_reduction"] = self.state_reduction
            if self.residual:
                arch["residual"] = True
        if self.priors is not None:
            arch["priors"] = to_dict(self.priors)
        return arch


@dataclass(frozen=True)
class DataConfig:
    shards: str = "data/shards/voc"
    """Directory with manifest.json and the {split}-NNNNNN.tar shards."""
    split: str = "train"
    """Which split of the manifest to train on."""
    kind: Literal["frames", "clips", "frames_from_clips"] = "frames"
    """frames: frame shards; frames_from_clips: every frame of clip shards (per-frame baseline)."""
    batch_size: int = 16
    """Samples per process per micro-batch."""
    num_workers: int = 2
    """Loader worker processes per training process (0: load in the training process)."""
    streams: int = 2
    """Independent sample streams per process; fixed so that the data order doesn't depend on
    num_workers (which must divide it)."""
    shuffle_buffer: int = 256
    """Samples held per stream for shuffling."""
    sequence_clips: int = 0
    """LSTM-SSD on clips: carry the detached state from each clip to the next clip of its
    video (truncated backpropagation through time). Each batch position then walks through
    runs of up to this many consecutive clips of one video, augmented alike; 0: every clip
    starts from a zero state."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.sequence_clips < 0:
            raise ValueError(f"sequence_clips must not be negative, got {self.sequence_clips}")
        if self.sequence_clips and self.kind != "clips":
            raise ValueError(f"sequence_clips carries an LSTM state between clips: it needs kind 'clips', not {self.kind!r}")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "ssdlite"
    """Run name: names the model file, metrics, plots, logs and checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    steps: int = 1000
    """Optimiser steps in the whole run."""
    seed: int = 0
    """Seeds the model initialisation and the data order and augmentation."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Through Accelerate; fp16 needs a GPU."""
    checkpoint_every: int = 200
    """Steps between checkpoints (what a run killed without notice falls back to)."""
    keep_last: int = 2
    """Complete checkpoints kept while the run is unfinished."""
    keep_checkpoints: bool = False
    """Keep the checkpoints once the run has finished."""
    log_every: int = 10
    """Steps between log lines, TensorBoard points and plot rows."""
    freeze_backbone_steps: int = 0
    """Hold the backbone still for the first steps (LSTM-SSD's stage-wise training from SSDLite)."""
    frozen_batchnorm: bool = False
    """Batch norm uses and keeps its running statistics (eval mode) instead of each batch's:
    for fine-tuning a trained model on batches of few, correlated samples (LSTM-SSD's clips:
    4 clips x 8 frames hold only 4 scenes, whose statistics are not the data's)."""
    max_nonfinite: int = 5
    """Consecutive steps with a non-finite loss (each skipped) before the run stops."""
    trace: bool = False
    """Debug: write each process's sample keys and weight checksum per step to runs/{name}/trace-rankN.jsonl."""
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"

    def __post_init__(self) -> None:
        for key in ("steps", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")


@dataclass
class _Paths:
    model: Path
    metrics: Path
    plots: Path
    logs: Path
    checkpoints: Path

    @classmethod
    def of(cls, cfg: TrainConfig) -> "_Paths":
        return cls(
            model=Path(cfg.models_dir) / f"{cfg.name}.pt",
            metrics=Path(cfg.metrics_dir) / f"train-{cfg.name}.json",
            plots=Path(cfg.plots_dir) / f"train-{cfg.name}.csv",
            logs=Path(cfg.runs_dir) / cfg.name,
            checkpoints=Path(cfg.checkpoints_dir) / cfg.name,
        )


PLOT_FIELDS = ("step", "loss", "box_loss", "class_loss", "lr", "grad_norm", "images_per_s")


class _StopFlag:
    """SIGTERM/SIGINT set a flag (no collectives in a signal handler); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_blocked():
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def fingerprint(cfg: TrainConfig, classes: list[str]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the model and the data it was trained on."""
    data = to_dict(cfg.data)
    for key in ("num_workers",):  # doesn't change what is computed
        data.pop(key)
    return {"model": to_dict(cfg.model), "data": data, "classes": classes}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {b!r} in the checkpoint, {a!r} now"]


def train(cfg: TrainConfig, restart: bool = False) -> int:
    """Run (or resume) the training described by ``cfg``; returns the exit code."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    paths = _Paths.of(cfg)
    manifest = read_manifest(cfg.data.shards)
    shards = manifest.shard_paths(cfg.data.split)
    num_samples = manifest.count(cfg.data.split, "frames" if cfg.data.kind == "frames_from_clips" else "samples")
    if num_samples == 0:
        raise StageError(f"{manifest.path}: split {cfg.data.split!r} has no samples")
    expected_kind = "clips" if cfg.data.kind in ("clips", "frames_from_clips") else "frames"
    if manifest.kind != expected_kind:
        raise StageError(f"{manifest.path}: holds {manifest.kind} shards but data.kind is {cfg.data.kind!r}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise StageError("mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    if cfg.data.streams % max(1, cfg.data.num_workers):
        raise StageError(f"data.num_workers ({cfg.data.num_workers}) must divide data.streams ({cfg.data.streams})")

    accelerator = Accelerator(
        # Without a GPU, Accelerate only sets up a process group (gloo) when told it runs on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.runs_dir, logging_dir=cfg.runs_dir),
        step_scheduler_with_optimizer=False,  # we step it once per optimiser step ourselves
    )
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    classes = manifest.classes
    fp = fingerprint(cfg, classes)

    # Refuse (or, with --restart, discard) an unfinished run of another model or data config.
    latest = checkpoints.latest_checkpoint(paths.checkpoints)
    if latest is not None:
        diffs = _differences(fp, checkpoints.read_meta(latest).get("fingerprint", {}))
        if diffs and not restart:
            raise StageError(
                f"{latest}: checkpoint of another model or data config ({'; '.join(diffs[:3])}); "
                f"delete {paths.checkpoints} or rerun with --restart"
            )
        if diffs:
            accelerator.wait_for_everyone()
            if main:
                log.warning("--restart: discarding %s (%s)", paths.checkpoints, "; ".join(diffs[:3]))
                shutil.rmtree(paths.checkpoints, ignore_errors=True)
            accelerator.wait_for_everyone()
            latest = None
    if main:
        checkpoints.remove_incomplete(paths.checkpoints)

    set_seed(cfg.seed)
    model = _build(cfg.model, classes)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, group_factors(optimizer, cfg.optim, cfg.steps, cfg.freeze_backbone_steps)
    )
    temporal = bool(getattr(model, "is_temporal", False))
    if temporal != (cfg.data.kind == "clips"):
        raise StageError(
            f"data.kind {cfg.data.kind!r} with model {model.arch.get('name')!r}: a temporal model "
            "(lstm_ssd_mobilenet_v2) trains on clips, the others on frames or frames_from_clips"
        )
    criterion = MultiBoxLoss(model.priors, cfg.loss).to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, history = 0, {"losses": [], "nonfinite": 0, "train_seconds": 0.0, "images": 0}
    if latest is not None:
        meta = checkpoints.read_meta(latest)
        if meta.get("world_size") != world or meta.get("batch_size") != cfg.data.batch_size:
            log.warning(
                "%s was written by %s processes with batch %s; now %s with batch %s: the data order will differ",
                latest, meta.get("world_size"), meta.get("batch_size"), world, cfg.data.batch_size,
            )
        accelerator.load_state(str(latest))
        step, history = meta["step"], meta["history"]
        log.info("resumed from %s at step %d", latest, step)

    accum = cfg.optim.grad_accum
    image_size = accelerator.unwrap_model(model).image_size  # a model file's own size with from_file
    batches_per_epoch = max(1, math.ceil(num_samples / (cfg.data.batch_size * world)))

    def micro_batches(first: int):
        """Micro-batches from position ``first`` on, across epochs; deterministic in the position."""
        epoch, start = divmod(first, batches_per_epoch)
        while True:
            loader = _loader(cfg, shards, image_size, rank, world, epoch, start, batches_per_epoch)
            # Loader workers are forked here. With SIGTERM/SIGINT blocked while they start, they
            # inherit the block and a preemption signal can't kill one mid-epoch; the training
            # process gets the pending signal as soon as the block is lifted.
            with _signals_blocked():
                batches = iter(loader)
            yield from batches
            epoch, start = epoch + 1, 0

    if main:
        paths.logs.mkdir(parents=True, exist_ok=True)
        atomic.write_text(paths.logs / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        hparams = {**flatten(to_dict(cfg)), "world_size": world}
        accelerator.init_trackers(cfg.name, config=hparams)
        _truncate_plot_rows(paths.plots, step)
    if cfg.trace:
        paths.logs.mkdir(parents=True, exist_ok=True)
        if step == 0:
            (paths.logs / f"trace-rank{rank}.jsonl").unlink(missing_ok=True)
    trace = open(paths.logs / f"trace-rank{rank}.jsonl", "a") if cfg.trace else contextlib.nullcontext()

    from tqdm.auto import tqdm

    progress = tqdm(total=cfg.steps, initial=step, disable=not main, desc=cfg.name, unit="step", dynamic_ncols=True)
    stream = micro_batches(step * accum)
    window = {"t": time.perf_counter(), "images": 0, "wait": 0.0}
    wait_total = 0.0
    exit_code = 0
    unwrapped = accelerator.unwrap_model(model)
    # Sequence mode: a stream's next batch is `streams` micro-batches later; keep states twice that long.
    carry = StateCarry(keep=2 * cfg.data.streams) if temporal and cfg.data.sequence_clips else None
    with _StopFlag() as stop, trace:
        t_start = time.perf_counter()
        while step < cfg.steps:
            model.train()
            if cfg.frozen_batchnorm:
                freeze_batchnorm(model)
            skipped = False
            parts = {"loss": 0.0, "box_loss": 0.0, "class_loss": 0.0}
            stop_seen = False
            keys: list[str] = []
            for i in range(accum):
                t0 = time.perf_counter()
                batch = next(stream).to(accelerator.device)
                wait = time.perf_counter() - t0
                window["wait"] += wait
                wait_total += wait
                keys += batch.keys
                sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model)
                with sync:
                    if temporal:  # every frame of every clip counts, gradients through the clip
                        state = None
                        if carry is not None:  # the state the previous clip of each run ended with
                            start_keys, next_keys = clip_keys(batch.video, batch.frames, batch.runs)
                            zero = unwrapped.init_state(len(batch), accelerator.device)
                            state, carried = carry.take(zero, start_keys)
                            history["carried_clips"] = history.get("carried_clips", 0) + carried
                        logits, deltas, end_state = model(batch.images, state)
                        out = clip_loss(criterion, logits, deltas, batch.targets)
                    else:
                        logits, deltas = model(batch.images)
                        out = criterion(logits, deltas, batch.targets)
                    flags = torch.tensor(
                        [0.0 if torch.isfinite(out["loss"]) else 1.0, 1.0 if stop.requested else 0.0],
                        device=accelerator.device,
                    )
                    flags = accelerator.reduce(flags, reduction="sum")  # every rank decides alike
                    skipped = skipped or bool(flags[0] > 0)
                    stop_seen = stop_seen or bool(flags[1] > 0)
                    if carry is not None and not skipped:
                        carry.put(end_state, next_keys)
                    if not skipped:
                        accelerator.backward(out["loss"] / accum)
                        for k in parts:
                            parts[k] += out[k].item() / accum
                frames = batch.images.shape[0] * (batch.images.shape[1] if temporal else 1)
                window["images"] += frames * world
            grad_norm = float("nan")
            if not skipped:
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
                optimizer.step()
                history["nonfinite_streak"] = 0
                history["losses"] = (history["losses"] + [parts["loss"]])[-50:]
            else:
                history["nonfinite"] += 1
                history["nonfinite_streak"] = history.get("nonfinite_streak", 0) + 1
                log.warning("step %d: non-finite loss, step skipped (keys %s)", step, ", ".join(keys[:4]))
                if history["nonfinite_streak"] > cfg.max_nonfinite:
                    raise StageError(
                        f"step {step}: loss not finite for {history['nonfinite_streak']} consecutive steps; "
                        f"last sample keys: {', '.join(keys[:8])}"
                    )
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            progress.update(1)
            history["images"] += frames * accum * world

            if cfg.trace:
                checksum = sum(float(p.detach().double().sum()) for p in unwrapped.parameters())
                trace.write(json.dumps({"step": step, "keys": keys, "checksum": checksum}) + "\n")
                trace.flush()
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window["t"]
                row = {
                    "step": step,
                    **{k: round(v, 6) for k, v in parts.items()},
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    "images_per_s": round(window["images"] / max(elapsed, 1e-9), 2),
                }
                if main:
                    accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
                    _append_plot_row(paths.plots, row)
                    progress.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}")
                window = {"t": time.perf_counter(), "images": 0, "wait": 0.0}
            if stop_seen or (step % cfg.checkpoint_every == 0 and step < cfg.steps):
                history["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                meta = {"fingerprint": fp, "history": history, "world_size": world, "batch_size": cfg.data.batch_size}
                checkpoints.save_checkpoint(accelerator, paths.checkpoints, step, meta, cfg.keep_last)
                t_start = time.perf_counter()
                if stop_seen:
                    log.warning("stopped at step %d; rerun the same command to resume", step)
                    exit_code = EXIT_PREEMPTED
                    break
        history["train_seconds"] += time.perf_counter() - t_start
    progress.close()
    if exit_code:
        accelerator.end_training()
        return exit_code

    accelerator.wait_for_everyone()
    if main:
        losses = history["losses"]
        summary = {
            "steps": step,
            "final_loss": round(sum(losses) / len(losses), 6) if losses else None,
            "images_per_s": round(history["images"] / max(history["train_seconds"], 1e-9), 2),
            "wall_time_s": round(history["train_seconds"], 2),
            "data_wait_fraction": round(wait_total / max(history["train_seconds"], 1e-9), 4),
            "nonfinite_steps": history["nonfinite"],
            "world_size": world,
        }
        if carry is not None:  # clips (on this process) that started from the previous clip's state
            summary["carried_clips"] = history.get("carried_clips", 0)
        save_model_file(
            paths.model, accelerator.unwrap_model(model), classes,
            meta={"train_config": to_dict(cfg), "summary": summary},
        )
        atomic.write_json(paths.metrics, summary)
        log.info("wrote %s and %s: %s", paths.model, paths.metrics, summary)
        if not cfg.keep_checkpoints:
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _build(cfg: ModelConfig, classes: list[str]):
    """The model to train: from a model file, or built from the config (plus copied weights)."""
    try:
        if cfg.from_file:
            model, info = load_model_file(cfg.from_file)
            if info["class_names"] != classes:
                raise StageError(
                    f"{cfg.from_file}: model classes {info['class_names']} differ from the data's {classes}"
                )
            return model.train()
        backbone = load_state_dict_file(cfg.backbone_weights) if cfg.backbone_weights else None
        model = build_model(cfg.arch(len(classes) + 1), backbone_state_dict=backbone)
        if cfg.init_weights:
            source, _ = load_model_file(cfg.init_weights)
            own = model.state_dict()
            usable = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
            if not usable:
                raise StageError(f"{cfg.init_weights}: no weight matches the model's names and shapes")
            model.load_state_dict(usable, strict=False)
            log.info("initialised %d of %d tensors from %s", len(usable), len(own), cfg.init_weights)
        return model
    except (ModelFileError, ValueError) as e:
        raise StageError(f"model: {e}") from None


def _loader(
    cfg: TrainConfig, shards: list[str], image_size: int, rank: int, world: int, epoch: int, start: int, per_epoch: int
):
    from ssd.data.loader import train_loader

    return train_loader(
        shards,
        cfg.data.augment,
        image_size=image_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        epoch=epoch,
        batches_per_epoch=per_epoch,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        start_batch=start,
        kind=cfg.data.kind,
        streams=cfg.data.streams,
        shuffle_buffer=cfg.data.shuffle_buffer,
        sequence_clips=cfg.data.sequence_clips,
        pin_memory=torch.cuda.is_available(),
    )


def _append_plot_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLOT_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_plot_rows(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run logs them again); start afresh at step 0."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic.atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=PLOT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", default="train", help="params.yaml section (default: %(default)s)")
    parser.add_argument("--restart", action="store_true", help="discard checkpoints of another config")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load_config(TrainConfig, load_params(args.params), args.section, args.overrides)
        return train(cfg, restart=args.restart)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
