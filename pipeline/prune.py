"""Prune a trained detector: remove channels for real, fine-tune, and measure what it bought.

Usage::

    python -m pipeline.prune [--section prune] [--set pruning.ratio=0.3 ...] [--restart]

The ``--section`` of the params file (needed when it has several prune sections) is
parsed into a frozen :class:`~pipeline.prune_config.PruneStageConfig`. Steps, on the model file ``model``:

1. measure it (parameters, multiply-adds, CPU latency) and evaluate it;
2. prune it (:func:`ssd.pruning.prune_model`: L1-norm filter pruning that removes
   channels, their batch norms and every consumer of them), measure and evaluate it;
3. the control (``finetune.control``, on by default): fine-tune the *unpruned* model through
   the training stage's own code (:func:`pipeline.train.train`) for ``finetune.steps`` steps
   and evaluate it, so that the pruned model is compared with a model that got the same extra
   training, not with one that got none;
4. fine-tune the pruned model the same way (steps, data, optimiser, seed; ``model.from_file``
   set to the pruned model file) and evaluate it again. With ``finetune.distill`` it also
   learns from a teacher's outputs (:mod:`ssd.distill`): the fine-tuned control by default.

Outputs (``{name}``: the config's ``name``, by default the input file's stem):

- ``models/{name}-pruned.pt``: the pruned, fine-tuned model file; it loads with
  :func:`ssd.model_file.load_model_file` like any other (its ``arch`` records the
  pruned widths);
- ``metrics/prune-{name}.json``: numbers only: parameters, multiply-adds and CPU forward
  times (``cpu_forward``: medians of ``latency.runs`` forwards at batch 1 and at
  ``latency.batch``, the unpruned and the pruned model timed alternately) before and
  after, and mAP (``evaluate.voc_metric``) before pruning, after pruning, after
  fine-tuning, of the control and ``finetuned_minus_control`` (what pruning cost). The settings behind them (source model, ratio, mode, device, threads) are
  in the model file's ``meta["prune_run"]``.

Scratch, not outputs: ``runs/{name}-pruned/prune/`` (the pruned model before
fine-tuning, the control's model file, the evaluations' own files), the fine-tunings'
TensorBoard logs in ``runs/{name}-pruned/`` and ``runs/{name}-control/``, their checkpoints
in ``checkpoints/`` under the same names.

Preemption: fine-tuning stops like training does (exit code 75); running the
stage again prunes again (deterministic: the same model) and resumes the
fine-tuning from its last checkpoint.

One process: the stage evaluates, fine-tunes and evaluates again in the same
process (fine-tuning a pruned model is short), so it refuses to run under a
multi-process launcher.

Exit codes: 0 done, 2 bad configuration or input, 75 preempted (rerun to resume).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.bench.latency import cpu_latency_ms
from pipeline.config import check_name_follows_model, choose_section, load_config, load_params, to_dict
from pipeline.device import reset_accelerate
from pipeline.prune_config import LatencyConfig, PruneDistill, PruneStageConfig
from pipeline.dvc_inputs import check_name_follows_model_under_dvc, check_tracked
from pipeline.stage import StageError, arg_parser, check_writable, run
from ssd import atomic
from ssd.model_file import ModelFileError, load_model_file, save_model_file
from ssd.pruning import count_macs_params, prune_model

log = logging.getLogger("pipeline.prune")


def _cost(model: nn.Module, image_size: int) -> dict[str, int]:
    macs, params = count_macs_params(model, image_size)
    return {"params": params, "macs": macs}


def _speed(before: nn.Module, after: nn.Module, image_size: int, cfg: LatencyConfig) -> dict[str, Any]:
    """Forward times of the unpruned and the pruned model at batch 1 and at ``cfg.batch``."""
    out: dict[str, Any] = {"threads": cfg.threads or torch.get_num_threads(), "runs": cfg.runs}
    for key, batch in (("batch_1", 1), (f"batch_{cfg.batch}", cfg.batch)):
        if key in out:
            continue
        t_before, t_after = cpu_latency_ms((before, after), image_size, batch, cfg.runs, cfg.warmup, cfg.threads)
        out[key] = {"before_ms": round(t_before, 3), "after_ms": round(t_after, 3), "speedup": round(t_before / t_after, 3)}
    return out


def _evaluate(cfg: PruneStageConfig, model_path: Path, name: str, work: Path) -> dict[str, Any] | None:
    """The evaluate stage's metrics of ``model_path`` (its own files go to ``work``); None if disabled."""
    if not cfg.evaluate.enabled:
        return None
    from pipeline.evaluate import EvaluateConfig, evaluate

    e = cfg.evaluate
    ecfg = EvaluateConfig(
        model=str(model_path), shards=e.shards, split=e.split, name=name, mode=e.mode,
        batch_size=e.batch_size, num_workers=e.num_workers, postprocess=e.postprocess,
        voc_metric=e.voc_metric, examples=0,
        metrics_dir=str(work), plots_dir=str(work), reports_dir=str(work), runs_dir=str(work),
    )
    reset_accelerate()
    return evaluate(ecfg)


