"""The model file: one file holding a detector's weights and everything needed to rebuild it.

Contents (a ``torch.save`` of plain data, loadable with ``weights_only=True``)::

    {
      "format": "ssd-model", "version": 1,
      "arch": {"name": builder, **builder arguments},   # model.arch; a pruned model's also holds
                                                         # "pruned": {module: widths} (ssd.pruned_widths)
      "class_names": [...],                              # object classes, label k -> class_names[k-1]
      "image_size": S, "mean": [...], "std": [...],      # the input the model expects: mean/std
                                                         # for [0, 1] pixels in the network's order,
      "input_norm": {"channels": "rgb"|"bgr", "scale": 1|255, "mean": [...], "std": [...]},
                                                         # the same in the weights' own terms
      "state_dict": {...},
      "meta": {...},                                     # free-form: training config, metrics, ...
    }

Loading needs nothing but this file. Evaluate, prune, benchmark, detect and
export all take it. This module and :func:`load_state_dict_file` are the
library's only readers and writers of model weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ssd.atomic import atomic_open
from ssd.errors import InputError
from ssd.models import SSD
from ssd.pruned_widths import rebuild_model

FORMAT = "ssd-model"
VERSION = 1


class ModelFileError(InputError):
    """A model file that can't be read, with a one-line message naming the file."""


def save_model_file(
    path: str | os.PathLike,
    model: SSD,
    class_names: list[str],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    if len(class_names) + 1 != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.num_classes - 1} object classes"
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": dict(model.arch),
        "class_names": list(class_names),
        "image_size": model.image_size,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "input_norm": model.input_norm.to_dict(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a model file, checked for format; :class:`ModelFileError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: not a readable model file (the file is empty)")
    if path.suffix.lower() == ".onnx":  # torch's own error would advise weights_only=False
        raise ModelFileError(f"{path}: an ONNX graph, not a PyTorch model file (.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise ModelFileError(f"{path}: not a readable model file ({_describe(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an {FORMAT} file (a raw checkpoint or state dict?)")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{path}: model file version {payload.get('version')} is not supported (expected {VERSION})")
    names, arch = payload.get("class_names"), payload.get("arch")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"{path}: class_names must be a list of names")
    if not isinstance(arch, dict) or arch.get("num_classes") != len(names) + 1:
        got = arch.get("num_classes") if isinstance(arch, dict) else None
        objects = f"{got - 1} object classes" if isinstance(got, int) else "no class count"
        raise ModelFileError(f"{path}: {len(names)} class names for a model with {objects}")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: no state_dict of tensors in the model file")
    return payload


def _describe(e: BaseException) -> str:
    """``Type: first line of the message`` (just the type for an empty message)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def load_model_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[SSD, dict[str, Any]]:
    """Rebuild the model stored in ``path``.

    Returns:
        ``(model, info)``: the model in eval mode on ``map_location``, and the file's other
        contents (``class_names``, ``image_size``, ``arch``, ``meta``, ...), without the weights.
    """
    payload = read_model_file(path)
    state = payload.pop("state_dict")
    try:
        model = rebuild_model(payload["arch"])  # build_model, plus the widths of a pruned model
        model.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelFileError(f"{path}: can't rebuild the model ({_describe(e)})") from None
    model.eval()
    return model.to(map_location), payload


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state dict (e.g. torchvision backbone weights saved with ``torch.save``).

    Accepts a bare state dict or a dict holding one under ``"state_dict"`` or ``"model"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors")
    return obj
