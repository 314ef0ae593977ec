"""A training run built from its config: data checked, model, optimiser, EMA and validation
set up, and the state of the newest matching checkpoint loaded."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import checkpoints, device, resume
from pipeline.config import ConfigError, flatten, to_dict
from pipeline.datasets import Manifest, read_manifest
from pipeline.run_log import RunLog, Table
from pipeline.stage import StageError, check_replaceable, check_writable
from pipeline.train_config import ModelConfig, RunPaths, TrainConfig
from pipeline.training.init_weights import load_init_weights
from pipeline.training.validation import Validator
from ssd import atomic
from ssd.ema import averaged
from ssd.loss import MultiBoxLoss
from ssd.model_file import ModelFileError, load_model_file, load_state_dict_file
from ssd.models import build_model
from ssd.optim import build_optimizer, group_factors, lr_factor
from ssd.data.transforms import DeviceColour
from ssd.state_carry import StateCarry, carry_keep

log = logging.getLogger("pipeline.train")

LOSS_PARTS = ("loss", "box_loss", "class_loss")
"""The parts of the loss that are logged; ``distill_loss`` too when distilling (``loss`` holds it)."""


def loss_parts(cfg: TrainConfig) -> tuple[str, ...]:
    """The loss parts a run logs."""
    return LOSS_PARTS + (("distill_loss",) if cfg.distill.teacher else ())


def plot_fields(cfg: TrainConfig) -> tuple[str, ...]:
    """Columns of plots/train-{name}.csv (and TensorBoard's train/* scalars)."""
    return ("step", *loss_parts(cfg), "lr", "grad_norm", "images_per_s")


def _new_history() -> dict[str, Any]:
    return {"losses": [], "nonfinite": 0, "nonfinite_streak": 0, "train_seconds": 0.0, "images": 0,
            "wait_seconds": 0.0, "world_sizes": []}


@dataclass
class Run:
    """Everything a training run holds while it trains (built by :func:`setup`)."""

    cfg: TrainConfig
    paths: RunPaths
    accelerator: Any
    model: Any  # as prepared by Accelerate (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: MultiBoxLoss
    classes: list[str]
    fingerprint: dict[str, Any]
    temporal: bool
    batches_per_epoch: int
    shards: list[str]
    log: RunLog
    step: int = 0
    history: dict[str, Any] = field(default_factory=_new_history)
    carry: StateCarry | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None
    validator: Validator | None = None
    teacher: Any = None
    """The distillation teacher (``cfg.distill.teacher``), frozen, in eval mode."""
    colour: Any = None
    """The colour change the loader workers drew and left to the device (``data.augment.photometric_device``)."""
    lock: Any = None
    """The run's lock file (main process: :func:`pipeline.checkpoints.hold_run_lock`), open while the run lives."""

    @property
    def unwrapped(self):
        """The model being trained, without Accelerate's wrappers (DDP, torch.compile)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def final(self):
        """The model that is validated and saved: the EMA's average when enabled, else the trained one."""
        return self.ema.module if self.ema is not None else self.unwrapped


def check_data(cfg: TrainConfig) -> tuple[Manifest, list[str], int]:
    """The manifest, the training shards and the number of samples; StageError if they don't fit the config."""
    manifest = read_manifest(cfg.data.shards)
    shards = manifest.shard_paths(cfg.data.split)
    what = "samples"
    if cfg.data.kind == "frames_from_clips":  # the loader's samples: every clip's frames, a shared one twice
        what = "frame_slots" if "frame_slots" in manifest.split(cfg.data.split) else "frames"
    num_samples = manifest.count(cfg.data.split, what)
    if num_samples == 0:
        raise StageError(f"{manifest.path}: split {cfg.data.split!r} has no samples")
    expected_kind = "clips" if cfg.data.kind in ("clips", "frames_from_clips") else "frames"
    if manifest.kind != expected_kind:
        raise StageError(f"{manifest.path}: holds {manifest.kind} shards but data.kind is {cfg.data.kind!r}")
    if cfg.data.streams % max(1, cfg.data.num_workers):
        raise StageError(f"data.num_workers ({cfg.data.num_workers}) must divide data.streams ({cfg.data.streams})")
    if cfg.data.batch_size == 1 and cfg.data.kind != "clips" and not cfg.frozen_batchnorm:
        # The last extras map is 1x1: one image gives batch norm one value per channel (a traceback).
        raise StageError("data.batch_size 1: batch norm in training needs more than one image per batch (the last "
                         "feature map is 1x1); use 2 or more (optim.grad_accum keeps the memory down), or "
                         "frozen_batchnorm: true")
    if cfg.optim.warmup_steps > cfg.steps:
        log.warning("optim.warmup_steps %d is more than steps %d: the learning rate stops at %.3g of optim.lr and the "
                    "%s schedule never starts", cfg.optim.warmup_steps, cfg.steps,
                    lr_factor(cfg.optim, cfg.steps)(cfg.steps - 1), cfg.optim.schedule)
    return manifest, shards, num_samples


def shard_sizes(manifest: Manifest) -> dict[str, int]:
    """``{shard file name: bytes}`` of every split's shards (the validation split's too; a split
    without shards, or a shard missing, is the business of whoever reads it)."""
    paths = [manifest.root / name for split in manifest.splits.values() for name in split.get("shards") or []]
    return {p.name: p.stat().st_size for p in sorted(paths) if p.is_file()}


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    try:
        precision = device.resolve_mixed_precision(cfg.mixed_precision, "mixed_precision")
        backend = device.resolve_compile(cfg.compile, "compile")
    except ConfigError as e:
        raise StageError(str(e)) from None
    device.set_tf32(cfg.tf32)
    accelerator = Accelerator(
        # Without a GPU, Accelerate only sets up a process group (gloo) when told it runs on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        dynamo_backend=backend,
        step_scheduler_with_optimizer=False,  # we step it once per optimiser step ourselves
    )
    if accelerator.gradient_accumulation_steps != 1:
        # Accelerate takes it from ACCELERATE_GRADIENT_ACCUMULATION_STEPS whatever the argument
        # says, and then divides every loss passed to backward by it: a silently smaller step.
        raise StageError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={accelerator.gradient_accumulation_steps} would "
                         "scale every gradient down; unset it and use optim.grad_accum")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise StageError("mixed precision fp16 needs a GPU; use bf16 or no on the CPU")
    device.report(accelerator, f"training {cfg.name}")
    return accelerator


