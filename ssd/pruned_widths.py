"""The widths of a pruned model: recording them in its ``arch`` and rebuilding the model from it.

:func:`ssd.pruning.prune_model` removes channels; the model file keeps only the weights and the
``arch``. ``arch["pruned"]`` (:data:`ARCH_KEY`) holds ``{module name: {attribute: width}}`` for
the modules whose widths differ from what the builder builds, and :func:`rebuild_model` builds
the model and resizes those modules before the weights are loaded
(:func:`ssd.model_file.load_model_file`). No Torch-Pruning here: loading a pruned model needs
only torch.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ssd.lstm import BottleneckConvLSTMCell
from ssd.models import SSD, build_model
from ssd.models.vgg import L2Norm

#: ``{module name: {attribute: width}}``: what ``arch["pruned"]`` holds.
Widths = dict[str, dict[str, int]]

#: Key of the pruned widths in a model's ``arch``.
ARCH_KEY = "pruned"


def _conv_widths(m: nn.Conv2d) -> dict[str, int]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}


def _resize_conv(m: nn.Conv2d, w: Mapping[str, int]) -> None:
    cin, cout, groups = w["in_channels"], w["out_channels"], w["groups"]
    if min(cin, cout, groups) < 1 or cin % groups or cout % groups:
        raise ValueError(f"invalid convolution widths {dict(w)}")
    m.in_channels, m.out_channels, m.groups = cin, cout, groups
    m.weight = _blank(m.weight, (cout, cin // groups, *m.kernel_size))
    if m.bias is not None:
        m.bias = _blank(m.bias, (cout,))


def _bn_widths(m: nn.BatchNorm2d) -> dict[str, int]:
    return {"num_features": m.num_features}


def _resize_bn(m: nn.BatchNorm2d, w: Mapping[str, int]) -> None:
    n = w["num_features"]
    if n < 1:
        raise ValueError(f"invalid batch-norm width {n}")
    m.num_features = n
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, key)
        if t is not None:
            setattr(m, key, _blank(t, (n,)))


def _l2norm_widths(m: L2Norm) -> dict[str, int]:
    return {"channels": m.weight.numel()}


def _resize_l2norm(m: L2Norm, w: Mapping[str, int]) -> None:
    if w["channels"] < 1:
        raise ValueError(f"invalid L2Norm width {w['channels']}")
    m.weight = _blank(m.weight, (w["channels"],))


def _cell_widths(m: BottleneckConvLSTMCell) -> dict[str, int]:
    return {"in_channels": m.in_channels, "hidden_channels": m.hidden_channels, "out_channels": m.out_channels}


def _resize_cell(m: BottleneckConvLSTMCell, w: Mapping[str, int]) -> None:
    # Only the cell's own attributes (the zero state's width, ...): its convolutions are
    # recorded and resized on their own.
    if min(w.values()) < 1:
        raise ValueError(f"invalid cell widths {dict(w)}")
    m.in_channels, m.hidden_channels, m.out_channels = w["in_channels"], w["hidden_channels"], w["out_channels"]


def _blank(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    # A placeholder of the new shape; load_state_dict fills it.
    new = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


#: Module types whose widths can be recorded and restored: (type, widths, resize).
_RESIZABLE: list[tuple[type, Callable[[Any], dict[str, int]], Callable[[Any, Mapping[str, int]], None]]] = [
    (nn.Conv2d, _conv_widths, _resize_conv),
    (nn.BatchNorm2d, _bn_widths, _resize_bn),
    (L2Norm, _l2norm_widths, _resize_l2norm),
    (BottleneckConvLSTMCell, _cell_widths, _resize_cell),
]


def _resizer(m: nn.Module):
    for cls, widths, resize in _RESIZABLE:
        if type(m) is cls:
            return widths, resize
    return None


def module_widths(model: nn.Module) -> Widths:
    """The widths of every resizable module (convolutions, batch norms, L2Norm, ConvLSTM cells), by name."""
    out: Widths = {}
    for name, m in model.named_modules():
        r = _resizer(m)
        if r is not None:
            out[name] = r[0](m)
    return out


def check_recorded(model: nn.Module, shapes_before: Mapping[str, tuple[int, ...]]) -> None:
    # Every tensor whose shape changed must belong to a module whose widths are recorded, or the
    # pruned model could not be rebuilt from its arch.
    owners = {}
    for mname, m in model.named_modules():
        for pname, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            owners[f"{mname}.{pname}" if mname else pname] = m
    for key, t in model.state_dict().items():
        if tuple(t.shape) != shapes_before.get(key) and _resizer(owners[key]) is None:
            raise RuntimeError(
                f"pruning resized {key} of a {type(owners[key]).__name__}, whose widths can't be recorded"
            )


def resize_modules(model: nn.Module, widths: Mapping[str, Mapping[str, int]]) -> None:
    """Give the named modules of ``model`` the recorded ``widths`` (their weights become zeros).

    Raises:
        ValueError: a name the model lacks, a module that can't be resized, or widths that don't
            fit the module.
    """
    named = dict(model.named_modules())
    for name, w in widths.items():
        m = named.get(name)
        if m is None:
            raise ValueError(f"pruned widths name a module the architecture lacks: {name!r}")
        r = _resizer(m)
        if r is None:
            raise ValueError(f"pruned widths for {name!r}, a {type(m).__name__}, which can't be resized")
        expected = set(r[0](m))
        if not isinstance(w, Mapping) or set(w) != expected:
            raise ValueError(f"pruned widths for {name!r}: expected keys {sorted(expected)}, got {w!r}")
        try:
            r[1](m, w)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def rebuild_model(arch: Mapping[str, Any]) -> SSD:
    """:func:`ssd.models.build_model`, resizing the modules ``arch["pruned"]`` names (if any).

    The result has the pruned model's shapes (weights still to be loaded) and the full ``arch``,
    so saving it again keeps the record.
    """
    arch = dict(arch)
    widths = arch.pop(ARCH_KEY, None)
    model = build_model(arch)
    if widths:
        if not isinstance(widths, Mapping):
            raise ValueError(f"arch[{ARCH_KEY!r}] must map module names to widths")
        resize_modules(model, widths)
        model.arch = {**model.arch, ARCH_KEY: copy.deepcopy(dict(widths))}
    return model
