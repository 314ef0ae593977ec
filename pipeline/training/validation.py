"""Validation while training: the evaluate stage's own code every ``validation.every`` steps,
the best model kept, and early stopping.

Every process evaluates its share of the validation split and the records of all processes
are gathered (:func:`pipeline.evaluate.gathered_records`), so every process computes the same
mAP, the one a one-process evaluation gives, and takes the same decisions (a new best model,
stopping early) without another collective.

What travels in a checkpoint: the figures in the run's history (``history["validation"]``) and
the best model's weights (``best.safetensors``), so a resumed run keeps its best model even after
DVC deleted the outputs of the interrupted stage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.datasets import Manifest
from pipeline.evaluate import gathered_records, resolve_mode
from pipeline.stage import StageError
from pipeline.train_config import ValidationConfig
from ssd.metrics import DetectionAccumulator
from ssd.postprocess import PostProcessor

log = logging.getLogger("pipeline.train")


@dataclass
class Validator:
    cfg: ValidationConfig
    shards: list[str]
    modes: list[tuple[str, str]]
    """(evaluation mode, loader kind) per resolved mode; the first picks the best model."""
    num_classes: int
    best_state: dict[str, torch.Tensor] | None = None
    """The best validated weights so far (on the CPU)."""

    @classmethod
    def of(cls, cfg: ValidationConfig, manifest: Manifest, temporal: bool) -> "Validator":
        shards = manifest.shard_paths(cfg.split)
        if manifest.count(cfg.split, "frames") == 0:
            raise StageError(f"{manifest.path}: validation.split {cfg.split!r} has no frames")
        modes: list[tuple[str, str]] = []
        for mode in cfg.modes:
            resolved = resolve_mode(mode, manifest, temporal)
            if resolved not in modes:
                modes.append(resolved)
        return cls(cfg, shards, modes, len(manifest.classes))

    @property
    def fields(self) -> tuple[str, ...]:
        """Columns of plots/val-{name}.csv: ``map`` (the first mode's), then ``map_<mode>`` for the others."""
        return ("step", "map", *(f"map_{mode}" for mode, _ in self.modes[1:]))

    def due(self, step: int, total: int) -> bool:
        return step % self.cfg.every == 0 or step == total

    @torch.no_grad()
    def evaluate(self, model: nn.Module, accelerator: Any) -> dict[str, float]:
        """``{"map": ..., "map_<mode>": ...}`` of ``model`` (call on every process; leaves it in eval mode)."""
        model.eval()
        postprocessor = PostProcessor(model.priors, self.cfg.postprocess).to(accelerator.device)
        out: dict[str, float] = {}
        for i, (mode, kind) in enumerate(self.modes):
            records = gathered_records(
                model, postprocessor, self.shards, accelerator, kind=kind, mode=mode,
                batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers, num_classes=self.num_classes,
            )
            value = DetectionAccumulator(records).voc(self.num_classes).map(self.cfg.metric == "voc07")
            out["map" if i == 0 else f"map_{mode}"] = round(value, 6) if math.isfinite(value) else value
        return out

    def record(self, history: dict[str, Any], step: int, maps: Mapping[str, float], model: nn.Module) -> bool:
        """Book a validation in ``history``; a better mAP than before keeps ``model``'s weights. Returns
        whether it was better."""
        v = history.setdefault("validation", {"best_map": None, "best_step": None, "since_best": 0})
        v["last"] = {"step": step, **maps}
        value = maps["map"]
        better = math.isfinite(value) and (v["best_map"] is None or value > v["best_map"])
        if better:
            v.update(best_map=value, best_step=step, since_best=0)
            self.best_state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
        else:
            v["since_best"] += 1
        return better

    def should_stop(self, history: Mapping[str, Any]) -> bool:
        """Whether ``patience`` validations in a row brought no better mAP."""
        v = history.get("validation", {})
        return bool(self.cfg.patience) and v.get("since_best", 0) >= self.cfg.patience

    def restore(self, history: Mapping[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
        """Take the best weights back from a checkpoint; StageError if its history names a best it lacks."""
        if history.get("validation", {}).get("best_step") is not None and best_state is None:
            raise StageError("the checkpoint records a best model but has no best.safetensors; delete it to "
                             "resume from the one before")
        self.best_state = best_state


def same_on_every_process(model: nn.Module, accelerator: Any) -> None:
    """Copy the main process's weights and buffers of ``model`` to the others.

    DDP keeps the parameters equal, not the batch-norm statistics: each process updates them
    from its own batches (DDP only sends the main process's before each forward), and an EMA
    averages each process's own. The main process's are the ones saved; every process must
    validate with them for the gathered figure to be that model's.
    """
    if accelerator.num_processes > 1:
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def validate(r: Any) -> bool:
    """Validate ``r.final`` at ``r.step``: log it, book it, keep it if best; returns whether to stop early
    (then booked as ``history["stopped_early"]``, so a resumed run stops too)."""
    t0 = time.perf_counter()
    same_on_every_process(r.final, r.accelerator)
    maps = r.validator.evaluate(r.final, r.accelerator)
    better = r.validator.record(r.history, r.step, maps, r.final)
    r.history["validation_seconds"] = r.history.get("validation_seconds", 0.0) + time.perf_counter() - t0
    r.log.add("val", {"step": r.step, **maps})
    v = r.history["validation"]
    if r.accelerator.is_main_process:
        others = "".join(f", {k} {x:.4f}" for k, x in maps.items() if k != "map")
        best = (" (best so far)" if better else " (no best yet)" if v["best_map"] is None
                else f" (best {v['best_map']:.4f} at step {v['best_step']})")
        log.info("step %d: validation %s mAP %.4f%s%s (%.1f s)", r.step, r.validator.cfg.metric.upper(), maps["map"],
                 others, best, time.perf_counter() - t0)
    stop = r.validator.should_stop(r.history)
    if stop:
        r.history["stopped_early"] = r.step
    if stop and r.step < r.cfg.steps:
        best = "none: every mAP was undefined" if v["best_map"] is None else f"{v['best_map']:.4f} at step {v['best_step']}"
        log.warning("step %d: no better validation mAP in %d validations: stopping early (best %s)",
                    r.step, r.validator.cfg.patience, best)
    return stop
