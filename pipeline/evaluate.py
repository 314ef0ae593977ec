"""Evaluate a detector: a model file and validation shards in, metrics and pictures out.

Usage::

    python -m pipeline.evaluate --section evaluate [--set model=models/other.pt ...]
    accelerate launch --multi_gpu --num_processes 2 -m pipeline.evaluate --section evaluate   # split across processes

The ``--section`` of the params file (needed when it has several evaluate sections) is
parsed into a frozen :class:`EvaluateConfig`. The model file (:mod:`ssd.model_file`) must have been trained
on the classes of the shards' manifest, in the same order; another model is refused
with a one-line error (exit code 2). Outputs (``{name}``: the config's ``name``, by
default the model file's stem):

- ``metrics/eval-{name}.json``: Pascal VOC mAP and per-class AP (VOC2007 11-point and
  VOC2010+ area, IoU > 0.5, :mod:`ssd.metrics`), COCO metrics from torchmetrics
  (mAP@[.5:.95], AP50, AP75, small/medium/large, AR) under ``coco``, images evaluated,
  images/s, the evaluation mode;
- ``plots/pr-{name}.csv``: precision-recall points of every class (columns class,
  recall, precision), and the same per class as ``plots/pr-{name}/{class}.csv`` (what
  ``dvc plots show`` draws: one chart per class);
- ``reports/{name}/``: example images with ground truth (green) and predictions
  scored at least ``draw_threshold`` (magenta), also logged to TensorBoard in
  ``runs/{name}-eval/``.

VOC AP and COCO AP50 are different definitions (see :mod:`ssd.metrics`): they are
reported under separate names and never as one number. Difficult boxes count as
no positive in both: VOC ignores detections matched to them, COCO receives them as
``iscrowd`` boxes, which it ignores in the same way (with its own crowd matching).

Modes (``mode``):

- ``frames`` (frame shards): every image on its own;
- ``video`` (clip shards, temporal models: LSTM-SSD): each distinct frame once, in
  (video, frame number) order, fed one at a time with the recurrent state carried
  from frame to frame and reset at the first frame of every video and after any
  gap in the frame numbers;
- ``per_frame`` (clip shards): the same frames, each on its own (a temporal model
  starts from a fresh state at every frame: its memory switched off, for comparison);
- ``auto``: ``frames`` on frame shards; on clip shards ``video`` for a temporal
  model and ``per_frame`` otherwise.

Processes. Under ``accelerate launch`` each process evaluates its share of the
samples (:func:`ssd.data.loader.eval_loader` with its rank; whole videos per rank
for clip shards), keeps its results as per-image records in original-image pixels,
and after its loop the records of all ranks are gathered once (ranks have different
batch counts, so nothing is collective inside the loop). The main process computes
every metric from the records sorted by sample key: one and several processes give
the same numbers as long as the model gives the same outputs per image (a model's
float results can differ in the last bits with the batch it is computed in; that
changes nothing unless two scores tie to those bits).

Exit codes: 0 done, 2 bad configuration or input.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import cv2
import numpy as np
import torch
from torch import nn

from ssd import atomic
from pipeline import device
from pipeline.config import check_run_name, choose_section, load_config, load_params, to_dict
from pipeline.datasets import Manifest, read_manifest
from pipeline.stage import StageError, arg_parser, check_writable, run
from ssd.bounds import Count, Fraction, PositiveInt
from ssd.draw import draw_detections
from ssd.metrics import DetectionAccumulator, ImageRecord, VocResult, pr_curve_points
from ssd.model_file import load_model_file
from ssd.postprocess import PostprocessConfig, PostProcessor

log = logging.getLogger("pipeline.evaluate")

Mode = Literal["auto", "frames", "video", "per_frame"]


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = "models/ssdlite_voc.pt"
    """The model file to evaluate (written by the train stage)."""
    shards: str = "data/shards/voc"
    """Directory with manifest.json and the {split}-NNNNNN.tar shards."""
    split: str = "val"
    """Which split of the manifest to evaluate on."""
    name: str | None = None
    """Names the outputs; null: the model file's stem."""
    mode: Mode = "auto"
    """auto | frames | video | per_frame (see the module docstring)."""
    batch_size: PositiveInt = 16
    """Images per forward pass and process (video mode feeds frames one at a time regardless)."""
    num_workers: Count = 2
    """Loader worker processes per process (0: load in the evaluating process)."""
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    """Detections kept for the metrics: ssd.pytorch's 0.01 score threshold, 200 per image."""
    voc_metric: Literal["voc07", "voc2010"] = "voc07"
    """Which VOC AP is the headline map_voc (both are always reported); voc07 as in the SSD paper."""
    examples: Count = 8
    """Example images drawn to reports/{name}/ and TensorBoard (the first of the split)."""
    draw_threshold: Fraction = 0.3
    """Predictions scored below this are not drawn (they still count in the metrics)."""
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    reports_dir: str = "reports"
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.name is not None:
            check_run_name(self.name, "name")


