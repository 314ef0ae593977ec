"""Train a detector with Accelerate: one process, many GPUs, many machines, spot instances.

Usage::

    python -m pipeline.launch train --section train_voc   # what the DVC stage runs: every GPU, or the CPU
    python -m pipeline.train --section train_voc          # one process
    python -m pipeline.supervise accelerate launch -m pipeline.train --section train_voc

The ``--section`` of the params file (needed when it has several training sections) is
parsed into a frozen :class:`~pipeline.train_config.TrainConfig`; ``--set key=value``
overrides it; unknown or mistyped keys are an error that lists the valid ones. Outputs
(``{name}`` is the config's ``name``):

- ``models/{name}.pt``: the model file (:mod:`ssd.model_file`), written once, atomically;
- ``metrics/train-{name}.json``: final loss, steps, images/s, wall time, skipped steps (the
  whole run, across preemptions);
- ``plots/train-{name}.csv``: per logged step: loss, its parts, learning rate, gradient norm;
- ``runs/{name}/``: TensorBoard scalars (the same rows) and the effective config, ``config.yaml``;
- ``checkpoints/{name}/``: periodic checkpoints while the run is unfinished.

Preemption: on SIGTERM or SIGINT every process finishes the current step, a
checkpoint is saved, and the run exits with code **75** (``EX_TEMPFAIL``:
"try again"). Running the same command again resumes from the newest complete
checkpoint (mid-epoch included; the data stream is deterministic in the step,
so nothing is replayed or skipped), and rebuilds the plots CSV and the TensorBoard
scalars from the rows the checkpoint carries. A run killed without notice resumes
from its last periodic checkpoint. A checkpoint trained with other settings (any key
outside :data:`pipeline.resume.RESUME_SAFE`, or other data or init weights) is refused
(exit code 2) with the keys that differ, unless ``--restart`` is given. When the run
finishes, its checkpoints are deleted (``keep_checkpoints: true`` keeps them).

Exit codes: 0 finished, 2 bad configuration or input, 75 preempted (resume by rerunning).
Under a launcher (``accelerate launch``, ``torchrun``), ``pipeline.supervise`` passes the
75 on; the launchers themselves turn it into 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from pipeline import checkpoints, device, resume
from pipeline.config import ConfigError, choose_section, flatten, load_config, load_params, to_dict
from pipeline.datasets import Manifest, read_manifest
from pipeline.run_log import RunLog
from pipeline.stage import StageError, arg_parser, check_writable, run
from pipeline.train_config import DataConfig, ModelConfig, PriorsParams, RunPaths, TrainConfig
from ssd import atomic
from ssd.clip_loss import clip_loss
from ssd.loss import MultiBoxLoss
from ssd.model_file import ModelFileError, load_model_file, load_state_dict_file, save_model_file
from ssd.weights.loading import load_matching
from ssd.models import build_model
from ssd.models.ssd import freeze_batchnorm
from ssd.optim import build_optimizer, group_factors
from ssd.state_carry import StateCarry, clip_keys

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "PriorsParams", "train", "main", "EXIT_PREEMPTED"]

log = logging.getLogger("pipeline.train")

#: Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint.
EXIT_PREEMPTED = 75

PLOT_FIELDS = ("step", "loss", "box_loss", "class_loss", "lr", "grad_norm", "images_per_s")


class _StopFlag:
    """SIGTERM/SIGINT set a flag (no collectives in a signal handler); a second SIGINT aborts."""

    def __init__(self, then: str = "finishing the current step, then saving a checkpoint") -> None:
        self.requested = False
        self.then = then
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
        log.warning("received %s: %s", signal.Signals(signum).name, self.then)


@contextlib.contextmanager
def _signals_blocked():
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class _Run:
    """Everything a training run holds while it trains (built by :func:`_setup`)."""

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
    history: dict[str, Any] = field(default_factory=lambda: {
        "losses": [], "nonfinite": 0, "nonfinite_streak": 0, "train_seconds": 0.0, "images": 0, "wait_seconds": 0.0,
        "world_sizes": [],
    })
    carry: StateCarry | None = None

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)


def train(cfg: TrainConfig, restart: bool = False) -> int:
    """Run (or resume) the training described by ``cfg``; returns the exit code."""
    r = _setup(cfg, restart)
    try:
        code = _loop(r)
        if code == 0:
            code = _finish(r)
        return code
    finally:
        r.log.close()
        r.accelerator.end_training()


def _check_data(cfg: TrainConfig) -> tuple[Manifest, list[str], int]:
    manifest = read_manifest(cfg.data.shards)
    shards = manifest.shard_paths(cfg.data.split)
    num_samples = manifest.count(cfg.data.split, "frames" if cfg.data.kind == "frames_from_clips" else "samples")
    if num_samples == 0:
        raise StageError(f"{manifest.path}: split {cfg.data.split!r} has no samples")
    expected_kind = "clips" if cfg.data.kind in ("clips", "frames_from_clips") else "frames"
    if manifest.kind != expected_kind:
        raise StageError(f"{manifest.path}: holds {manifest.kind} shards but data.kind is {cfg.data.kind!r}")
    if cfg.data.streams % max(1, cfg.data.num_workers):
        raise StageError(f"data.num_workers ({cfg.data.num_workers}) must divide data.streams ({cfg.data.streams})")
    return manifest, shards, num_samples


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    try:
        precision = device.resolve_mixed_precision(cfg.mixed_precision, "mixed_precision")
    except ConfigError as e:
        raise StageError(str(e)) from None
    accelerator = Accelerator(
        # Without a GPU, Accelerate only sets up a process group (gloo) when told it runs on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,  # we step it once per optimiser step ourselves
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise StageError("mixed precision fp16 needs a GPU; use bf16 or no on the CPU")
    device.report(accelerator, f"training {cfg.name}")
    return accelerator


def _checkpoint_to_resume(r: _Run, restart: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint and its meta if it matches the run; refused (or discarded
    with --restart) if not."""
    latest = checkpoints.latest_checkpoint(r.paths.checkpoints)
    if latest is None:
        return None
    meta = checkpoints.read_meta(latest)
    diffs = resume.differences(r.fingerprint, meta.get("fingerprint", {}))
    if not diffs and meta["step"] > r.cfg.steps:
        diffs = [f"steps: the checkpoint is at step {meta['step']}, past steps {r.cfg.steps}"]
    if diffs and not restart:
        raise StageError(resume.refusal(latest, diffs))
    if diffs:
        r.accelerator.wait_for_everyone()
        if r.accelerator.is_main_process:
            log.warning("--restart: discarding %s (%s)", r.paths.checkpoints, "; ".join(diffs[:3]))
            shutil.rmtree(r.paths.checkpoints, ignore_errors=True)
        r.accelerator.wait_for_everyone()
        return None
    return latest, meta


