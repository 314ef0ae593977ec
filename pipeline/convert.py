"""Turn a checkpoint of another project into a model file.

Usage::

    python -m pipeline.convert CHECKPOINT --out models/NAME.pt [--format F] [--classes a,b,...]

Formats (``--format``; by default recognised from the checkpoint's keys):

- ``ssd.pytorch``: an SSD300 trained with ssd.pytorch (VOC class names by default
  when it has 21 classes);
- ``ssds.pytorch``: an SSDLite-MobileNetV2 trained with ssds.pytorch v0.3.1 (likewise);
- ``torchvision-ssd300``: ``torchvision.models.detection.ssd300_vgg16``'s state dict;
- ``torchvision-ssdlite320``: ``ssdlite320_mobilenet_v3_large``'s state dict
  (both with torchvision's COCO names by default when they have 91 classes).

The checkpoint is a ``torch.save`` of a state dict (or of a dict holding one under
``state_dict`` or ``model``; a ``module.`` prefix is removed), read with
``weights_only=True``: it runs no code. The model file records the input
convention of the source (channel order, scale, mean, std), so evaluate, detect,
benchmark and export feed it what it was trained on. ``docs/pretrained.md``
lists where each format comes from and what parity was checked.

Exit codes: 0 written, 2 bad input (unreadable file, unknown format, keys that don't
fit the format, class names that don't fit the model).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.stage import StageError, check_writable, run

log = logging.getLogger("pipeline.convert")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert another project's checkpoint into a model file.")
    parser.add_argument("checkpoint", help="the foreign checkpoint (.pth / .pt)")
    parser.add_argument("--out", required=True, help="the model file to write (models/NAME.pt)")
    parser.add_argument("--format", help="the checkpoint's format (default: recognised from its keys)")
    parser.add_argument("--classes", help="comma-separated object class names, in the checkpoint's label order "
                                          "(default: the format's own, when it has them)")
    args = parser.parse_args(argv)
    return run(lambda: convert(args))


def convert(args: argparse.Namespace) -> int:
    from ssd.model_file import load_state_dict_file, save_model_file
    from ssd.weights import convert as conversion

    out, source = Path(args.out), Path(args.checkpoint)
    if out.exists() and source.exists() and out.samefile(source):
        raise StageError(f"--out {out}: is the checkpoint itself")
    check_writable(out.parent)
    state = load_state_dict_file(source)  # InputError (one line) for a bad file
    try:
        converted = conversion.convert(state, args.format)
        model = conversion.build_converted(converted)
    except ValueError as e:
        raise StageError(f"{source}: {e}") from None
    names = _class_names(args.classes, converted, model.num_classes - 1, source)
    meta = {"converted_from": {"file": source.name, "format": converted.source}}
    save_model_file(out, model, names, meta=meta)
    norm = model.input_norm
    log.info("wrote %s: %s, %d classes, %d priors, input %s x%g mean %s std %s", out, converted.source, len(names),
             model.priors.shape[0], norm.channels.upper(), norm.scale, list(norm.mean), list(norm.std))
    return 0


def _class_names(given: str | None, converted, count: int, source: Path) -> list[str]:
    if given is not None:
        names = [n.strip() for n in given.split(",")]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise StageError(f"--classes: names must be non-empty and distinct, got {given!r}")
    elif converted.class_names is not None:
        names = list(converted.class_names)
    else:
        raise StageError(f"{source}: the model has {count} object classes and the format doesn't name them: "
                         f"give --classes with {count} names")
    if len(names) != count:
        raise StageError(f"--classes: {len(names)} names for a model with {count} object classes")
    return names


if __name__ == "__main__":
    raise SystemExit(main())
