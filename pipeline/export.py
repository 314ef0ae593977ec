"""Export a model file to ONNX, for phone and server runtimes; optionally an int8 graph too.

Usage::

    python -m pipeline.export MODEL --out model.onnx [--decode] [--opset 17] [--verify]
        [--int8 model-int8.onnx --calibration data/shards/voc [--calibration-frames 128]]

Any model file works (SSD300, SSDLite, LSTM-SSD, pruned ones too). The graph
(:mod:`ssd.export`) takes ``images``: ``float32 [B, 3, S, S]`` RGB in ``[0, 1]``
(the normalisation is inside) and returns

- by default the raw predictions ``class_logits [B, P, C]`` and ``box_deltas [B, P, 4]``;
- with ``--decode`` ``scores [B, P, C]`` (softmax, column 0 the background) and
  ``boxes [B, P, 4]`` (xyxy normalised to [0, 1]): threshold and NMS in the runtime;
- for LSTM-SSD also the recurrent state: inputs ``state_0 .. state_{2k-1}`` (zeros start a
  video) and outputs ``new_state_0 ..``, fed back on the next frame.

The exported graph is the deployable one: batch norm folded into the convolutions and the
graph simplified (``--no-fold``, ``--no-simplify`` to keep them). The batch axis is dynamic.
The class names, input size, whole arch and the rest are in the model's ``metadata_props``.
The file is checked with ``onnx.checker`` and written atomically; ``--verify`` also runs it in
onnxruntime against PyTorch on random input (a temporal model: 4 frames, state fed back) and
fails if any output differs by more than ``--tolerance``.

``--int8 FILE`` also writes a static int8 graph (:mod:`ssd.quantize`), calibrated on frames of
the ``--calibration`` shards' ``--calibration-split`` (whole runs of consecutive frames for a
temporal model, streamed with their state). The deploy stage (:mod:`pipeline.deploy`) does
this for the models of ``params.yaml``.

Exit codes: 0 written, 2 bad input (missing or unreadable model file, onnx not
installed, a verification that failed, shards of other classes).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.stage import StageError, check_writable, run
from ssd.atomic import TMP_PREFIX
from ssd.bounds import Count, PositiveInt

log = logging.getLogger("pipeline.export")


@dataclass(frozen=True)
class Int8Config:
    enabled: bool = True
    """Also write the int8 graph ({stem}-int8.onnx)."""
    split: str = "train"
    """Which split of the model's shards the calibration frames come from (never the evaluated one)."""
    frames: PositiveInt = 128
    """Calibration frames, spread over the split (clip shards: runs of run_length consecutive frames)."""
    run_length: PositiveInt = 8
    """Consecutive frames per calibration run on clip shards (a temporal model streams them)."""
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    """How activation ranges are set from the calibration frames (ssd.quantize)."""
    per_channel: bool = True
    """Weight scales per output channel (per tensor loses MobileNet's depthwise convolutions)."""
    float_first: Count = 3
    """The first this many convolutions (and the input normalisation before them) stay float:
    at full resolution with few channels ONNX Runtime's int8 kernels are slower (ssd.quantize)."""


def check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise StageError("onnx and onnxruntime are not installed: pip install -c constraints.txt -e .") from None


def export_float(model: Any, info: dict[str, Any], source: str, out: Path, *, decoded: bool = False,
                 opset: int = 17, fold: bool = True, simplify: bool = True,
                 tolerance: float | None = None) -> tuple[bytes, dict[str, Any]]:
    """Write the float graph of the loaded ``model`` to ``out``; ``(graph, report)``. ``tolerance``: verify
    against PyTorch in onnxruntime first (None: don't); a larger difference is a StageError and writes nothing."""
    from ssd.export import MAX_OPSET, MIN_OPSET, deployable_onnx, onnxruntime_difference, save_onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise StageError(f"--opset {opset}: supported are {MIN_OPSET} to {MAX_OPSET}")
    arch = info.get("arch", {})
    metadata = {"class_names": info.get("class_names", []), "arch": arch.get("name", ""),
                "pruned": bool(arch.get("pruned")), "source": Path(source).name}
    start = time.perf_counter()
    data = deployable_onnx(model, decoded=decoded, opset=opset, metadata=metadata, fold=fold, simplify=simplify)
    report: dict[str, Any] = {}
    if tolerance is not None:
        temporal = bool(getattr(model, "is_temporal", False))
        diff = onnxruntime_difference(model, data, decoded, frames=4 if temporal else 1)
        if diff > tolerance:
            raise StageError(f"{out}: onnxruntime differs from PyTorch by {diff:.3g} (> {tolerance:g})")
        report["max_difference"] = float(f"{diff:.3g}")
    save_onnx(out, data)
    report.update(seconds=round(time.perf_counter() - start, 2), mb=round(len(data) / 1e6, 3), **_graph_counts(data))
    return data, report


