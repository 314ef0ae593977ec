"""Foreign detector checkpoints -> this project's models.

Each source format is one module exposing a :class:`Converter`: how to
recognise its state dict, and how to turn it into an ``arch`` (the builder
arguments, input convention included) plus a state dict in this project's keys.
:func:`convert` picks the converter (named, or recognised from the keys) and
:func:`build_converted` builds the model and loads the tensors strictly: every
tensor of the model must come from the source, except the configuration
tensors (priors, input statistics) that the arch defines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from ssd.models import SSD, build_model
from ssd.weights.loading import CONFIG_TENSORS


@dataclass
class Converted:
    """A foreign checkpoint in this project's terms."""

    arch: dict[str, Any]
    state_dict: dict[str, Tensor]
    source: str
    """The format's name, for logs and model-file metadata."""
    class_names: list[str] | None = None
    """The classes the source was trained on, when the format fixes them (torchvision's COCO)."""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Converter:
    name: str
    description: str
    """The checkpoint it reads and the keys that identify it (for error messages and docs)."""
    matches: Callable[[Mapping[str, Tensor]], bool]
    convert: Callable[[Mapping[str, Tensor]], Converted]


def rename_keys(state_dict: Mapping[str, Tensor], rules: Sequence[tuple[str, str]], what: str) -> dict[str, Tensor]:
    """Apply the first matching ``(regex, replacement)`` rule to every key (``re.fullmatch``).

    Raises ``ValueError`` naming the first few keys no rule matches, and ``what`` was expected.
    """
    out, unknown = {}, []
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise ValueError(f"{len(unknown)} keys are not part of {what}: {shown}")
    return out


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove a ``DataParallel``-style prefix when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def class_count(state_dict: Mapping[str, Tensor], cls_key: str, box_key: str) -> int:
    """Classes (with the background) from a head's first class and box layers: ``(A*C) / (A*4) * 4``."""
    cls_out, box_out = state_dict[cls_key].shape[0], state_dict[box_key].shape[0]
    if box_out % 4 or cls_out % (box_out // 4):
        raise ValueError(f"{cls_key} has {cls_out} outputs, not a multiple of the {box_out // 4} priors per location")
    return cls_out // (box_out // 4)


def _converters() -> dict[str, Converter]:
    from ssd.weights import ssd_pytorch, ssds_pytorch, torchvision_ssd

    found = [ssd_pytorch.CONVERTER, ssds_pytorch.CONVERTER, *torchvision_ssd.CONVERTERS]
    return {c.name: c for c in found}


def formats() -> dict[str, Converter]:
    """Every known format, by name."""
    return _converters()


def convert(state_dict: Mapping[str, Tensor], fmt: str | None = None) -> Converted:
    """Convert a foreign state dict; ``fmt`` names the format, ``None`` recognises it from the keys.

    Raises ``ValueError`` (one line) for an unknown format name, a dict no format recognises
    (naming its first keys and the formats known), or keys the format doesn't have.
    """
    known = _converters()
    state_dict = strip_prefix(state_dict)
    if fmt is not None:
        if fmt not in known:
            raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(known)}")
        return known[fmt].convert(state_dict)
    for converter in known.values():
        if converter.matches(state_dict):
            return converter.convert(state_dict)
    first = ", ".join(list(state_dict)[:4])
    expected = "; ".join(f"{c.name}: {c.description}" for c in known.values())
    raise ValueError(f"no known format has keys like {first}, ... (known formats: {expected})")


def build_converted(converted: Converted) -> SSD:
    """The model of a conversion, every tensor loaded (strictly: nothing is left at its initialisation).

    Raises ``ValueError`` naming the first missing or mis-shaped tensors.
    """
    model = build_model(converted.arch)
    own = model.state_dict()
    state = dict(converted.state_dict)
    missing = [k for k in own if k not in state and k not in CONFIG_TENSORS and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)):
        if keys:
            raise ValueError(f"{converted.source}: {len(keys)} tensors {problem}: {', '.join(keys[:3])}")
    for k in own:
        state.setdefault(k, own[k])  # configuration tensors and batch counters
    model.load_state_dict(state)
    return model.eval()
