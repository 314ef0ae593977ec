"""Evaluate a detector: a model file and validation shards in, metrics and pictures out.

Usage::

    python -m pipeline.evaluate --section evaluate [--set model=models/other.pt --set name=other ...]
    accelerate launch --multi_gpu --num_processes 2 -m pipeline.evaluate --section evaluate   # split across processes

The ``--section`` of the params file (needed when it has several evaluate sections) is
parsed into a frozen :class:`EvaluateConfig`. The model file (:mod:`ssd.model_file`) must have been trained
on the classes of the shards' manifest, in the same order; another model is refused
with a one-line error (exit code 2). Outputs (``{name}``: the config's ``name``, by
default the model file's stem):

- ``metrics/eval-{name}.json``: numbers only: Pascal VOC mAP and per-class AP (VOC2007
  11-point and VOC2010+ area, IoU > 0.5, :mod:`ssd.metrics`), COCO metrics from torchmetrics
  (mAP@[.5:.95], AP50, AP75, small/medium/large, AR) under ``coco``, images, objects and
  detections counted, images/s. The settings that produced them (this config, the mode it
  resolved to) are in ``reports/{name}/evaluation.json``;
- ``plots/pr-{name}.csv``: precision-recall points of every class (columns class, curve,
  recall, precision; ``curve`` is the legend entry, the class and its VOC AP): DVC draws all
  classes in one chart (template ``.dvc/plots/pr_by_class.json``);
- ``plots/map-{name}.json``: one row (model, VOC mAP, COCO mAP, AP50) for the chart that
  compares models (``mAP per model`` in dvc.yaml);
- ``plots/confusion-{name}.csv``: the confusion matrix (:mod:`ssd.confusion`: IoU 0.5,
  detections scored at least ``confusion_threshold``, a background row and column), one
  ``actual,predicted`` row per count, as DVC's confusion template reads it;
- ``reports/{name}/``: ``examples/``, example images with ground truth (green) and predictions
  scored at least ``draw_threshold`` (magenta), also logged to TensorBoard in
  ``runs/{name}-eval/``; ``detections.json``, every detection kept for the metrics in
  the COCO results format (``image_id`` the sample's position in sample-key order from 1,
  ``bbox`` ``[x, y, w, h]`` in the original image's pixels, ``score``, ``category_id``, plus
  ``sample`` and ``category_name``): pycocotools or faster-coco-eval re-score it to ``coco.map``.

The writing is in :mod:`pipeline.eval_outputs`; a progress bar counts the images.

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

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch import nn

from pipeline import device
from pipeline.config import InputPath, check_name_follows_model, check_run_name, choose_section, load_config, load_params
from pipeline.datasets import Manifest, read_manifest
from pipeline.eval_outputs import EvalPaths, write_outputs
from pipeline.dvc_inputs import check_name_follows_model_under_dvc, check_tracked
from pipeline.stage import StageError, arg_parser, check_replaceable, check_writable, run
from ssd.bounds import Count, Fraction, PositiveInt
from ssd.metrics import DetectionAccumulator, ImageRecord
from ssd.onnx_detector import load_detector
from ssd.postprocess import PostprocessConfig, PostProcessor

log = logging.getLogger("pipeline.evaluate")

Mode = Literal["auto", "frames", "video", "per_frame"]


@dataclass(frozen=True)
class EvaluateConfig:
    model: InputPath = "models/ssdlite_voc.pt"
    """The model file to evaluate (written by the train stage), or an exported ``.onnx`` file (the deploy
    stage's, float or int8), run by ONNX Runtime with the same pre- and post-processing."""
    shards: InputPath = "data/shards/voc"
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
    confusion_threshold: Fraction = 0.3
    """Detections scored at least this count in the confusion matrix (matched at IoU >= 0.5); the
    detect and predict default, where a small model's detections are (at 0.5 the sample's SSDLite
    missed most stars and rings)."""
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    reports_dir: str = "reports"
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.name is not None:
            check_run_name(self.name, "name")


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


def starts_sequence(previous: tuple[str, int, Any] | None, current: tuple[str, int, Any]) -> bool:
    """Whether the frame ``current = (video, frame number, frame size)`` must start from a fresh
    state: the first frame, a new video, a gap (or step back) in the frame numbers, or a change of
    the frame size (where the clip writer starts a new segment of the video)."""
    return (
        previous is None
        or current[0] != previous[0]
        or current[1] != previous[1] + 1
        or current[2] != previous[2]
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    postprocessor: PostProcessor,
    loader: Iterable[Any],
    mode: str,
    device: torch.device | str,
    accumulator: DetectionAccumulator | None = None,
    progress: Any = None,
) -> DetectionAccumulator:
    """Run ``model`` over the batches of ``loader`` and collect detections and ground truth per image.

    ``mode``: ``"video"`` feeds the frames one at a time carrying the state (batches
    must come in (video, frame number) order, as ``eval_loader(kind="frames_from_clips")``
    yields them); any other mode runs whole batches, a temporal model from a fresh state.
    ``progress``: a tqdm bar advanced by the images of every batch (None: no bar).
    """
    from ssd.data.loader import batches

    acc = accumulator if accumulator is not None else DetectionAccumulator()
    if mode == "video":
        state, previous = None, None
        for batch in batches(loader):
            images = batch.images.to(device)
            for i in range(len(batch)):
                current = (batch.video[i], int(batch.frames[i][0]), tuple(batch.sizes[i]))
                if starts_sequence(previous, current):
                    state = None  # a fresh zero state
                logits, deltas, state = model(images[i : i + 1], state=state)
                acc.add(batch.keys[i], batch.sizes[i], postprocessor(logits, deltas)[0], batch.targets[i])
                previous = current
            if progress is not None:
                progress.update(len(batch))
        return acc
    for batch in batches(loader):
        out = model(batch.images.to(device))  # a temporal model: state=None, fresh for every image
        for key, size, det, target in zip(batch.keys, batch.sizes, postprocessor(out[0], out[1]), batch.targets):
            acc.add(key, size, det, target)
        if progress is not None:
            progress.update(len(batch))
    return acc


def gathered_records(
    model: nn.Module,
    postprocessor: PostProcessor,
    shards: list[str],
    accelerator: Any,
    *,
    kind: str,
    mode: str,
    batch_size: int,
    num_workers: int,
    num_classes: int,
    progress: Any = None,
) -> list[ImageRecord]:
    """Every process evaluates its share of ``shards`` (:func:`ssd.data.loader.eval_loader` with its
    rank) with :func:`predict`; returns the records of all processes, on every process.

    The records are gathered once, after every rank's loop: ranks evaluate different numbers of
    batches, so nothing is collective inside it. Metrics computed from them (in ``image_id``
    order) are those of a one-process evaluation. Call on every process.
    """
    from accelerate.utils import gather_object

    from ssd.data.loader import eval_loader

    try:
        loader = eval_loader(
            shards,
            image_size=int(model.image_size),
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            batch_size=batch_size,
            num_workers=num_workers,
            kind=kind,  # type: ignore[arg-type]
            pin_memory=torch.cuda.is_available(),
            num_classes=num_classes,
        )
    except ValueError as e:
        raise StageError(str(e)) from None
    local = predict(model, postprocessor, loader, mode, accelerator.device, progress=progress)
    return gather_object(local.records)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate as ``cfg`` says; writes the outputs on the main process and returns the metrics."""
    check_writable(cfg.metrics_dir, cfg.plots_dir, cfg.reports_dir, cfg.runs_dir)
    manifest = read_manifest(cfg.shards)
    shards = manifest.shard_paths(cfg.split)
    model, info = load_detector(cfg.model)  # a bad file: InputError, one line from stage.run
    model_classes = list(info.get("class_names", []))
    if model_classes != manifest.classes:
        raise StageError(
            f"{cfg.model}: the model's classes {model_classes} do not match the classes of "
            f"{manifest.path} {manifest.classes}; evaluate a model trained on this dataset"
        )
    temporal = is_temporal(model)
    mode, kind = resolve_mode(cfg.mode, manifest, temporal)
    name = cfg.name or Path(cfg.model).stem
    paths = EvalPaths.of(cfg, name)
    # The reports folder is replaced whole: only an earlier evaluation's may be there.
    check_replaceable(paths.reports, "reports_dir", lambda p: (p / "evaluation.json").is_file(),
                      "an evaluation's reports folder", inputs={"model": cfg.model, "shards": cfg.shards})

    from accelerate import Accelerator

    # Without a GPU, Accelerate only sets up a process group (gloo) when told it runs on the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device.report(accelerator, f"evaluating {cfg.model}")
    world, main = accelerator.num_processes, accelerator.is_main_process
    model = model.to(accelerator.device).eval()
    postprocessor = PostProcessor(model.priors, cfg.postprocess).to(accelerator.device)
    if main:
        log.info("evaluating %s on %s (%s, %s mode), %d process(es)", cfg.model, cfg.shards, cfg.split, mode, world)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    # The main process's share, about the split's frames over the processes (a clip split's frames
    # count overlapping clips' frames once each).
    total = math.ceil(manifest.count(cfg.split, "frames") / world)
    with tqdm(total=total, unit="image", desc=f"evaluate {name}", disable=not main, dynamic_ncols=True) as bar:
        records = gathered_records(
            model, postprocessor, shards, accelerator, kind=kind, mode=mode, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, num_classes=len(manifest.classes), progress=bar,
        )
    seconds = time.perf_counter() - start
    if not any((~r.gt_difficult).any() for r in records):  # every process holds all the records
        raise StageError(f"{manifest.path}: split {cfg.split!r} has no object that counts (none, or only difficult "
                         "ones), so its mAP is undefined; evaluate on a split with objects")

    metrics: dict[str, Any] = {}
    if main:
        everything = DetectionAccumulator(records)
        metrics = write_outputs(cfg, paths, shards, kind, mode, manifest.classes, everything, seconds)
        log.info(
            "%s: VOC07 mAP %.4f, VOC2010 mAP %.4f, COCO mAP %s, AP50 %s on %d images (%.1f images/s); wrote %s",
            name, metrics["voc07"]["map"], metrics["voc2010"]["map"], metrics["coco"]["map"],
            metrics["coco"]["map_50"], len(everything), metrics["images_per_s"], paths.metrics,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several evaluate sections)")
    args = parser.parse_args(argv)

    def body() -> int:
        # faster_coco_eval prints its whole summary table at INFO; our log line and the JSON hold the numbers.
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        params = load_params(args.params)
        section = choose_section(EvaluateConfig, params, args.section, "evaluate", args.params)
        check_name_follows_model(params.get(section), args.overrides)
        cfg = load_config(EvaluateConfig, params, section, args.overrides, args.params)
        check_name_follows_model_under_dvc(cfg.name, cfg.model, section)
        check_tracked(cfg, section)
        evaluate(cfg)
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
