"""Export a model file to ONNX, for phone and server runtimes.

Usage::

    python -m pipeline.export MODEL --out model.onnx [--decode] [--opset 17] [--verify]

Any model file works (SSD300, SSDLite, LSTM-SSD, pruned ones too). The graph
(:mod:`ssd.export`) takes ``images``: ``float32 [B, 3, S, S]`` RGB in ``[0, 1]``
(the normalisation is inside) and returns

- by default the raw predictions ``class_logits [B, P, C]`` and ``box_deltas [B, P, 4]``;
- with ``--decode`` ``scores [B, P, C]`` (softmax, column 0 the background) and
  ``boxes [B, P, 4]`` (xyxy normalised to [0, 1]): threshold and NMS in the runtime;
- for LSTM-SSD also the recurrent state: inputs ``state_0 .. state_{2k-1}`` (zeros start a
  video) and outputs ``new_state_0 ..``, fed back on the next frame.

The batch axis is dynamic. The class names, input size and the rest are in the model's
``metadata_props``. The file is checked with ``onnx.checker`` and written atomically;
``--verify`` also runs it in onnxruntime against PyTorch on random input (a temporal
model: 4 frames, state fed back) and fails if any output differs by more than
``--tolerance``.

Exit codes: 0 written, 2 bad input (missing or unreadable model file, onnx not
installed, a verification that failed).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.stage import StageError, check_writable, run

log = logging.getLogger("pipeline.export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a model file to ONNX.")
    parser.add_argument("model", help="model file (models/*.pt)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--decode", action="store_true",
                        help="outputs softmax scores and decoded boxes instead of raw logits and offsets")
    parser.add_argument("--opset", type=int, default=17, help="ONNX operator set version (default: %(default)s)")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch after writing")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference --verify accepts (default: %(default)s)")
    args = parser.parse_args(argv)
    return run(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401  (the exporter's output is checked with it)
    except ImportError:
        raise StageError("onnx is not installed: pip install -c constraints.txt '.[export]'") from None
    from ssd.export import MAX_OPSET, MIN_OPSET, onnxruntime_difference, save_onnx
    from ssd.model_file import load_model_file

    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise StageError(f"--opset {args.opset}: supported are {MIN_OPSET} to {MAX_OPSET}")
    out = Path(args.out)
    if out.exists() and Path(args.model).exists() and out.samefile(args.model):
        raise StageError(f"--out {out}: is the input model file")
    check_writable(out.parent)
    model, info = load_model_file(args.model)  # a bad file: InputError, one line from stage.run
    arch = info.get("arch", {})
    metadata = {
        "class_names": info.get("class_names", []),
        "arch": arch.get("name", ""),
        "pruned": bool(arch.get("pruned")),
        "source": Path(args.model).name,
    }
    save_onnx(out, model, decoded=args.decode, opset=args.opset, metadata=metadata)
    temporal = bool(getattr(model, "is_temporal", False))
    state = len(model.init_state(1)) if temporal else 0
    log.info(
        "wrote %s (%s, %s outputs%s, opset %d, %.1f MB)", out, arch.get("name", "?"),
        "decoded" if args.decode else "raw", f", {state} state tensors" if state else "", args.opset,
        out.stat().st_size / 1e6,
    )
    if args.verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise StageError("--verify needs onnxruntime: pip install -c constraints.txt '.[export]'") from None
        diff = onnxruntime_difference(model, out.read_bytes(), args.decode, frames=4 if temporal else 1)
        if diff > args.tolerance:
            raise StageError(f"{out}: onnxruntime differs from PyTorch by {diff:.3g} (> {args.tolerance:g})")
        log.info("onnxruntime matches PyTorch: largest difference %.3g", diff)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