def _finetune(
    cfg: PruneStageConfig, model_path: Path, image_size: int, train_name: str, work: Path, restart: bool,
    teacher: str | None,
) -> int:
    """Fine-tune a model file with the training stage's code (distilling ``teacher`` if given); the
    result goes to ``work/{train_name}.pt``."""
    from pipeline.train import train
    from pipeline.train_config import DistillConfig, ModelConfig, TrainConfig

    f = cfg.finetune
    tcfg = TrainConfig(
        name=train_name,
        # The architecture, pruned widths included, and the weights come from the file; the
        # image size is the file's (the loader reads it from here).
        model=ModelConfig(from_file=str(model_path), image_size=image_size),
        data=f.data, optim=f.optim, loss=f.loss, steps=f.steps, seed=f.seed,
        distill=DistillConfig(teacher=teacher, **_weights(f.distill)) if teacher and f.distill else DistillConfig(),
        mixed_precision=f.mixed_precision, channels_last=f.channels_last, frozen_batchnorm=bool(f.frozen_batchnorm),
        checkpoint_every=f.checkpoint_every, log_every=f.log_every,
        models_dir=str(work), metrics_dir=str(work), plots_dir=str(work),
        runs_dir=cfg.runs_dir, checkpoints_dir=cfg.checkpoints_dir,
    )
    reset_accelerate()
    return train(tcfg, restart=restart)


def _as_trained(cfg: PruneStageConfig, info: dict[str, Any]) -> PruneStageConfig:
    """``finetune.frozen_batchnorm: null`` resolved to the source model's training setting."""
    if cfg.finetune.frozen_batchnorm is not None:
        return cfg
    meta = info.get("meta") or {}
    # A pruned model's own fine-tuning settings are under meta.finetune.
    trained = meta.get("train_config") or (meta.get("finetune") or {}).get("train_config") or {}
    frozen = bool(trained.get("frozen_batchnorm", False))
    if frozen:
        log.info("fine-tuning with frozen batch norm statistics, as %s was trained", cfg.model)
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, frozen_batchnorm=frozen))


def _weights(distill: PruneDistill) -> dict[str, Any]:
    return {k: v for k, v in to_dict(distill).items() if k != "teacher"}