def export_int8(model: Any, data: bytes, out: Path, manifest: Any, cfg: Int8Config) -> dict[str, Any]:
    """Write the int8 graph of the float graph ``data`` to ``out``, calibrated on the shards of
    ``manifest`` (as :func:`check_calibration` returned it, before anything was written); its report."""
    from ssd.data.calibration import calibration_frames
    from ssd.export import save_onnx
    from ssd.quantize import leading_nodes, quantize_int8

    kind = "frames" if manifest.kind == "frames" else "frames_from_clips"
    frames = calibration_frames(manifest.shard_paths(cfg.split), image_size=int(model.image_size), kind=kind,
                                count=cfg.frames, run_length=cfg.run_length)
    start = time.perf_counter()
    quantized, report = quantize_int8(data, frames, method=cfg.method, per_channel=cfg.per_channel,
                                      exclude=leading_nodes(data, cfg.float_first))
    save_onnx(out, quantized)
    return {"seconds": round(time.perf_counter() - start, 2), "mb": round(len(quantized) / 1e6, 3),
            **_graph_counts(quantized), "calibration": {"shards": str(manifest.root), "split": cfg.split, **report}}


def check_calibration(info: dict[str, Any], shards: str, split: str | None, temporal: bool = False) -> Any:
    """The manifest of ``shards`` if they hold the model's classes (and frames in ``split``; None:
    classes only; ``temporal``: an LSTM-SSD to calibrate, which needs clips); a one-line
    StageError otherwise. Called before anything is written."""
    from pipeline.datasets import read_manifest

    manifest = read_manifest(shards)
    if temporal and manifest.kind != "clips":
        raise StageError(f"{manifest.path}: {manifest.kind} shards; an LSTM-SSD's int8 graph is calibrated on clip "
                         "shards, whose runs of consecutive frames give its state the ranges of a real stream")
    if list(info.get("class_names", [])) != manifest.classes:
        raise StageError(f"{manifest.path}: its classes {manifest.classes} are not the model's "
                         f"{info.get('class_names')}: calibrate on the model's own dataset")
    if split is not None and manifest.count(split, "frames") == 0:
        raise StageError(f"{manifest.path}: split {split!r} has no frames to calibrate on")
    return manifest


def export_detect(model: Any, data: bytes, out: Path, postprocess: Any) -> dict[str, Any]:
    """Write the graph ``data`` (float or int8, raw outputs) with its post-processing inside
    (:func:`ssd.graph_postprocess.append_postprocess`, ``model``'s priors) to ``out``; its report."""
    from ssd.export import save_onnx
    from ssd.graph_postprocess import append_postprocess

    detect = append_postprocess(data, model.priors.detach().cpu().numpy(), postprocess)
    save_onnx(out, detect)
    return {"mb": round(len(detect) / 1e6, 3), **_graph_counts(detect)}


