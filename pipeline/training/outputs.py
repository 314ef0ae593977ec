"""What a run writes: checkpoints while it trains, the model files and metrics when it is done."""

from __future__ import annotations

import copy
import logging
import shutil
from typing import Any

import torch

from pipeline import checkpoints
from pipeline.config import to_dict
from pipeline.training.setup import Run
from pipeline.training.signals import StopFlag
from ssd import atomic
from ssd.model_file import save_model_file

log = logging.getLogger("pipeline.train")

#: Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint.
EXIT_PREEMPTED = 75


def save_checkpoint(r: Run) -> None:
    """Every process: the state to resume from exactly (Accelerate's files, the EMA, the best model, meta.json)."""
    meta = {
        "fingerprint": r.fingerprint, "history": r.history, "world_size": r.accelerator.num_processes,
        "scheduler": r.scheduler.state_dict(), "log_rows": r.log.rows,
    }
    tensors = {}
    if r.ema is not None:
        tensors["ema"] = r.ema.state_dict()
    if r.validator is not None and r.validator.best_state is not None:
        tensors["best"] = r.validator.best_state
    # Each process's clip states waiting for their next clips (sequence mode): the resumed run
    # carries them on as the uninterrupted one does.
    local = {"carry": r.carry.state_dict()} if r.carry is not None else None
    checkpoints.save_checkpoint(r.accelerator, r.paths.checkpoints, r.step, meta, r.cfg.keep_last, tensors, local)


def finish(r: Run) -> int:
    """Write the model files and the run's metrics (main process); remove the checkpoints.

    A SIGTERM or Ctrl-C meanwhile does not cut the writing short: the outputs are completed,
    a checkpoint of the finished state is kept instead of the checkpoints being removed, and
    the exit code is 75 (a rerun resumes at the last step and writes the outputs again).
    """
    with StopFlag("writing the model file first, then a checkpoint") as stop:
        r.accelerator.wait_for_everyone()
        if r.accelerator.is_main_process:
            write_outputs(r)
        flag = torch.tensor([float(stop.requested)], device=r.accelerator.device)
        if float(r.accelerator.reduce(flag, reduction="sum")) > 0:  # every rank decides alike
            save_checkpoint(r)
            log.warning("stopped after writing %s; a rerun of the same command finishes at once", r.paths.model)
            return EXIT_PREEMPTED
        if r.accelerator.is_main_process and not r.cfg.keep_checkpoints:
            shutil.rmtree(r.paths.checkpoints, ignore_errors=True)
        r.accelerator.wait_for_everyone()
    return 0


def summary(r: Run) -> dict[str, Any]:
    """The run's metrics (numbers that compare runs)."""
    h, seconds = r.history, max(r.history["train_seconds"], 1e-9)
    losses = h["losses"]
    out: dict[str, Any] = {
        "steps": r.step,
        "final_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "images_per_s": round(h["images"] / seconds, 2),
        "wall_time_s": round(h["train_seconds"], 2),
        "data_wait_fraction": round(h["wait_seconds"] / seconds, 4),
        "nonfinite_steps": h["nonfinite"],
        "world_size": r.accelerator.num_processes,
    }
    if r.carry is not None:  # clips (of every process) that started from the previous clip's state
        out["carried_clips"] = h.get("carried_clips", 0)
    v = h.get("validation")
    if v is not None:
        out["val"] = {**{k: x for k, x in v["last"].items() if k != "step"},
                      "best_map": v["best_map"], "best_step": v["best_step"],
                      "seconds": round(h.get("validation_seconds", 0.0), 2)}
    return out


def write_outputs(r: Run) -> None:
    """The model file (the EMA's weights when enabled), the best model file when validating, and
    the metrics JSON (main process)."""
    numbers = summary(r)
    # How it ran (not metrics to compare): the precision in use, every process count it ran with.
    ran = {"mixed_precision": r.accelerator.mixed_precision, "world_sizes": r.history["world_sizes"],
           "ema": r.ema is not None}
    meta = {"train_config": to_dict(r.cfg), "summary": numbers, "ran": ran}
    save_model_file(r.paths.model, r.final, r.classes, meta=meta)
    written = [str(r.paths.model)]
    if r.validator is not None:
        best = copy.deepcopy(r.final)
        if r.validator.best_state is not None:
            best.load_state_dict(r.validator.best_state)
        else:
            log.warning("no validation gave a finite mAP (does %r hold any object?): %s is the last model",
                        r.validator.cfg.split, r.paths.best_model)
        v = r.history.get("validation", {})
        save_model_file(r.paths.best_model, best, r.classes,
                        meta={**meta, "best": {"step": v.get("best_step"), "map": v.get("best_map")}})
        written.append(str(r.paths.best_model))
    atomic.write_json(r.paths.metrics, numbers)
    log.info("wrote %s and %s: %s", " and ".join(written), r.paths.metrics, numbers)