def _map(metrics: dict[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        if metrics is None:
            return None
        metrics = metrics.get(key)  # type: ignore[assignment]
    return metrics  # type: ignore[return-value]


def _change(before: float, after: float) -> float:
    return round(1.0 - after / before, 4) if before else 0.0


def _log_cut(result: Any, before: dict[str, int], after: dict[str, int], speed: dict[str, Any], batch: int) -> None:
    big = speed[f"batch_{batch}"]
    log.info(
        "pruned %d of %d channels: %d parameters (-%.0f%%), %d multiply-adds (-%.0f%%); CPU forward "
        "%.2f -> %.2f ms at batch 1 (%.2fx), %.1f -> %.1f ms at batch %d (%.2fx)",
        result.channels_before - result.channels_after, result.channels_before,
        after["params"], 100 * _change(before["params"], after["params"]),
        after["macs"], 100 * _change(before["macs"], after["macs"]),
        speed["batch_1"]["before_ms"], speed["batch_1"]["after_ms"], speed["batch_1"]["speedup"],
        big["before_ms"], big["after_ms"], batch, big["speedup"],
    )


def _tuned(
    cfg: PruneStageConfig, source: Path, size: int, train_name: str, work: Path, restart: bool,
    teacher: str | None = None,
) -> tuple[int, nn.Module | None, dict[str, Any] | None, dict[str, Any] | None]:
    """Fine-tune ``source`` as ``train_name`` and evaluate it: (exit code, model, its file info,
    its evaluation); the exit code is 75 when a signal stopped the fine-tuning (a rerun resumes)."""
    code = _finetune(cfg, source, size, train_name, work, restart, teacher)
    if code:
        return code, None, None, None
    path = work / f"{train_name}.pt"
    try:
        model, info = load_model_file(path)
    except ModelFileError as e:
        raise StageError(str(e)) from None
    return 0, model, info, _evaluate(cfg, path, train_name, work)


def _metrics(
    result: Any, costs: tuple[dict[str, int], dict[str, int]], speed: dict[str, Any],
    evals: dict[str, dict[str, Any] | None], seconds: float,
) -> dict[str, Any]:
    """The metrics file: numbers only. ``evals``: before, pruned, finetuned, control."""
    before, after = costs
    out: dict[str, Any] = {
        "channels": {"before": result.channels_before, "after": result.channels_after},
        **{key: {"before": before[key], "after": after[key], "reduction": _change(before[key], after[key])}
           for key in ("params", "macs")},
        "cpu_forward": {k: v for k, v in speed.items() if k.startswith("batch_")},
    }
    for out_key, keys in (("map_voc", ("map_voc",)), ("coco_map_50", ("coco", "map_50"))):
        out[out_key] = {stage: _map(e, *keys) for stage, e in evals.items()}
        tuned, control = out[out_key]["finetuned"], out[out_key]["control"]
        # pruned and fine-tuned minus unpruned and fine-tuned alike: what pruning cost (negative: lost)
        out[out_key]["finetuned_minus_control"] = (
            None if tuned is None or control is None else round(tuned - control, 6))
    out["wall_time_s"] = round(seconds, 2)
    return out


def prune(cfg: PruneStageConfig, restart: bool = False) -> int:
    """Run the stage as ``cfg`` says; returns the exit code."""
    t_start = time.perf_counter()
    name = cfg.name or Path(cfg.model).stem
    train_name = f"{name}-pruned"
    out_model = Path(cfg.models_dir) / f"{train_name}.pt"
    out_metrics = Path(cfg.metrics_dir) / f"prune-{name}.json"
    work = Path(cfg.runs_dir) / train_name / "prune"
    check_writable(cfg.models_dir, cfg.metrics_dir, cfg.runs_dir, cfg.checkpoints_dir)
    if out_model.resolve() == Path(cfg.model).resolve():
        raise StageError(f"prune.name: the pruned model would be written over its source {cfg.model}; choose another "
                         "name")

    model, info = load_model_file(cfg.model)  # a bad file: InputError, one line from stage.run
    classes, size = list(info["class_names"]), int(info["image_size"])
    cfg = _as_trained(cfg, info)

    cost_before = _cost(model, size)
    log.info("%s: %d parameters, %d multiply-adds", cfg.model, cost_before["params"], cost_before["macs"])
    unpruned = copy.deepcopy(model)
    evals = {"before": _evaluate(cfg, Path(cfg.model), f"{name}-unpruned", work)}

    try:
        result = prune_model(model, cfg.pruning)
    except ValueError as e:
        raise StageError(f"{cfg.model}: {e}") from None
    cost_after = _cost(model, size)
    speed = _speed(unpruned, model, size, cfg.latency)
    del unpruned
    _log_cut(result, cost_before, cost_after, speed, cfg.latency.batch)
    meta: dict[str, Any] = {
        "source_model": cfg.model,
        "pruning": {
            **to_dict(cfg.pruning),
            "channels_before": result.channels_before,
            "channels_after": result.channels_after,
            "groups": {k: list(v) for k, v in result.groups.items()},
        },
    }
    pruned_path = work / f"{name}-pruned-only.pt"
    save_model_file(pruned_path, model, classes, meta=meta)
    evals["pruned"] = _evaluate(cfg, pruned_path, f"{name}-pruned-only", work)
    evals["finetuned"] = evals["control"] = None
    if cfg.finetune.steps > 0:
        distill = cfg.finetune.distill
        teacher = cfg.model if distill and distill.teacher == "source" else None
        if cfg.finetune.control:
            # The control first: it may be the teacher. A rerun after a preemption of the pruned
            # model's fine-tuning fine-tunes the control again (the same file: deterministic).
            control = f"{name}-control"
            code, _, _, evals["control"] = _tuned(cfg, Path(cfg.model), size, control, work, restart, teacher)
            if code:
                return code
            if distill and distill.teacher == "control":
                teacher = str(work / f"{control}.pt")
        code, tuned_model, tuned, evals["finetuned"] = _tuned(cfg, pruned_path, size, train_name, work, restart, teacher)
        if code:
            return code  # preempted: the checkpoint is saved, a rerun resumes
        model, meta["finetune"] = tuned_model, tuned["meta"]

    # Numbers that compare runs go to the metrics file; the settings that produced them (the
    # ratio, the mode, which mAP, the device) to the model file's meta, not to `dvc metrics`.
    meta["prune_run"] = {
        "model": cfg.model, "ratio": cfg.pruning.ratio, "mode": cfg.pruning.mode,
        "map_voc_metric": cfg.evaluate.voc_metric, "finetune_steps": cfg.finetune.steps, "image_size": size,
        "control": cfg.finetune.control and cfg.finetune.steps > 0,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "latency": {"threads": speed.get("threads"), "runs": speed.get("runs")},
    }
    save_model_file(out_model, model, classes, meta=meta)
    metrics = _metrics(result, (cost_before, cost_after), speed, evals, time.perf_counter() - t_start)
    atomic.write_json(out_metrics, metrics)
    if metrics["map_voc"]["finetuned_minus_control"] is not None:
        log.info("VOC mAP: unpruned %.4f; fine-tuned %d steps: pruned %.4f, unpruned (control) %.4f",
                 metrics["map_voc"]["before"], cfg.finetune.steps, metrics["map_voc"]["finetuned"],
                 metrics["map_voc"]["control"])
    log.info("wrote %s and %s", out_model, out_metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several prune sections)")
    parser.add_argument("--restart", action="store_true", help="discard fine-tuning checkpoints of another config")
    args = parser.parse_args(argv)

    def body() -> int:
        # faster_coco_eval prints its whole summary table at INFO; the evaluate log line says enough.
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise StageError("the prune stage runs as one process: python -m pipeline.prune")
        params = load_params(args.params)
        section = choose_section(PruneStageConfig, params, args.section, "prune", args.params)
        check_name_follows_model(params.get(section), args.overrides)
        cfg = load_config(PruneStageConfig, params, section, args.overrides, args.params)
        check_name_follows_model_under_dvc(cfg.name, cfg.model, section)
        check_tracked(cfg, section)
        return prune(cfg, restart=args.restart)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
