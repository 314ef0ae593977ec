"""Resuming a training run from its newest checkpoint: :func:`resume_run`.

The checkpoint must have been written by a run of the same settings (its fingerprint,
:mod:`pipeline.resume`); with ``--restart`` one that wasn't is discarded. The model,
optimiser, scheduler, EMA, validation's best model, history and (on the same process count)
LSTM carry states come back, and the learning rate follows the schedule as now configured.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoints, resume
from pipeline.stage import StageError
from pipeline.training.setup import Run

log = logging.getLogger("pipeline.train")


def _checkpoint_to_resume(r: Run, restart: bool) -> tuple[Path, dict[str, Any]] | None:
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


def resume_run(r: Run, restart: bool) -> dict[str, list[dict[str, Any]]]:
    """Load the newest matching checkpoint into ``r`` (if any); returns the logged rows it carries."""
    found = _checkpoint_to_resume(r, restart)
    if r.accelerator.is_main_process:
        checkpoints.remove_incomplete(r.paths.checkpoints)
    if found is None:
        return {}
    latest, meta = found
    _load_state(r.accelerator, latest, r.paths.checkpoints)
    r.scheduler.load_state_dict(meta["scheduler"])
    _follow_schedule(r.scheduler)
    r.step, r.history = meta["step"], meta["history"]
    if r.ema is not None:
        r.ema.load_state_dict(_tensors(latest, "ema"))
    if r.validator is not None:
        r.validator.restore(r.history, checkpoints.load_tensors(latest, "best"))
    world = r.accelerator.num_processes
    carried = checkpoints.load_tensors(latest, f"carry-rank{r.accelerator.process_index}")
    if r.carry is not None and carried is not None and meta.get("world_size") == world:
        r.carry.load_state_dict(carried)
    if meta.get("world_size") != world:
        log.warning("%s was written by %s processes, now %s: the global batch and the data order differ from an "
                    "uninterrupted run, and the epoch position is recomputed for the new epoch length, so part "
                    "of this epoch's pass is skipped or repeated (and any carried LSTM states are dropped)",
                    latest, meta.get("world_size"), world)
    log.info("resumed from %s at step %d", latest, r.step)
    return meta.get("log_rows", {})


def _follow_schedule(scheduler: Any) -> None:
    """Give the optimiser this step's learning rate under the schedule as now configured.

    LambdaLR recomputes it only at its next ``step()``; until then the optimiser holds the
    checkpoint's, which came from the old total when ``steps`` changed (a resume-safe key)."""
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def _tensors(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    state = checkpoints.load_tensors(checkpoint, name)
    if state is None:
        raise StageError(f"{checkpoint}: {name}.safetensors is missing; delete the checkpoint to resume from the one before")
    return state


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