@dataclass(frozen=True)
class _Paths:
    metrics: Path
    plots: Path
    class_plots: Path
    reports: Path
    logs: Path

    @classmethod
    def of(cls, cfg: EvaluateConfig, name: str) -> _Paths:
        return cls(
            metrics=Path(cfg.metrics_dir) / f"eval-{name}.json",
            plots=Path(cfg.plots_dir) / f"pr-{name}.csv",
            class_plots=Path(cfg.plots_dir) / f"pr-{name}",
            reports=Path(cfg.reports_dir) / name,
            logs=Path(cfg.runs_dir) / f"{name}-eval",
        )


def is_temporal(model: nn.Module) -> bool:
    """Whether ``model`` carries a recurrent state (``forward(images, state=None, reset=None)``
    returning ``(class_logits, box_deltas, new_state)``)."""
    return bool(getattr(model, "is_temporal", False))


def resolve_mode(mode: str, manifest: Manifest, temporal: bool) -> tuple[str, str]:
    """``(mode, loader kind)`` for a requested mode, the shards' kind and the model; StageError if they don't fit."""
    if mode == "auto":
        mode = "frames" if manifest.kind == "frames" else ("video" if temporal else "per_frame")
    if mode == "frames":
        if manifest.kind != "frames":
            raise StageError(
                f"{manifest.path}: mode 'frames' needs frame shards, these are {manifest.kind}; use per_frame or video"
            )
        return mode, "frames"
    if manifest.kind != "clips":
        raise StageError(f"{manifest.path}: mode {mode!r} needs clip shards, these are {manifest.kind}; use frames")
    if mode == "video" and not temporal:
        raise StageError("mode 'video' needs a temporal model (LSTM-SSD); this model has no state: use per_frame")
    return mode, "frames_from_clips"


def starts_sequence(previous: tuple[str, int] | None, current: tuple[str, int]) -> bool:
    """Whether the frame ``current = (video, frame number)`` must start from a fresh state:
    the first frame, a new video, or a gap (or step back) in the frame numbers."""
    return previous is None or current[0] != previous[0] or current[1] != previous[1] + 1


