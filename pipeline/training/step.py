"""One optimiser step: ``grad_accum`` micro-batches, frames and clips through the same code."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from pipeline.stage import StageError
from pipeline.training.setup import LOSS_PARTS, Run, loss_parts
from pipeline.training.signals import StopFlag
from ssd.clip_loss import clip_loss
from ssd.distill import distillation_loss
from ssd.state_carry import clip_keys

log = logging.getLogger("pipeline.train")


@dataclass
class StepResult:
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_PARTS, 0.0))
    grad_norm: float = float("nan")
    skipped: bool = False
    """A loss was not finite on some process: no update on any."""
    stop: bool = False
    """A stop signal arrived on some process."""
    frames: int = 0
    keys: list[str] = field(default_factory=list)
    carried: int = 0
    """Clips of this process that started from a carried state."""
    job_parts: dict[str, float] = field(default_factory=dict)
    """``parts`` averaged over the processes (each has its own micro-batches): what is logged."""
    job_carried: int = 0
    """``carried`` summed over the processes."""


def forward_loss(r: Run, batch: Any) -> tuple[dict[str, torch.Tensor], Any, int]:
    """The loss of one micro-batch, the end states to carry (None unless clips carry state) and
    the number of its clips that started from a carried state.

    Frames: one image per sample. Clips: ``images [B, T, 3, H, W]``, every frame's loss counts
    (:func:`ssd.clip_loss.clip_loss`); with ``sequence_clips`` each clip starts from the state
    the previous clip of its run ended with.
    """
    if not r.temporal:
        logits, deltas = r.model(batch.images)
        out = r.criterion(logits, deltas, batch.targets)
        if r.teacher is not None:
            with torch.no_grad():
                taught = r.teacher(batch.images)
            kd = distillation_loss((logits, deltas), taught, r.cfg.distill)
            out = {**out, **kd, "loss": out["loss"] + kd["distill_loss"]}
        return out, None, 0
    state, next_keys, carried = None, None, 0
    if r.carry is not None:  # the state the previous clip of each run ended with
        start_keys, next_keys = clip_keys(batch.video, batch.frames, batch.runs)
        zero = r.unwrapped.init_state(len(batch), r.accelerator.device)
        state, carried = r.carry.take(zero, start_keys)
    logits, deltas, end_state = r.model(batch.images, state)
    ends = (end_state, next_keys) if r.carry is not None else None
    return clip_loss(r.criterion, logits, deltas, batch.targets), ends, carried


def step(r: Run, stream: Iterator[Any], stop: StopFlag) -> StepResult:
    """One optimiser step over ``grad_accum`` micro-batches; skipped (no update) if any loss is not
    finite on any process. The EMA follows every update."""
    accum, acc = r.cfg.optim.grad_accum, r.accelerator
    res = StepResult(parts=dict.fromkeys(loss_parts(r.cfg), 0.0))
    for i in range(accum):
        t0 = time.perf_counter()
        batch = next(stream).to(acc.device, non_blocking=True)  # from pinned memory on a GPU
        if r.colour is not None:  # the colour change the workers drew, made on the device
            batch.images = r.colour(batch.images, batch.targets)
        if r.cfg.channels_last and batch.images.ndim == 4:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        r.history["wait_seconds"] += time.perf_counter() - t0
        res.keys += batch.keys
        with contextlib.nullcontext() if i == accum - 1 else acc.no_sync(r.model):
            out, ends, carried = forward_loss(r, batch)
            res.carried += carried
            flags = torch.tensor([0.0 if torch.isfinite(out["loss"]) else 1.0, float(stop.requested)], device=acc.device)
            flags = acc.reduce(flags, reduction="sum")  # every rank decides alike
            res.skipped = res.skipped or bool(flags[0] > 0)
            res.stop = res.stop or bool(flags[1] > 0)
            if ends is not None and not res.skipped:
                r.carry.put(*ends)
            if not res.skipped:
                acc.backward(out["loss"] / accum)
                for k in res.parts:
                    res.parts[k] += out[k].item() / accum
        res.frames += batch.images.shape[0] * (batch.images.shape[1] if r.temporal else 1)
    if not res.skipped:
        clip = r.cfg.optim.grad_clip if r.cfg.optim.grad_clip > 0 else float("inf")
        # The norm of what this step trains: a backbone frozen by a zero learning rate
        # (freeze_backbone_steps) still has gradients, and counted in they set the norm (x1000 on
        # a tiny model) and scaled the trained layers' gradients down by as much.
        # In the model's order, as before: the norm's sum (and so every clipped step) stays bit-identical.
        moving = {id(p) for g in r.optimizer.param_groups if g["lr"] > 0 for p in g["params"]}
        res.grad_norm = float(acc.clip_grad_norm_([p for p in r.model.parameters() if id(p) in moving], clip))
        r.optimizer.step()
        # fp16: the loss scaler skips the update when the scaled gradients overflow; the EMA
        # must not average the unchanged weights in as if they were a step
        if r.ema is not None and not acc.optimizer_step_was_skipped:
            r.ema.update_parameters(r.unwrapped)
    r.optimizer.zero_grad(set_to_none=True)
    if res.skipped:  # no loss was learnt from: logged as NaN, never as the 0.0 the parts started at
        res.parts = dict.fromkeys(res.parts, float("nan"))
    _over_the_job(r, res)
    return res


def _over_the_job(r: Run, res: StepResult) -> None:
    """The step's figures over every process, once per step (every process calls it): the mean
    loss parts and the clips carried. The history keeps these, so the metrics' final_loss is the
    job's, not process 0's share alone, and a resume (which restores process 0's history on every
    process) continues the same numbers."""
    if r.accelerator.num_processes == 1:
        res.job_parts, res.job_carried = dict(res.parts), res.carried
        return
    values = torch.tensor([*res.parts.values(), float(res.carried)], dtype=torch.float64, device=r.accelerator.device)
    total = r.accelerator.reduce(values, reduction="sum").tolist()
    res.job_parts = {k: v / r.accelerator.num_processes for k, v in zip(res.parts, total)}
    res.job_carried = round(total[-1])


def account(r: Run, res: StepResult) -> None:
    """Book a step's outcome in the history; stop the run after too many non-finite steps in a row."""
    h = r.history
    h["images"] += res.frames * r.accelerator.num_processes
    if r.carry is not None:
        h["carried_clips"] = h.get("carried_clips", 0) + res.job_carried
    if not res.skipped:
        h["nonfinite_streak"] = 0
        h["losses"] = (h["losses"] + [res.job_parts["loss"]])[-50:]
        return
    h["nonfinite"] += 1
    h["nonfinite_streak"] = h.get("nonfinite_streak", 0) + 1
    log.warning("step %d: non-finite loss, step skipped (keys %s)", r.step, ", ".join(res.keys[:4]))
    if h["nonfinite_streak"] > r.cfg.max_nonfinite:
        raise StageError(
            f"step {r.step}: loss not finite for {h['nonfinite_streak']} consecutive steps; "
            f"last sample keys: {', '.join(res.keys[:8])}"
        )