def _check_file_arch(cfg: ModelConfig, info: dict[str, Any]) -> None:
    """``from_file`` takes the file's architecture: a model key set to other than its default that
    disagrees with the file is an error, not a run of the file's model recorded under the key's value."""
    wanted, held = cfg.arch(len(info["class_names"]) + 1), info["arch"]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key, value in wanted.items():
        # A key the file's arch doesn't record has the default there (residual is written only
        # when true; a VGG file has no width_mult at all).
        theirs = held.get(key, defaults.get(key))
        if key in defaults and getattr(cfg, key) != defaults[key] and theirs != value:
            shown = held[key] if key in held else "none (its default)"
            raise StageError(f"model.{key}: {value} here, but {cfg.from_file} holds a model with {key} {shown} "
                             "(from_file takes the file's architecture: give the file's value or leave the key out)")


def build(cfg: ModelConfig, classes: list[str]):
    """The model to train: from a model file, or built from the config (plus copied weights)."""
    try:
        if cfg.from_file:
            model, info = load_model_file(cfg.from_file)
            _check_file_arch(cfg, info)
            if info["class_names"] != classes:
                raise StageError(
                    f"{cfg.from_file}: model classes {info['class_names']} differ from the data's {classes}"
                )
            return model.train()
        backbone = load_state_dict_file(cfg.backbone_weights) if cfg.backbone_weights else None
        arch = cfg.arch(len(classes) + 1)
        if cfg.init_weights:
            source, info = load_model_file(cfg.init_weights)
            # The weights were trained on their input convention: the new model takes it.
            arch["input_norm"] = source.input_norm.to_dict()
        model = build_model(arch, backbone_state_dict=backbone)
        if cfg.init_weights:
            load_init_weights(model, arch, classes, cfg.init_weights, source, info)
        return model
    except (ModelFileError, ValueError) as e:
        raise StageError(f"model: {e}") from None


