"""The training loop: steps until ``cfg.steps`` (or early stopping), with logging, validation
and checkpoints between them, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.training.outputs import EXIT_PREEMPTED, save_checkpoint
from pipeline.training.progress import Progress
from pipeline.training.setup import Run
from pipeline.training.stream import micro_batches
from pipeline.training.signals import StopFlag
from pipeline.training.step import StepResult, account, step
from pipeline.training.validation import validate
from ssd import atomic
from ssd.optim import lr_factor
from ssd.models.ssd import freeze_batchnorm

log = logging.getLogger("pipeline.train")


class _Rate:
    """Images per second over the steps since the last logged row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t, self.images = time.perf_counter(), 0

    def per_s(self) -> float:
        return round(self.images / max(time.perf_counter() - self.t, 1e-9), 2)


def loop(r: Run, stop: StopFlag) -> int:
    """Train from ``r.step`` to ``cfg.steps``; 0 when done (or stopped early), 75 when stopped by a
    signal (``stop``, entered by the caller; a checkpoint saved)."""
    cfg, main = r.cfg, r.accelerator.is_main_process
    if r.history.get("stopped_early") or _catch_up_validation(r):
        return 0
    # Closed on every way out: the loader workers run with SIGTERM blocked (stream.py), so after an
    # uncaught error, workers left to the interpreter's exit could not be terminated: a hang.
    batches = contextlib.closing(micro_batches(r, r.step * cfg.optim.grad_accum))
    rate = _Rate()
    schedule = lr_factor(cfg.optim, cfg.steps)  # the factor of the logged rate (group 0's may be scaled)
    trace = open(_trace_path(r), "a") if cfg.trace else contextlib.nullcontext()
    progress = Progress(cfg.name, cfg.steps, r.step, enabled=main)
    with batches as stream, trace, progress:
        t_start = time.perf_counter()
        while r.step < cfg.steps:
            r.model.train()
            if cfg.frozen_batchnorm:
                freeze_batchnorm(r.model)
            elif r.step < cfg.freeze_backbone_steps:  # a frozen backbone keeps its statistics too
                freeze_batchnorm(r.unwrapped.backbone)
            res = step(r, stream, stop)
            lr = cfg.optim.lr * schedule(r.step)  # optim.lr as scheduled, whatever lr_factors scale
            r.scheduler.step()
            r.step += 1
            progress.update(r.step)
            account(r, res)
            rate.images += res.frames * r.accelerator.num_processes
            if cfg.trace:
                _trace(r, res, trace)
            if r.step % cfg.log_every == 0 or r.step == cfg.steps:
                _log_row(r, res, lr, rate.per_s(), progress)
                rate.reset()
            r.history["train_seconds"] += time.perf_counter() - t_start
            paused, images_per_s = time.perf_counter(), rate.per_s()
            # A stop signal saves first (a spot notice is short); the resumed run validates this step.
            early = not res.stop and r.validator is not None and r.validator.due(r.step, cfg.steps) and validate(r)
            if early and r.step % cfg.log_every and r.step != cfg.steps:  # the curves end where the model does
                _log_row(r, res, lr, images_per_s, progress)
            if res.stop or (r.step % cfg.checkpoint_every == 0 and r.step < cfg.steps and not early):
                save_checkpoint(r)
                if res.stop:
                    log.warning("stopped at step %d; rerun the same command to resume", r.step)
                    return EXIT_PREEMPTED
            if early:
                return 0
            t_start = time.perf_counter()
            rate.t += t_start - paused  # images_per_s is training's rate, as the metrics' is
    return 0


def _catch_up_validation(r: Run) -> bool:
    """Validate at the resume step if a stop signal came before its due validation; True: stop early."""
    if r.validator is None or r.step == 0 or not r.validator.due(r.step, r.cfg.steps):
        return False
    if r.history.get("validation", {}).get("last", {}).get("step") == r.step:
        return False
    return validate(r)


def _log_row(r: Run, res: StepResult, lr: float, images_per_s: float, progress: Progress) -> None:
    row = {"step": r.step, **{k: round(v, 6) for k, v in res.job_parts.items()}, "lr": lr,
           "grad_norm": round(res.grad_norm, 4), "images_per_s": images_per_s}
    r.log.add("train", row)
    progress.logged(row)


def _trace(r: Run, res: StepResult, trace: Any) -> None:
    checksum = sum(float(p.detach().double().sum()) for p in r.unwrapped.parameters())
    trace.write(json.dumps({"step": r.step, "keys": res.keys, "checksum": checksum, "loss": res.parts["loss"],
                            "carried": res.carried}) + "\n")
    trace.flush()


def _trace_path(r: Run) -> Path:
    """Debug trace of one process: sample keys and a weight checksum per step (started afresh at
    step 0; on a resume, cut back to the checkpoint's step: a kill after a checkpoint left the
    steps after it, which the resumed run then wrote again)."""
    path = r.paths.logs / f"trace-rank{r.accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if r.step == 0:
        path.unlink(missing_ok=True)
    elif path.exists():
        rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if _trace_step(row) <= r.step]
        if len(kept) < len(rows):
            atomic.write_text(path, "".join(kept))
    return path


def _trace_step(row: str) -> float:
    try:
        return float(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by the kill
        return float("inf")
