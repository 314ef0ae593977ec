"""What a training checkpoint must agree with to be resumed, and what may change in between.

A run resumes from its newest checkpoint only when everything that shapes its trajectory is
what it was: the whole training section except the keys in :data:`RESUME_SAFE`, the
contents (not only the paths) of the files it starts from and trains on, the class list and
the mixed precision actually used. Anything else is refused with the keys that differ
(``--restart`` discards the checkpoint), so a rerun with a changed learning rate can't train
on with the old one while the outputs record the new one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

#: Keys of a training section that may change between an interrupted run and its resumption,
#: and why. Every other key is part of the fingerprint. Documented in docs/running-at-scale.md
#: ("What is safe to change between runs"); keep the two in step.
RESUME_SAFE: dict[str, str] = {
    "steps": "extends (or shortens) the run; the schedule from the resume step on follows the new total",
    "checkpoint_every": "when checkpoints are written, not what is computed",
    "keep_last": "how many checkpoints are kept",
    "keep_checkpoints": "whether checkpoints are kept once the run has finished",
    "log_every": "how often a row is logged",
    "trace": "a debug trace of what is computed",
    "max_nonfinite": "when a run of non-finite losses stops the run",
    "data.num_workers": "the data order and augmentation do not depend on it",
    "validation.num_workers": "the validation samples and their order do not depend on it",
    "models_dir": "where the outputs go",
    "metrics_dir": "where the outputs go",
    "plots_dir": "where the outputs go",
    "runs_dir": "where the outputs go",
    "checkpoints_dir": "where the checkpoints are (the run is found there)",
}


def fingerprint(
    config: Mapping[str, Any], classes: list[str], files: Mapping[str, str | None], mixed_precision: str,
    shards: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run: ``config`` (a training section as a plain dict) without the
    :data:`RESUME_SAFE` keys, the classes, the mixed precision in use, and the SHA-256 of each of
    ``files`` (``{config key: path}``: the data manifest for ``data.shards``, the weights files;
    None: not used). The keys of ``files`` count by contents, not by path: the files may move.

    ``shards``: ``{shard name: size in bytes}`` of the dataset (``contents.data.shard_sizes``).
    The manifest lists shards and counts samples; ``prepare`` also writes each shard's SHA-256
    into it, so a dataset prepared again with other pixels or boxes (a corrected box keeps every
    shard's size: tar pads to 10 KiB records) has another manifest. The sizes cover manifests
    without digests (shards made by other tools). The bytes are not hashed here: that would read
    the whole dataset at every start."""
    config = _without(config, {**RESUME_SAFE, **files})
    digests = {key: weights_digest(path) if path else None for key, path in sorted(files.items())}
    if shards is not None:
        listing = "\n".join(f"{name}\t{size}" for name, size in sorted(shards.items()))
        digests["data.shard_sizes"] = hashlib.sha256(listing.encode()).hexdigest()
    return {"config": config, "classes": list(classes), "mixed_precision": mixed_precision, "contents": digests}


def differences(now: Mapping[str, Any], then: Mapping[str, Any]) -> list[str]:
    """``"key: <checkpoint's> -> <now>"`` for every key where two fingerprints differ."""
    if "config" not in then:
        return ["fingerprint: the checkpoint was written by an older version of the pipeline"]
    out: list[str] = []
    for group in now:
        _diff(then.get(group, _MISSING), now[group], "" if group == "config" else f"{group}.", out)
    return out


def refusal(checkpoint: os.PathLike | str, diffs: list[str], shown: int = 4) -> str:
    """The one-line error for a checkpoint that doesn't match the run."""
    more = f" (and {len(diffs) - shown} more)" if len(diffs) > shown else ""
    return (
        f"{checkpoint}: the checkpoint was trained with other settings: {'; '.join(diffs[:shown])}{more}. "
        "Rerun with the checkpoint's values to resume it, or with --restart to discard it and start over "
        f"(under `dvc repro`, which passes no flags: delete {Path(checkpoint).parent}) "
        f"(keys that may change on resume: {', '.join(RESUME_SAFE)})"
    )


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes (None if it doesn't exist: the run fails on it elsewhere)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of what a model file computes (architecture, input convention, classes, weights),
    leaving out its ``meta``: a training's meta records its wall time and speed, so two runs that
    trained the same weights (the prune stage's control, retrained after a preemption) write
    different bytes. Any other file (a manifest, a foreign .pth): :func:`file_digest`."""
    import json

    import torch

    from ssd.model_file import ModelFileError, read_model_file

    path = Path(path)
    if not path.is_file() or path.suffix not in (".pt", ".pth"):
        return file_digest(path)
    try:
        payload = read_model_file(path)
    except ModelFileError:
        return file_digest(path)
    h = hashlib.sha256()
    described = {k: v for k, v in payload.items() if k not in ("meta", "state_dict")}
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(payload["state_dict"].items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _without(config: Mapping[str, Any], dotted: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in dotted:
            continue
        out[key] = _without(value, dotted, name + ".") if isinstance(value, Mapping) else value
    return out


def _diff(then: Any, now: Any, prefix: str, out: list[str]) -> None:
    if isinstance(then, dict) and isinstance(now, dict):
        for key in list(then) + [k for k in now if k not in then]:
            _diff(then.get(key, _MISSING), now.get(key, _MISSING), f"{prefix}{key}.", out)
        return
    if then != now:
        out.append(f"{prefix.rstrip('.')}: {_show(then)} in the checkpoint, {_show(now)} now")


class _Missing:
    def __repr__(self) -> str:
        return "absent"


_MISSING = _Missing()


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"file {value[:8]}"  # a digest: the file's contents changed
    return repr(value)