def _graph_counts(data: bytes) -> dict[str, int]:
    import onnx

    graph = onnx.load_from_string(data).graph
    return {"nodes": len(graph.node), "convolutions": sum(n.op_type in ("Conv", "ConvInteger", "QLinearConv")
                                                          for n in graph.node)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a model file to ONNX.")
    parser.add_argument("model", help="model file (models/*.pt)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--decode", action="store_true",
                        help="outputs softmax scores and decoded boxes instead of raw logits and offsets")
    parser.add_argument("--opset", type=int, default=17, help="ONNX operator set version (default: %(default)s)")
    parser.add_argument("--no-fold", action="store_true", help="keep batch norm as separate operators")
    parser.add_argument("--no-simplify", action="store_true", help="skip onnx-simplifier")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch before writing")
    parser.add_argument("--tolerance", type=float,
                        help=f"largest absolute difference --verify accepts (default: {TOLERANCE})")
    parser.add_argument("--int8", metavar="FILE", help="also write a static int8 graph here")
    parser.add_argument("--calibration", metavar="SHARDS", help="--int8: shard directory to calibrate on")
    parser.add_argument("--calibration-split", help="--int8: split (default: train)")
    parser.add_argument("--calibration-frames", type=int, help="--int8: frames (default: 128)")
    args = parser.parse_args(argv)
    return run(lambda: export(args))


TOLERANCE = 1e-4


def _check_flags(args: argparse.Namespace) -> None:
    """StageError for a flag whose switch is off (it would be ignored); then the defaults."""
    flags = (("--tolerance", args.tolerance, args.verify), ("--calibration", args.calibration, args.int8),
             ("--calibration-split", args.calibration_split, args.int8),
             ("--calibration-frames", args.calibration_frames, args.int8))
    unused = [f for f, v, on in flags if v is not None and not on]
    if unused:
        switch = "--verify" if unused[0] == "--tolerance" else "--int8 FILE"
        raise StageError(f"{unused[0]} is read only with {switch}, which is not given: add it, or drop {unused[0]}")
    args.tolerance = TOLERANCE if args.tolerance is None else args.tolerance
    args.calibration_split = args.calibration_split or "train"
    args.calibration_frames = 128 if args.calibration_frames is None else args.calibration_frames


def export(args: argparse.Namespace) -> int:
    check_onnx_installed()
    from ssd.model_file import load_model_file

    if args.int8 and not args.calibration:
        raise StageError("--int8 needs --calibration SHARDS: the frames its activation ranges come from")
    _check_flags(args)
    outs = [Path(args.out)] + ([Path(args.int8)] if args.int8 else [])
    if args.int8 and outs[1].resolve() == outs[0].resolve():
        raise StageError(f"--int8 {args.int8}: the same file as --out; give the int8 graph its own name")
    for flag, out in zip(("--out", "--int8"), outs):
        if out.suffix.lower() != ".onnx" and not out.is_dir():
            raise StageError(f"{flag} {out}: an ONNX graph's name must end in .onnx")
        if out.is_dir():
            raise StageError(f"{out}: is a folder; give the .onnx file to write")
        if out.exists() and Path(args.model).exists() and out.samefile(args.model):
            raise StageError(f"{out}: is the input model file")
        check_writable(out.parent)
    if args.calibration_frames < 1:
        raise StageError(f"--calibration-frames {args.calibration_frames}: must be positive")
    model, info = load_model_file(args.model)  # a bad file: InputError, one line from stage.run
    temporal = bool(getattr(model, "is_temporal", False))
    calibration = check_calibration(info, args.calibration, args.calibration_split, temporal) if args.int8 else None
    # With --int8 the pair is written whole or not at all: the float graph goes under a temporary
    # name until the int8 one is made (bad calibration shards left a new float graph beside an old
    # int8 one, exit 2).
    float_path = outs[0].with_name(f"{TMP_PREFIX}{outs[0].name}") if args.int8 else outs[0]
    try:
        data, report = export_float(model, info, args.model, float_path, decoded=args.decode, opset=args.opset,
                                    fold=not args.no_fold, simplify=not args.no_simplify,
                                    tolerance=args.tolerance if args.verify else None)
        if args.int8:
            cfg = Int8Config(split=args.calibration_split, frames=args.calibration_frames)
            q = export_int8(model, data, outs[1], calibration, cfg)
            os.replace(float_path, outs[0])
    finally:
        if float_path != outs[0]:
            float_path.unlink(missing_ok=True)
    state = len(model.init_state(1)) if temporal else 0
    log.info("wrote %s (%s, %s outputs%s, opset %d, %d nodes, %.1f MB)", outs[0], info.get("arch", {}).get("name", "?"),
             "decoded" if args.decode else "raw", f", {state} state tensors" if state else "", args.opset,
             report["nodes"], report["mb"])
    if "max_difference" in report:
        log.info("onnxruntime matches PyTorch: largest difference %.3g", report["max_difference"])
    if args.int8:
        log.info("wrote %s (int8, %d calibration frames, %.1f MB)", outs[1],
                 q["calibration"]["calibration_frames"], q["mb"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
