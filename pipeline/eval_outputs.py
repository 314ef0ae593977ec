"""What the evaluation stage writes: the metrics, PR curves, confusion matrix, detections,
example pictures and TensorBoard logs of one evaluation (see :mod:`pipeline.evaluate` for the
list of files). Everything is written atomically, on the main process only.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from pipeline.config import to_dict
from pipeline.stage import StageError
from ssd import atomic
from ssd.draw import draw_detections
from ssd.confusion import confusion_matrix
from ssd.metrics import DetectionAccumulator, VocResult, pr_curve_points

log = logging.getLogger("pipeline.evaluate")


@dataclass(frozen=True)
class EvalPaths:
    metrics: Path
    plots: Path
    map_row: Path
    reports: Path
    logs: Path
    confusion: Path

    @classmethod
    def of(cls, cfg: Any, name: str) -> EvalPaths:
        return cls(
            metrics=Path(cfg.metrics_dir) / f"eval-{name}.json",
            plots=Path(cfg.plots_dir) / f"pr-{name}.csv",
            map_row=Path(cfg.plots_dir) / f"map-{name}.json",
            reports=Path(cfg.reports_dir) / name,
            logs=Path(cfg.runs_dir) / f"{name}-eval",
            confusion=Path(cfg.plots_dir) / f"confusion-{name}.csv",
        )


def write_outputs(cfg: Any, paths: EvalPaths, shards: list[str], kind: str, mode: str, classes: list[str],
                  acc: DetectionAccumulator, seconds: float) -> dict[str, Any]:
    """Compute the metrics of ``acc`` and write every output; returns the metrics."""
    voc = acc.voc(len(classes))
    metrics = summary(cfg, mode, classes, acc, voc, seconds)
    atomic.write_json(paths.metrics, metrics)
    write_pr_curves(paths, classes, voc, cfg.voc_metric == "voc07")
    write_map_row(paths.map_row, paths.reports.name, metrics)
    counts = confusion_matrix(acc.records, len(classes), score_threshold=cfg.confusion_threshold)
    write_confusion(paths.confusion, counts, classes)
    examples = draw_examples(cfg, shards, kind, classes, acc)
    write_reports(paths, examples, coco_detections(acc, classes), run_settings(cfg, mode))
    write_tensorboard(paths.logs, metrics, examples, classes, voc)
    return metrics


def summary(
    cfg: Any,
    mode: str,
    classes: list[str],
    acc: DetectionAccumulator,
    voc: VocResult,
    seconds: float,
) -> dict[str, Any]:
    """The numbers that compare runs (what ``dvc metrics`` shows); the settings that produced
    them are in :func:`run_settings`, not here."""
    records = acc.records
    return {
        "images": len(records),
        "objects": int(sum(len(r.gt_labels) for r in records)),
        "detections": int(sum(len(r.labels) for r in records)),
        "map_voc": _number(voc.map07 if cfg.voc_metric == "voc07" else voc.map2010),
        "voc07": {"map": _number(voc.map07), "ap": {c: _number(r.ap07) for c, r in zip(classes, voc.classes)}},
        "voc2010": {"map": _number(voc.map2010), "ap": {c: _number(r.ap) for c, r in zip(classes, voc.classes)}},
        "positives": {c: r.num_positives for c, r in zip(classes, voc.classes)},
        "coco": {k: _number(v) for k, v in acc.coco().items()},
        "images_per_s": round(len(records) / max(seconds, 1e-9), 2),
        "wall_time_s": round(seconds, 3),
    }


def run_settings(cfg: Any, mode: str) -> dict[str, Any]:
    """What produced the metrics: the whole evaluate config (``reports/{name}/evaluation.json``),
    with the mode it resolved to. Kept out of the metrics file, so that ``dvc metrics diff``
    compares numbers, not settings."""
    return {**to_dict(cfg), "mode": mode}


def _number(v: float | None) -> float | None:
    """JSON-friendly: 6 decimals; NaN (undefined: e.g. a class without ground truth) becomes null."""
    return None if v is None or math.isnan(v) else round(float(v), 6)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "class"


def write_pr_curves(paths: EvalPaths, classes: list[str], voc: VocResult, use_07: bool) -> None:
    """``plots/pr-{name}.csv``: ``class, curve, recall, precision``, every class's curve in one file;
    ``curve`` is the legend entry, the class and its VOC AP (the headline metric's), e.g.
    ``car (AP 0.712)``: DVC draws all classes in one chart (template ``pr_by_class``)."""
    rows: list[tuple[str, str, float, float]] = []
    for cls, result in zip(classes, voc.classes):
        recall, precision = pr_curve_points(result)
        ap = result.ap07 if use_07 else result.ap
        curve = f"{cls} (AP {ap:.3f})"
        # Classes without ground truth or without detections have no curve.
        rows += [(cls, curve, round(float(r), 6), round(float(p), 6)) for r, p in zip(recall, precision)]
    atomic.write_text(paths.plots, _csv(("class", "curve", "recall", "precision"), rows))


def write_map_row(path: Path, name: str, metrics: dict[str, Any]) -> None:
    """``plots/map-{name}.json``: one row, this model's headline figures, for the chart comparing models."""
    row = {"model": name, "map_voc": metrics["map_voc"], "map_voc07": metrics["voc07"]["map"],
           "coco_map": metrics["coco"].get("map"), "coco_map_50": metrics["coco"].get("map_50")}
    atomic.write_json(path, [row])


def _csv(header: tuple[str, ...], rows: Iterable[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def draw_examples(
    cfg: Any, shards: list[str], kind: str, classes: list[str], acc: DetectionAccumulator
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


def write_reports(paths: EvalPaths, examples: list[tuple[str, np.ndarray]], detections: list[dict],
                  settings: dict[str, Any]) -> None:
    """``reports/{name}/``: ``detections.json``, ``evaluation.json`` (the settings) and the example
    pictures in ``examples/`` (a folder of pictures only: dvc.yaml shows it as image plots)."""
    with atomic.atomic_dir(paths.reports) as tmp:
        atomic.write_json(tmp / "detections.json", detections, indent=0)
        atomic.write_json(tmp / "evaluation.json", settings)
        (tmp / "examples").mkdir()
        for i, (key, image) in enumerate(examples):
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise StageError(f"example {key}: PNG encoding failed")
            atomic.write_bytes(tmp / "examples" / f"{i:03d}-{_safe_name(key)}.png", png.tobytes())


def coco_detections(acc: DetectionAccumulator, classes: list[str]) -> list[dict]:
    """Every detection in the COCO results format: ``image_id`` the sample's position (from 1) in
    sample-key order, ``bbox`` ``[x, y, w, h]`` in the original image's pixels, plus the sample key
    and the class name."""
    out = []
    for image_id, r in enumerate(acc.records, start=1):
        for (x1, y1, x2, y2), score, label in zip(r.boxes.tolist(), r.scores.tolist(), r.labels.tolist()):
            out.append({"image_id": image_id, "sample": r.image_id, "category_id": int(label),
                        "category_name": classes[label - 1], "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": round(float(score), 6)})
    return out


def write_confusion(path: Path, counts: np.ndarray, classes: list[str]) -> None:
    """``actual,predicted`` rows, one per count of the matrix (what DVC's confusion template draws)."""
    names = ["background", *classes]
    rows = [(names[a], names[p]) for a, p in zip(*np.nonzero(counts)) for _ in range(int(counts[a, p]))]
    atomic.write_text(path, _csv(("actual", "predicted"), rows))


#: Points per TensorBoard PR curve (its plugin's default resolution).
TB_PR_POINTS = 127


def write_tensorboard(logs: Path, metrics: dict[str, Any], examples: list[tuple[str, np.ndarray]],
                      classes: list[str] | None = None, voc: VocResult | None = None) -> None:
    """Scalars, example pictures and (given ``voc``) one PR curve per class, at step 0."""
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
        for cls, result in zip(classes or [], voc.classes if voc is not None else []):
            _add_pr_curve(writer, f"pr/{cls}", result)
    finally:
        writer.close()


def _add_pr_curve(writer: Any, tag: str, result: Any) -> None:
    """A class's VOC precision-recall curve as TensorBoard's raw PR curve (counts at each point)."""
    recall, precision = pr_curve_points(result)
    if len(recall) == 0:
        return
    if len(recall) > TB_PR_POINTS:
        pick = np.unique(np.linspace(0, len(recall) - 1, TB_PR_POINTS).round().astype(int))
        recall, precision = recall[pick], precision[pick]
    # TensorBoard wants the points by increasing threshold, i.e. decreasing recall.
    recall, precision = recall[::-1], precision[::-1]
    tp = recall * result.num_positives
    fp = np.where(precision > 0, tp / np.maximum(precision, 1e-12) - tp, 0.0)
    writer.add_pr_curve_raw(tag, tp, fp, np.zeros_like(tp), result.num_positives - tp, precision, recall, 0,
                            num_thresholds=len(tp))


