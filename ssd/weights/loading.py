"""Copying weights into a model, with a report of what loaded and what starts fresh.

A load never leaves a layer random without saying so: :class:`LoadReport`
counts the tensors loaded and names each layer that keeps its initialisation
with the reason (not in the source, or a different shape there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Tensors that belong to the model's own configuration, never to a weights source:
#: the priors (from the prior config) and the input statistics (from the input convention).
CONFIG_TENSORS = ("priors", "mean", "std")


@dataclass
class LoadReport:
    """What :func:`load_matching` did."""

    source: str
    loaded: list[str] = field(default_factory=list)
    """Model keys that took the source's tensor."""
    fresh: dict[str, str] = field(default_factory=dict)
    """Layer (key prefix) -> why it keeps its initialisation."""
    total: int = 0
    """Tensors the model has (configuration tensors and batch counters not counted)."""
    unused: list[str] = field(default_factory=list)
    """Source keys the model has no use for."""
    by_design: set[str] = field(default_factory=set)
    """Fresh layers whose initialisation is the design (e.g. SSD's L2Norm scale of 20): no warning."""

    def summary(self) -> str:
        """One line: counts, then the fresh layers with their reasons."""
        line = f"{self.source}: loaded {len(self.loaded)} of {self.total} tensors"
        if self.fresh:
            reasons: dict[str, list[str]] = {}
            for layer, why in self.fresh.items():
                reasons.setdefault(why, []).append(layer)
            parts = [f"{_short_list(layers)} ({why})" for why, layers in reasons.items()]
            line += "; starting fresh: " + "; ".join(parts)
        if self.unused:
            line += f"; {len(self.unused)} source tensors unused ({_short_list(self.unused)})"
        return line

    def log(self) -> None:
        """Log the summary: a warning when a layer other than :attr:`by_design` starts fresh."""
        (log.warning if set(self.fresh) - self.by_design else log.info)("%s", self.summary())


def _short_list(names: list[str], first: int = 6) -> str:
    shown = ", ".join(names[:first])
    return shown + (f" and {len(names) - first} more" if len(names) > first else "")


def _counted(key: str) -> bool:
    return key.rsplit(".", 1)[-1] != "num_batches_tracked" and key not in CONFIG_TENSORS


def _layer(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def load_matching(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    labels: Mapping[str, str] | None = None,
    by_design: Mapping[str, str] | None = None,
) -> LoadReport:
    """Copy every same-named, same-shaped tensor of ``state_dict`` into ``model``.

    The configuration tensors (:data:`CONFIG_TENSORS`) are never copied.

    Args:
        labels: layer -> a readable name for the report (``features.31`` -> ``conv6``).
        by_design: layer -> the reason it is meant to start from its initialisation.

    Returns:
        The report (not logged: call :meth:`LoadReport.log`).
    """
    labels, by_design = dict(labels or {}), dict(by_design or {})
    own = model.state_dict()
    report = LoadReport(source=source, total=sum(1 for k in own if _counted(k)))
    usable = {}
    for key, value in state_dict.items():
        if key in CONFIG_TENSORS or key not in own:
            if key not in CONFIG_TENSORS and _counted(key):
                report.unused.append(key)
            continue
        if own[key].shape != value.shape:
            report.fresh.setdefault(_layer(key), "another shape in the source")
            continue
        usable[key] = value
    for key in own:
        if _counted(key) and key not in usable:
            report.fresh.setdefault(_layer(key), by_design.get(_layer(key), "not in the source"))
    report.by_design = {layer for layer in report.fresh if layer in by_design}
    report.fresh = {labels.get(layer, layer): why for layer, why in report.fresh.items()}
    report.by_design = {labels.get(layer, layer) for layer in report.by_design}
    model.load_state_dict(usable, strict=False)
    report.loaded = [k for k in usable if _counted(k)]
    return report