@torch.no_grad()
def predict(
    model: nn.Module,
    postprocessor: PostProcessor,
    loader: Iterable[Any],
    mode: str,
    device: torch.device | str,
    accumulator: DetectionAccumulator | None = None,
) -> DetectionAccumulator:
    """Run ``model`` over the batches of ``loader`` and collect detections and ground truth per image.

    ``mode``: ``"video"`` feeds the frames one at a time carrying the state (batches
    must come in (video, frame number) order, as ``eval_loader(kind="frames_from_clips")``
    yields them); any other mode runs whole batches, a temporal model from a fresh state.
    """
    from ssd.data.loader import batches

    acc = accumulator if accumulator is not None else DetectionAccumulator()
    if mode == "video":
        state, previous = None, None
        for batch in batches(loader):
            images = batch.images.to(device)
            for i in range(len(batch)):
                current = (batch.video[i], int(batch.frames[i][0]))
                if starts_sequence(previous, current):
                    state = None  # a fresh zero state
                logits, deltas, state = model(images[i : i + 1], state=state)
                acc.add(batch.keys[i], batch.sizes[i], postprocessor(logits, deltas)[0], batch.targets[i])
                previous = current
        return acc
    for batch in batches(loader):
        out = model(batch.images.to(device))  # a temporal model: state=None, fresh for every image
        for key, size, det, target in zip(batch.keys, batch.sizes, postprocessor(out[0], out[1]), batch.targets):
            acc.add(key, size, det, target)
    return acc


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate as ``cfg`` says; writes the outputs on the main process and returns the metrics."""
    check_writable(cfg.metrics_dir, cfg.plots_dir, cfg.reports_dir, cfg.runs_dir)
    manifest = read_manifest(cfg.shards)
    shards = manifest.shard_paths(cfg.split)
    model, info = load_model_file(cfg.model)  # a bad file: InputError, one line from stage.run
    model_classes = list(info.get("class_names", []))
    if model_classes != manifest.classes:
        raise StageError(
            f"{cfg.model}: the model's classes {model_classes} do not match the classes of "
            f"{manifest.path} {manifest.classes}; evaluate a model trained on this dataset"
        )
    temporal = is_temporal(model)
    mode, kind = resolve_mode(cfg.mode, manifest, temporal)
    name = cfg.name or Path(cfg.model).stem
    paths = _Paths.of(cfg, name)

    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from ssd.data.loader import eval_loader

    # Without a GPU, Accelerate only sets up a process group (gloo) when told it runs on the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device.report(accelerator, f"evaluating {cfg.model}")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    model = model.to(accelerator.device).eval()
    postprocessor = PostProcessor(model.priors, cfg.postprocess).to(accelerator.device)
    try:
        loader = eval_loader(
            shards,
            image_size=int(info["image_size"]),
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            kind=kind,  # type: ignore[arg-type]
            pin_memory=torch.cuda.is_available(),
            num_classes=len(manifest.classes),
        )
    except ValueError as e:
        raise StageError(str(e)) from None
    if main:
        log.info("evaluating %s on %s (%s, %s mode), %d process(es)", cfg.model, cfg.shards, cfg.split, mode, world)

    start = time.perf_counter()
    local = predict(model, postprocessor, loader, mode, accelerator.device)
    # Once, after every rank's loop: ranks evaluate different numbers of batches.
    records: list[ImageRecord] = gather_object(local.records)
    seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {}
    if main:
        everything = DetectionAccumulator(records)
        voc = everything.voc(len(manifest.classes))
        metrics = _summary(cfg, mode, manifest.classes, everything, voc, seconds)
        atomic.write_json(paths.metrics, metrics)
        _write_pr_curves(paths, manifest.classes, voc)
        examples = _draw_examples(cfg, shards, kind, manifest.classes, everything)
        _write_reports(paths, examples)
        _write_tensorboard(paths.logs, metrics, examples)
        log.info(
            "%s: VOC07 mAP %.4f, VOC2010 mAP %.4f, COCO mAP %s, AP50 %s on %d images (%.1f images/s); wrote %s",
            name, voc.map07, voc.map2010, metrics["coco"]["map"], metrics["coco"]["map_50"],
            len(everything), metrics["images_per_s"], paths.metrics,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _summary(
    cfg: EvaluateConfig,
    mode: str,
    classes: list[str],
    acc: DetectionAccumulator,
    voc: VocResult,
    seconds: float,
) -> dict[str, Any]:
    records = acc.records
    return {
        "model": cfg.model,
        "shards": cfg.shards,
        "split": cfg.split,
        "mode": mode,
        "images": len(records),
        "objects": int(sum(len(r.gt_labels) for r in records)),
        "detections": int(sum(len(r.labels) for r in records)),
        "voc_metric": cfg.voc_metric,
        "map_voc": _number(voc.map07 if cfg.voc_metric == "voc07" else voc.map2010),
        "voc07": {"map": _number(voc.map07), "ap": {c: _number(r.ap07) for c, r in zip(classes, voc.classes)}},
        "voc2010": {"map": _number(voc.map2010), "ap": {c: _number(r.ap) for c, r in zip(classes, voc.classes)}},
        "positives": {c: r.num_positives for c, r in zip(classes, voc.classes)},
        "coco": {k: _number(v) for k, v in acc.coco().items()},
        "postprocess": to_dict(cfg.postprocess),
        "images_per_s": round(len(records) / max(seconds, 1e-9), 2),
        "wall_time_s": round(seconds, 3),
    }


def _number(v: float | None) -> float | None:
    """JSON-friendly: 6 decimals; NaN (undefined: e.g. a class without ground truth) becomes null."""
    return None if v is None or math.isnan(v) else round(float(v), 6)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "class"


def _write_pr_curves(paths: _Paths, classes: list[str], voc: VocResult) -> None:
    """``plots/pr-{name}.csv`` (class, recall, precision) and one ``recall,precision`` file per class."""
    rows: list[tuple[str, float, float]] = []
    per_class: dict[str, list[tuple[float, float]]] = {}
    for cls, result in zip(classes, voc.classes):
        recall, precision = pr_curve_points(result)
        points = [(round(float(r), 6), round(float(p), 6)) for r, p in zip(recall, precision)]
        if points:  # classes without ground truth or without detections have no curve
            per_class[cls] = points
            rows += [(cls, r, p) for r, p in points]
    atomic.write_text(paths.plots, _csv(("class", "recall", "precision"), rows))
    with atomic.atomic_dir(paths.class_plots) as tmp:
        for cls, points in per_class.items():
            atomic.write_text(tmp / f"{_safe_name(cls)}.csv", _csv(("recall", "precision"), points))


def _csv(header: tuple[str, ...], rows: Iterable[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _draw_examples(
    cfg: EvaluateConfig, shards: list[str], kind: str, classes: list[str], acc: DetectionAccumulator
) -> list[tuple[str, np.ndarray]]:
    """``(key, RGB image)`` of the first ``cfg.examples`` evaluated samples, drawn on the original image."""
    from ssd.data.loader import read_raw_samples

    if cfg.examples == 0:
        return []
    by_key = {r.image_id: r for r in acc.records}
    out: list[tuple[str, np.ndarray]] = []
    for raw in read_raw_samples(shards, kind):  # type: ignore[arg-type]
        record = by_key.pop(raw.key, None)  # an overlapping clip's repeated frame was evaluated once
        if record is None:
            continue
        image = _decode_rgb(raw.images[0])
        if image is None or image.shape[:2] != (record.height, record.width):
            log.warning("example %s: image can't be decoded or has another size than annotated; skipped", raw.key)
            continue
        drawn = draw_detections(
            image, record.boxes, record.labels, record.scores, classes,
            gt_boxes=record.gt_boxes, gt_labels=record.gt_labels, score_threshold=cfg.draw_threshold,
        )
        out.append((raw.key, drawn))
        if len(out) == cfg.examples:
            break
    return out


def _decode_rgb(data: bytes) -> np.ndarray | None:
    # As the loader decodes: 3 channels, EXIF orientation ignored (annotations refer to the stored pixels).
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _write_reports(paths: _Paths, examples: list[tuple[str, np.ndarray]]) -> None:
    with atomic.atomic_dir(paths.reports) as tmp:
        for i, (key, image) in enumerate(examples):
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise StageError(f"example {key}: PNG encoding failed")
            atomic.write_bytes(tmp / f"{i:03d}-{_safe_name(key)}.png", png.tobytes())


def _write_tensorboard(logs: Path, metrics: dict[str, Any], examples: list[tuple[str, np.ndarray]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    # One evaluation per log directory: a rerun replaces the previous events instead of adding to them.
    for old in logs.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(logs))
    try:
        scalars = {
            "eval/voc07_map": metrics["voc07"]["map"],
            "eval/voc2010_map": metrics["voc2010"]["map"],
            **{f"eval/coco_{k}": v for k, v in metrics["coco"].items()},
        }
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, value, 0)
        for i, (key, image) in enumerate(examples):
            writer.add_image(f"examples/{i:03d}-{key}", image, 0, dataformats="HWC")
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several evaluate sections)")
    args = parser.parse_args(argv)

    def body() -> int:
        # faster_coco_eval prints its whole summary table at INFO; our log line and the JSON hold the numbers.
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        params = load_params(args.params)
        section = choose_section(EvaluateConfig, params, args.section, "evaluate", args.params)
        cfg = load_config(EvaluateConfig, params, section, args.overrides, args.params)
        evaluate(cfg)
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
