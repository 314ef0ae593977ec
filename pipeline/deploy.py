"""The deployed detectors: every listed model file as a float and an int8 ONNX graph.

Usage::

    python -m pipeline.deploy [--set int8.frames=256 ...]

For each entry of ``models`` (a model file and the shards it was trained on), writes to
``out_dir``

- ``{stem}.onnx``: batch norm folded, graph simplified, checked in onnxruntime against the
  PyTorch model (``tolerance``) before it is written (:func:`pipeline.export.export_float`);
- ``{stem}-int8.onnx`` (``int8.enabled``): static int8 quantization with ONNX Runtime,
  calibrated on ``int8.frames`` frames of the shards' ``int8.split``
  (:func:`pipeline.export.export_int8`; LSTM-SSD keeps its state inputs and outputs);
- ``{stem}-detect.onnx`` and ``{stem}-int8-detect.onnx`` (``detect.enabled``): the same graphs with
  the post-processing inside (:mod:`ssd.graph_postprocess`: softmax, decoding, NMS with
  ``detect``'s thresholds), whose outputs are the detections: what a deployer runs, from any
  language, with no post-processing code of their own;

and ``metrics``: per graph its size, operator count, time to make it and (float) its largest
difference from PyTorch, (int8) the number of calibration frames (numbers only; how it was
calibrated is in the graph's ``quantization`` metadata). The evaluation stage runs either graph
(``model: models/deploy/ssdlite_voc-int8.onnx``), so ``dvc metrics diff`` shows what int8 costs;
the benchmark stage times them against PyTorch.

The output folder is replaced whole, atomically: a failure leaves the previous one.

Exit codes: 0 written, 2 bad configuration or input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pipeline.config import InputPath, choose_section, load_config, load_params
from pipeline.export import (Int8Config, check_calibration, check_onnx_installed, export_detect, export_float,
                             export_int8)
from pipeline.dvc_inputs import check_tracked
from pipeline.stage import StageError, arg_parser, check_replaceable, check_writable, run
from ssd import atomic
from ssd.bounds import AtLeast, Below, Fraction, PositiveInt

log = logging.getLogger("pipeline.deploy")


@dataclass(frozen=True)
class DeployModel:
    file: InputPath
    """A model file (models/*.pt)."""
    shards: InputPath
    """The shards it was trained on: their classes are checked, the int8 graph calibrates on them."""


@dataclass(frozen=True)
class DetectConfig:
    """The graphs with their post-processing inside: a deployed detector's thresholds."""

    enabled: bool = True
    """Also write {stem}-detect.onnx (and {stem}-int8-detect.onnx with int8)."""
    score_threshold: Annotated[float, AtLeast(0), Below(1)] = 0.3
    """Class scores at or below this are not detections (pipeline/detect.py's default)."""
    nms_threshold: Fraction = 0.45
    max_detections: PositiveInt = 200
    """Per image (and per class, before the per-image cap)."""

    def postprocess(self) -> Any:
        from ssd.postprocess import PostprocessConfig

        return PostprocessConfig(score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                                 max_detections=self.max_detections)


@dataclass(frozen=True)
class DeployConfig:
    models: tuple[DeployModel, ...] = ()
    """What to deploy; the graphs are named after the files' stems, which must differ."""
    out_dir: str = "models/deploy"
    """{stem}.onnx, {stem}-int8.onnx and their -detect graphs (dvc.yaml's outs read this key)."""
    metrics: str = "metrics/deploy.json"
    opset: int = 17
    fold_batchnorm: bool = True
    """Batch norm written into the convolutions before export (ssd.fold)."""
    simplify: bool = True
    """onnx-simplifier on the exported graph."""
    tolerance: float = 1e-4
    """Largest difference from PyTorch a float graph may have (random input; LSTM-SSD: 4 streamed frames)."""
    int8: Int8Config = field(default_factory=Int8Config)
    detect: DetectConfig = field(default_factory=DetectConfig)


def deploy(cfg: DeployConfig) -> dict[str, Any]:
    """Write the graphs of ``cfg.models`` and the metrics; returns the metrics."""
    check_onnx_installed()
    from ssd.model_file import load_model_file

    if not cfg.models:
        raise StageError("deploy.models is empty: list the model files to deploy")
    stems = [Path(m.file).stem for m in cfg.models]
    if len(set(stems)) != len(stems):
        raise StageError(f"deploy.models: the files' names (stems) must differ: {stems}")
    _check_graph_names(cfg, stems)
    out = Path(cfg.out_dir)
    check_writable(out.parent, Path(cfg.metrics).parent)
    if out.resolve() in Path(cfg.metrics).resolve().parents:  # written there, it went with the old folder
        raise StageError(f"deploy.metrics: {cfg.metrics} is inside deploy.out_dir ({cfg.out_dir}), which is replaced "
                         "whole by the graphs: put it elsewhere (metrics/deploy.json)")
    inputs = {f"deploy.models[{i}].{k}": getattr(m, k) for i, m in enumerate(cfg.models) for k in ("file", "shards")}
    check_replaceable(out, "deploy.out_dir", lambda p: all(f.suffix == ".onnx" and f.is_file() for f in p.iterdir()),
                      "a folder of ONNX graphs (what this stage writes)", inputs)
    figures: dict[str, Any] = {}
    with atomic.atomic_dir(out) as tmp:
        for entry, stem in zip(cfg.models, stems):
            model, info = load_model_file(entry.file)  # a bad file: InputError, one line from stage.run
            manifest = check_calibration(info, entry.shards, cfg.int8.split if cfg.int8.enabled else None,
                                         temporal=cfg.int8.enabled and bool(getattr(model, "is_temporal", False)))
            data, report = export_float(model, info, entry.file, tmp / f"{stem}.onnx", opset=cfg.opset,
                                        fold=cfg.fold_batchnorm, simplify=cfg.simplify, tolerance=cfg.tolerance)
            figures[stem] = {"float": report}
            log.info("%s: float graph, %d nodes, %.2f MB, %.2g from PyTorch", stem, report["nodes"], report["mb"],
                     report["max_difference"])
            if cfg.int8.enabled:
                q = export_int8(model, data, tmp / f"{stem}-int8.onnx", manifest, cfg.int8)
                figures[stem]["int8"] = q
                log.info("%s: int8 graph, %d nodes, %.2f MB, %d calibration frames in %.1f s", stem, q["nodes"],
                         q["mb"], q["calibration"]["calibration_frames"], q["seconds"])
            if cfg.detect.enabled:
                for variant, suffix in (("float", ""), ("int8", "-int8"))[: 2 if cfg.int8.enabled else 1]:
                    source, out_file = tmp / f"{stem}{suffix}.onnx", tmp / f"{stem}{suffix}-detect.onnx"
                    figures[stem][f"{variant}_detect"] = export_detect(model, source.read_bytes(), out_file,
                                                                       cfg.detect.postprocess())
        metrics = {"models": _numbers(figures)}  # numbers only, as every metrics file: the settings are in params
        atomic.write_json(cfg.metrics, metrics)
    return metrics


def _check_graph_names(cfg: DeployConfig, stems: list[str]) -> None:
    """StageError when two models' graphs would have one name (``a`` and ``a-detect`` both
    give ``a-detect.onnx``): the second would replace the first without a word."""
    suffixes = [""] + (["-int8"] if cfg.int8.enabled else [])
    suffixes += [f"{s}-detect" for s in suffixes] if cfg.detect.enabled else []
    owner: dict[str, str] = {}
    for stem, entry in zip(stems, cfg.models):
        for suffix in suffixes:
            name = f"{stem}{suffix}.onnx"
            if name in owner:
                raise StageError(f"deploy.models: {owner[name]} and {entry.file} would both write {name}; "
                                 "rename one of the model files")
            owner[name] = entry.file


def _numbers(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without its strings and lists (file names, settings, operator names)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            if inner := _numbers(value):
                out[key] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several deploy sections)")
    args = parser.parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        section = choose_section(DeployConfig, params, args.section, "deploy", args.params)
        cfg = load_config(DeployConfig, params, section, args.overrides, args.params)
        check_tracked(cfg, section)
        deploy(cfg)
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