def _setup(cfg: TrainConfig, restart: bool) -> _Run:
    """Check the inputs, build the accelerator, model and optimiser, and resume if there is a checkpoint."""
    from accelerate.utils import set_seed

    paths = RunPaths.of(cfg)
    check_writable(paths.model.parent, paths.metrics.parent, paths.plots.parent, paths.logs, paths.checkpoints)
    manifest, shards, num_samples = _check_data(cfg)
    accelerator = _accelerator(cfg)
    classes = manifest.classes
    files = {"data.shards": manifest.path, "model.init_weights": cfg.model.init_weights,
             "model.from_file": cfg.model.from_file, "model.backbone_weights": cfg.model.backbone_weights}
    fp = resume.fingerprint(to_dict(cfg), classes, files, accelerator.mixed_precision)

    set_seed(cfg.seed)
    model = _build(cfg.model, classes)
    temporal = bool(getattr(model, "is_temporal", False))
    if temporal != (cfg.data.kind == "clips"):
        raise StageError(
            f"data.kind {cfg.data.kind!r} with model {model.arch.get('name')!r}: a temporal model "
            "(lstm_ssd_mobilenet_v2) trains on clips, the others on frames or frames_from_clips"
        )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, group_factors(optimizer, cfg.optim, cfg.steps, cfg.freeze_backbone_steps)
    )
    criterion = MultiBoxLoss(model.priors, cfg.loss).to(accelerator.device)
    # The scheduler is not registered with Accelerate: its state goes into meta.json as JSON
    # (Accelerate would pickle it, and unpickling a checkpoint someone else wrote runs code).
    model, optimizer = accelerator.prepare(model, optimizer)
    world = accelerator.num_processes
    r = _Run(
        cfg=cfg, paths=paths, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        criterion=criterion, classes=classes, fingerprint=fp, temporal=temporal, shards=shards,
        batches_per_epoch=max(1, math.ceil(num_samples / (cfg.data.batch_size * world))),
        log=RunLog(paths.plots, paths.logs, PLOT_FIELDS, enabled=accelerator.is_main_process),
    )
    if temporal and cfg.data.sequence_clips:
        # A stream's next batch is `streams` micro-batches later; keep states twice that long.
        r.carry = StateCarry(keep=2 * cfg.data.streams)
    found = _checkpoint_to_resume(r, restart)
    if accelerator.is_main_process:
        checkpoints.remove_incomplete(paths.checkpoints)
    rows: list[dict[str, Any]] = []
    if found is not None:
        latest, meta = found
        _load_state(accelerator, latest, r.paths.checkpoints)
        scheduler.load_state_dict(meta["scheduler"])
        r.step, r.history, rows = meta["step"], meta["history"], meta.get("log_rows", [])
        if meta.get("world_size") != world:
            log.warning("%s was written by %s processes, now %s: the global batch and the data order differ "
                        "from an uninterrupted run", latest, meta.get("world_size"), world)
        log.info("resumed from %s at step %d", latest, r.step)
    r.history["world_sizes"] = sorted(set(r.history.get("world_sizes", [])) | {world})
    if accelerator.is_main_process:
        paths.logs.mkdir(parents=True, exist_ok=True)
        atomic.write_text(paths.logs / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    r.log.start(rows, hparams={**flatten(to_dict(cfg)), "world_size": world})
    return r


def _load_state(accelerator, checkpoint: Path, root: Path) -> None:
    """Accelerate's ``load_state``: tensors only (``weights_only``), a bad file is a one-line error."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # torch and safetensors raise many types for a corrupt or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise StageError(
            f"{checkpoint}: the checkpoint can't be loaded ({type(e).__name__}: {first}); delete it to resume "
            f"from the one before, or delete {root} to start over"
        ) from None


def _micro_batches(r: _Run, first: int) -> Iterator[Any]:
    """Micro-batches from position ``first`` on, across epochs; deterministic in the position."""
    from ssd.data.loader import batches

    epoch, start = divmod(first, r.batches_per_epoch)
    rank, world = r.accelerator.process_index, r.accelerator.num_processes
    while True:
        loader = _loader(r, rank, world, epoch, start)
        # Loader workers are forked here. With SIGTERM/SIGINT blocked while they start, they
        # inherit the block and a preemption signal can't kill one mid-epoch; the training
        # process gets the pending signal as soon as the block is lifted.
        with _signals_blocked():
            started = iter(loader)
        yield from batches(started)  # workers stopped even when a bad sample ends the run
        epoch, start = epoch + 1, 0


@dataclass
class _StepResult:
    parts: dict[str, float]
    grad_norm: float
    skipped: bool
    stop: bool
    frames: int
    keys: list[str]


def _forward_loss(r: _Run, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The loss of one micro-batch; for a temporal model every frame of every clip counts."""
    if not r.temporal:
        logits, deltas = r.model(batch.images)
        return r.criterion(logits, deltas, batch.targets), None
    state, next_keys = None, None
    if r.carry is not None:  # the state the previous clip of each run ended with
        start_keys, next_keys = clip_keys(batch.video, batch.frames, batch.runs)
        zero = r.unwrapped.init_state(len(batch), r.accelerator.device)
        state, carried = r.carry.take(zero, start_keys)
        r.history["carried_clips"] = r.history.get("carried_clips", 0) + carried
    logits, deltas, end_state = r.model(batch.images, state)
    carried = (end_state, next_keys) if r.carry is not None else None
    return clip_loss(r.criterion, logits, deltas, batch.targets), carried


def _step(r: _Run, stream: Iterator[Any], stop: _StopFlag) -> _StepResult:
    """One optimiser step over ``grad_accum`` micro-batches; skipped (no update) if any loss is not finite."""
    accum, acc = r.cfg.optim.grad_accum, r.accelerator
    res = _StepResult({"loss": 0.0, "box_loss": 0.0, "class_loss": 0.0}, float("nan"), False, False, 0, [])
    for i in range(accum):
        t0 = time.perf_counter()
        batch = next(stream).to(acc.device)
        r.history["wait_seconds"] += time.perf_counter() - t0
        res.keys += batch.keys
        with contextlib.nullcontext() if i == accum - 1 else acc.no_sync(r.model):
            out, carried = _forward_loss(r, batch)
            flags = torch.tensor([0.0 if torch.isfinite(out["loss"]) else 1.0, float(stop.requested)], device=acc.device)
            flags = acc.reduce(flags, reduction="sum")  # every rank decides alike
            res.skipped = res.skipped or bool(flags[0] > 0)
            res.stop = res.stop or bool(flags[1] > 0)
            if carried is not None and not res.skipped:
                r.carry.put(*carried)
            if not res.skipped:
                acc.backward(out["loss"] / accum)
                for k in res.parts:
                    res.parts[k] += out[k].item() / accum
        res.frames += batch.images.shape[0] * (batch.images.shape[1] if r.temporal else 1)
    if not res.skipped:
        clip = r.cfg.optim.grad_clip if r.cfg.optim.grad_clip > 0 else float("inf")
        res.grad_norm = float(acc.clip_grad_norm_(r.model.parameters(), clip))
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return res


def _account(r: _Run, res: _StepResult) -> None:
    """Book a step's outcome in the history; stop the run after too many non-finite steps in a row."""
    h = r.history
    h["images"] += res.frames * r.accelerator.num_processes
    if not res.skipped:
        h["nonfinite_streak"] = 0
        h["losses"] = (h["losses"] + [res.parts["loss"]])[-50:]
        return
    h["nonfinite"] += 1
    h["nonfinite_streak"] = h.get("nonfinite_streak", 0) + 1
    log.warning("step %d: non-finite loss, step skipped (keys %s)", r.step, ", ".join(res.keys[:4]))
    if h["nonfinite_streak"] > r.cfg.max_nonfinite:
        raise StageError(
            f"step {r.step}: loss not finite for {h['nonfinite_streak']} consecutive steps; "
            f"last sample keys: {', '.join(res.keys[:8])}"
        )


def _loop(r: _Run) -> int:
    """Train from ``r.step`` to ``cfg.steps``; 0 when done, 75 when stopped by a signal (checkpoint saved)."""
    from tqdm.auto import tqdm

    cfg, main = r.cfg, r.accelerator.is_main_process
    progress = tqdm(total=cfg.steps, initial=r.step, disable=not main, desc=cfg.name, unit="step", dynamic_ncols=True)
    stream = _micro_batches(r, r.step * cfg.optim.grad_accum)
    window = {"t": time.perf_counter(), "images": 0}
    trace = open(_trace_path(r), "a") if cfg.trace else contextlib.nullcontext()
    with _StopFlag() as stop, trace, progress:
        t_start = time.perf_counter()
        while r.step < cfg.steps:
            r.model.train()
            if cfg.frozen_batchnorm:
                freeze_batchnorm(r.model)
            res = _step(r, stream, stop)
            lr = r.scheduler.get_last_lr()[0]
            r.scheduler.step()
            r.step += 1
            progress.update(1)
            _account(r, res)
            window["images"] += res.frames * r.accelerator.num_processes
            if cfg.trace:
                checksum = sum(float(p.detach().double().sum()) for p in r.unwrapped.parameters())
                trace.write(json.dumps({"step": r.step, "keys": res.keys, "checksum": checksum}) + "\n")
                trace.flush()
            if r.step % cfg.log_every == 0 or r.step == cfg.steps:
                elapsed = time.perf_counter() - window["t"]
                r.log.add({"step": r.step, **{k: round(v, 6) for k, v in res.parts.items()}, "lr": lr,
                           "grad_norm": round(res.grad_norm, 4),
                           "images_per_s": round(window["images"] / max(elapsed, 1e-9), 2)})
                progress.set_postfix(loss=f"{res.parts['loss']:.3f}", lr=f"{lr:.2e}")
                window = {"t": time.perf_counter(), "images": 0}
            if res.stop or (r.step % cfg.checkpoint_every == 0 and r.step < cfg.steps):
                r.history["train_seconds"] += time.perf_counter() - t_start
                _save_checkpoint(r)
                t_start = time.perf_counter()
                if res.stop:
                    log.warning("stopped at step %d; rerun the same command to resume", r.step)
                    return EXIT_PREEMPTED
        r.history["train_seconds"] += time.perf_counter() - t_start
    return 0


def _save_checkpoint(r: _Run) -> None:
    meta = {
        "fingerprint": r.fingerprint, "history": r.history, "world_size": r.accelerator.num_processes,
        "scheduler": r.scheduler.state_dict(), "log_rows": r.log.rows,
    }
    checkpoints.save_checkpoint(r.accelerator, r.paths.checkpoints, r.step, meta, r.cfg.keep_last)


def _finish(r: _Run) -> int:
    """Write the model file and the run's metrics (main process); remove the checkpoints.

    A SIGTERM or Ctrl-C meanwhile does not cut the writing short: the outputs are completed,
    a checkpoint of the finished state is kept instead of the checkpoints being removed, and
    the exit code is 75 (a rerun resumes at the last step and writes the outputs again).
    """
    with _StopFlag("writing the model file first, then a checkpoint") as stop:
        r.accelerator.wait_for_everyone()
        if r.accelerator.is_main_process:
            _write_outputs(r)
        flag = torch.tensor([float(stop.requested)], device=r.accelerator.device)
        if float(r.accelerator.reduce(flag, reduction="sum")) > 0:  # every rank decides alike
            _save_checkpoint(r)
            log.warning("stopped after writing %s; a rerun of the same command finishes at once", r.paths.model)
            return EXIT_PREEMPTED
        if r.accelerator.is_main_process and not r.cfg.keep_checkpoints:
            shutil.rmtree(r.paths.checkpoints, ignore_errors=True)
        r.accelerator.wait_for_everyone()
    return 0


def _write_outputs(r: _Run) -> None:
    """The model file and the metrics JSON (main process)."""
    h, seconds = r.history, max(r.history["train_seconds"], 1e-9)
    losses = h["losses"]
    summary = {
        "steps": r.step,
        "final_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "images_per_s": round(h["images"] / seconds, 2),
        "wall_time_s": round(h["train_seconds"], 2),
        "data_wait_fraction": round(h["wait_seconds"] / seconds, 4),
        "nonfinite_steps": h["nonfinite"],
        "world_size": r.accelerator.num_processes,
    }
    if r.carry is not None:  # clips (on this process) that started from the previous clip's state
        summary["carried_clips"] = h.get("carried_clips", 0)
    # How it ran (not metrics to compare): the precision in use, every process count it ran with.
    ran = {"mixed_precision": r.accelerator.mixed_precision, "world_sizes": h["world_sizes"]}
    save_model_file(r.paths.model, r.unwrapped, r.classes,
                    meta={"train_config": to_dict(r.cfg), "summary": summary, "ran": ran})
    atomic.write_json(r.paths.metrics, summary)
    log.info("wrote %s and %s: %s", r.paths.model, r.paths.metrics, summary)


def _trace_path(r: _Run) -> Path:
    """Debug trace of one process: sample keys and a weight checksum per step (started afresh at step 0)."""
    path = r.paths.logs / f"trace-rank{r.accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if r.step == 0:
        path.unlink(missing_ok=True)
    return path


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
        arch = cfg.arch(len(classes) + 1)
        if cfg.init_weights:
            source, _ = load_model_file(cfg.init_weights)
            # The weights were trained on their input convention: the new model takes it.
            arch["input_norm"] = source.input_norm.to_dict()
        model = build_model(arch, backbone_state_dict=backbone)
        if cfg.init_weights:
            report = load_matching(model, source.state_dict(), cfg.init_weights)
            if not report.loaded:
                raise StageError(f"{cfg.init_weights}: no weight matches the model's names and shapes")
            report.log()
        return model
    except (ModelFileError, ValueError) as e:
        raise StageError(f"model: {e}") from None


def _loader(r: _Run, rank: int, world: int, epoch: int, start: int):
    from ssd.data.loader import train_loader

    cfg = r.cfg
    return train_loader(
        r.shards,
        cfg.data.augment,
        image_size=r.unwrapped.image_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        epoch=epoch,
        batches_per_epoch=r.batches_per_epoch,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        start_batch=start,
        kind=cfg.data.kind,
        streams=cfg.data.streams,
        shuffle_buffer=cfg.data.shuffle_buffer,
        sequence_clips=cfg.data.sequence_clips,
        pin_memory=torch.cuda.is_available(),
        num_classes=len(r.classes),
    )


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several train sections)")
    parser.add_argument("--restart", action="store_true", help="discard checkpoints trained with other settings")
    args = parser.parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        section = choose_section(TrainConfig, params, args.section, "train", args.params)
        cfg = load_config(TrainConfig, params, section, args.overrides, args.params)
        return train(cfg, restart=args.restart)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