def load_teacher(path: str, student: Any, classes: list[str]) -> Any:
    """The distillation teacher: a frame model file with the student's classes and priors, frozen."""
    try:
        teacher, info = load_model_file(path)
    except ModelFileError as e:
        raise StageError(f"distill.teacher: {e}") from None
    if info["class_names"] != classes:
        raise StageError(f"distill.teacher {path}: classes {info['class_names']} differ from the data's {classes}")
    if getattr(teacher, "is_temporal", False) or getattr(student, "is_temporal", False):
        raise StageError(f"distill.teacher {path}: distillation is for frame models, not LSTM-SSD")
    if teacher.priors.shape != student.priors.shape or not torch.allclose(teacher.priors, student.priors):
        raise StageError(
            f"distill.teacher {path}: its {teacher.priors.shape[0]} priors differ from the model's "
            f"{student.priors.shape[0]}: the outputs must be prior for prior the same"
        )
    teacher.eval().requires_grad_(False)
    return teacher


def batches_per_epoch(cfg: TrainConfig, num_samples: int, world: int) -> int:
    """Each process's batches in an epoch (logged with the job's batch); in sequence mode, refused
    where no run of clips could carry a state (a lane's runs end with the epoch)."""
    data = cfg.data
    batches = max(1, math.ceil(num_samples / (data.batch_size * world)))
    log.info("batch: %d per process x %d process(es) x %d accumulated = %d samples per optimiser step; "
             "%d steps per epoch of %d samples", data.batch_size, world, cfg.optim.grad_accum,
             data.batch_size * world * cfg.optim.grad_accum, max(1, batches // cfg.optim.grad_accum), num_samples)
    if data.sequence_clips > 1:
        per_stream = batches // data.streams  # batches of each loader stream in an epoch, at least
        why = (f"each of the {data.streams} loader streams of a process makes {per_stream} batch(es) an epoch "
               f"({num_samples} clips, batch {data.batch_size} on {world} process(es)), and a stream's runs of clips "
               "end with the epoch")
        if per_stream < 2:
            raise StageError(f"data.sequence_clips {data.sequence_clips}: no clip would start from a carried state: "
                             f"{why}; use fewer data.streams, a smaller data.batch_size or fewer processes")
        if per_stream < data.sequence_clips:
            log.warning("data.sequence_clips %d: runs are at most %d clips long here: %s", data.sequence_clips,
                        per_stream, why)
    return batches


def _check_checkpoints_folder(cfg: TrainConfig, paths: RunPaths) -> None:
    """The run's checkpoints folder is deleted when the run ends (and by --restart): it may hold
    nothing but checkpoints (``checkpoints_dir: runs`` deleted the run's TensorBoard logs)."""
    def only_checkpoints(folder: Path) -> bool:
        return all(checkpoints.is_checkpoint_name(p.name) or p.name.startswith(atomic.TMP_PREFIX)
                   for p in folder.iterdir())

    outputs = {"the model file": paths.model, "the best model file": paths.best_model, "the metrics": paths.metrics,
               "the plots": paths.plots, "the run's logs (runs_dir)": paths.logs, "data.shards": cfg.data.shards}
    check_replaceable(paths.checkpoints, "checkpoints_dir", only_checkpoints, "a folder of this run's checkpoints",
                      inputs=outputs)


def setup(cfg: TrainConfig, restart: bool) -> Run:
    """Check the inputs, build the accelerator, model, optimiser, EMA and validation, and resume
    if there is a checkpoint."""
    paths = RunPaths.of(cfg)
    check_writable(paths.model.parent, paths.metrics.parent, paths.plots.parent, paths.logs, paths.checkpoints)
    _check_checkpoints_folder(cfg, paths)
    manifest, shards, num_samples = check_data(cfg)
    accelerator = make_accelerator(cfg)
    try:
        lock = checkpoints.hold_run_lock(paths.checkpoints) if accelerator.is_main_process else None
    except checkpoints.RunLocked as e:
        raise StageError(str(e)) from None
    try:
        return _build_run(cfg, restart, paths, manifest, shards, num_samples, accelerator, lock)
    except BaseException:  # a refusal here (a resume with other settings) must not keep the name locked
        if lock is not None:
            lock.close()
        raise


def _build_run(cfg: TrainConfig, restart: bool, paths: RunPaths, manifest: Manifest, shards: list[str],
               num_samples: int, accelerator: Any, lock: Any) -> Run:
    """:func:`setup` once the inputs are checked and the run's name is held."""
    from accelerate.utils import set_seed

    files = {"data.shards": manifest.path, "model.init_weights": cfg.model.init_weights,
             "model.from_file": cfg.model.from_file, "model.backbone_weights": cfg.model.backbone_weights,
             "distill.teacher": cfg.distill.teacher}
    fp = resume.fingerprint(to_dict(cfg), manifest.classes, files, accelerator.mixed_precision,
                            shards=shard_sizes(manifest))

    set_seed(cfg.seed)
    model = build(cfg.model, manifest.classes)
    temporal = bool(getattr(model, "is_temporal", False))
    if temporal != (cfg.data.kind == "clips"):
        raise StageError(
            f"data.kind {cfg.data.kind!r} with model {model.arch.get('name')!r}: a temporal model "
            "(lstm_ssd_*) trains on clips, the others on frames or frames_from_clips"
        )
    validator = Validator.of(cfg.validation, manifest, temporal) if cfg.validation.every else None
    teacher = load_teacher(cfg.distill.teacher, model, manifest.classes) if cfg.distill.teacher else None
    try:
        optimizer = build_optimizer(model, cfg.optim)
    except ValueError as e:  # an lr_factors prefix that names nothing
        raise StageError(str(e)) from None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, group_factors(optimizer, cfg.optim, cfg.steps, cfg.freeze_backbone_steps)
    )
    criterion = MultiBoxLoss(model.priors, cfg.loss).to(accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if accelerator.device.type == "cpu":
            log.warning("channels_last on a CPU: faster, but torch's CPU batch norm is less exact in NHWC and "
                        "the trajectory changes (docs/training.md, 'channels_last on a CPU')")
    # The scheduler is not registered with Accelerate: its state goes into meta.json as JSON
    # (Accelerate would pickle it, and unpickling a checkpoint someone else wrote runs code).
    model, optimizer = accelerator.prepare(model, optimizer)
    world = accelerator.num_processes
    tables = {"train": Table(paths.plots, plot_fields(cfg))}
    if validator is not None:
        tables["val"] = Table(paths.val_plots, validator.fields)
    r = Run(
        cfg=cfg, paths=paths, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        criterion=criterion, classes=manifest.classes, fingerprint=fp, temporal=temporal, shards=shards,
        batches_per_epoch=batches_per_epoch(cfg, num_samples, world),
        log=RunLog(paths.logs, tables, enabled=accelerator.is_main_process), validator=validator,
        teacher=None if teacher is None else teacher.to(accelerator.device), lock=lock,
    )
    if cfg.ema.enabled:
        r.ema = averaged(r.unwrapped, cfg.ema.decay)
    if cfg.data.augment.photometric_device:
        r.colour = DeviceColour(cfg.data.augment)
    if temporal and cfg.data.sequence_clips:
        r.carry = StateCarry(keep=carry_keep(cfg.data.streams, cfg.data.sequence_clips))
    from pipeline.training.restore import resume_run  # it builds on Run: imported here, not at the top

    rows = resume_run(r, restart)
    r.history["world_sizes"] = sorted(set(r.history.get("world_sizes", [])) | {world})
    if accelerator.is_main_process:
        paths.logs.mkdir(parents=True, exist_ok=True)
        atomic.write_text(paths.logs / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    r.log.start(rows, hparams={**flatten(to_dict(cfg)), "world_size": world})
    return r
