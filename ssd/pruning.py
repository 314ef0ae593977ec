"""Structured channel pruning that physically removes channels.

Filters are ranked by the L1 norm of their weights (Li et al., "Pruning Filters
for Efficient ConvNets", arXiv 1608.08710) and the weakest are *removed*, not
masked: the convolution's output channels, its batch norm, and every consumer
of those channels go (the next convolution's inputs; a depthwise convolution
and its batch norm in full; every branch of a MobileNetV2 residual addition;
the SSD head's predictors). Torch-Pruning's dependency graph (DepGraph, arXiv
2301.12900) works out which channels are coupled: a *group* is a set of
channels that can only go together, and a channel's importance is the mean L1
norm of every weight slice it owns in the group (conv filters, consumer
columns, batch-norm scales).

The head's final prediction convolutions keep their output channels, so the
detector's outputs keep their shapes: the same ``P`` priors and ``C`` classes.

Two ways to choose how many channels go (:class:`PruneConfig`):

- ``uniform``: every group loses ``ratio`` of its channels (Li et al.'s
  per-layer scheme with one fraction everywhere);
- ``global``: channels are ranked across all groups and the weakest ``ratio``
  of them all go, at most ``max_layer_ratio`` of any one group. Scores are
  divided by their group's mean first: the raw L1 norm of a 9-weight depthwise
  filter and of a 960-input 1x1 filter are not comparable.

Pruned model files. A pruned model's widths differ from what its builder
builds. :func:`prune_model` records them in ``model.arch["pruned"]``
(``{module name: {"out_channels": ..., ...}}``, plain data, only the modules
that differ from the builder's), so the model file's ``arch`` still describes
the architecture completely; :func:`rebuild_model` builds the model and
resizes those modules before the weights are loaded, which is what
:func:`ssd.model_file.load_model_file` does.

Temporal models (LSTM-SSD, ``model.is_temporal``): Torch-Pruning can't trace a
ConvLSTM cell unrolled inside ``forward``. While the graph is built and pruned,
a 1x1 probe convolution stands in for each cell, so the graph decides the
cell's input and output channels together with the layers around it; the
cell's own hidden and bottleneck units are then scored by the L1 norm of their
filters (a hidden unit: its four gate filters) and cut here with the library's
low-level ``prune_conv_out_channels`` / ``prune_conv_in_channels`` (:mod:`ssd.pruning_cells`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ssd.models.vgg import L2Norm

from ssd.pruning_cells import CellProbe, kept_count, plan_cell, prune_cell, temporal_cells

# Recording and rebuilding the widths of a pruned model: ssd.pruned_widths (named here too).
from ssd.pruned_widths import ARCH_KEY, Widths, check_recorded, module_widths, rebuild_model, resize_modules  # noqa: F401


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.5
    """Fraction of channels removed: of every group (uniform) or of all of them (global)."""
    mode: Literal["uniform", "global"] = "uniform"
    """uniform: the same fraction per group; global: channels ranked across groups."""
    round_to: int | None = 8
    """Kept widths are rounded to the nearest multiple of this (at least one multiple, at most the
    original width): vectorised CPU kernels and GPU tensor cores like multiples of 8. null or 1:
    no rounding."""
    ignore: tuple[str, ...] = ()
    """fnmatch patterns of module names (e.g. ``backbone.features.0.*``) whose output channels are
    kept; their inputs still shrink with their producers. The head's prediction convolutions are
    always kept."""
    max_layer_ratio: float = 0.8
    """Global mode: at most this fraction of any one group goes, so no layer is pruned away."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the fraction of channels removed), got {self.ratio}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise ValueError(f"max_layer_ratio must be in (0, 1), got {self.max_layer_ratio}")
        if self.mode == "global" and self.ratio > self.max_layer_ratio:
            raise ValueError(
                f"ratio {self.ratio} is above max_layer_ratio {self.max_layer_ratio}: "
                "no group may lose that much, so the global ratio can't be reached"
            )
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to must be at least 1 (or null), got {self.round_to}")


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_model` did."""

    channels_before: int
    """Prunable channels (summed over groups) before."""
    channels_after: int
    groups: dict[str, tuple[int, int]]
    """Per group of coupled channels, named by the convolution that produces them (a cell's own
    units as ``temporal.K.hidden`` / ``.bottleneck``): ``(channels before, after)``."""
    widths: Widths
    """The model's pruned widths, as stored in ``model.arch["pruned"]``."""


# ---------------------------------------------------------------------------------------------
# Pruning


def prune_model(model: nn.Module, config: PruneConfig, image_size: int | None = None) -> PruneResult:
    """Remove the least important channels of ``model`` in place.

    Args:
        model: a detector (``model.head.cls_layers`` / ``box_layers`` hold the predictors), or a
            temporal one (``model.is_temporal``, its cells in ``model.temporal``); its mode
            (train/eval) is restored afterwards, its batch-norm statistics are untouched.
        config: how much and how to choose.
        image_size: side of the square dummy input the dependency graph is traced with
            (default ``model.image_size``).

    Returns:
        What was removed; ``model.arch["pruned"]`` records the new widths (merged with those of an
        earlier pruning) so that :func:`rebuild_model` can rebuild it.

    Raises:
        ValueError: an ``ignore`` pattern that matches no module, or a ratio that would leave a
            group with no channel (the model is then left as it was).
    """
    import torch_pruning as tp

    size = int(image_size or model.image_size)
    names = {m: n for n, m in model.named_modules()}
    ignored = _ignored_modules(model, config.ignore)
    cells = temporal_cells(model)
    frozen = {key for key, cell in cells.items() if any(m in ignored for m in cell.modules())}
    # Decided before anything is cut, so that a ratio that is too high leaves the model whole.
    cell_plans = {key: plan_cell(cell, f"temporal.{key}", config.ratio, config.round_to, key in frozen)
                  for key, cell in cells.items()}
    shapes_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    widths_before = module_widths(model)

    was_training = model.training
    model.eval()  # the tracing forward must not update batch-norm statistics
    probes = {key: CellProbe(cell) for key, cell in cells.items()}
    for key, probe in probes.items():
        model.temporal[key] = probe
        names[probe.conv] = f"temporal.{key}"
        if key in frozen:
            ignored.add(probe.conv)  # an ignored cell keeps its output channels
    try:
        example = torch.rand(1, 3, size, size, device=_device(model))
        outputs_before: list[tuple[int, ...]] = []

        def trace(m: nn.Module, x: Tensor) -> list[Tensor]:
            out = _outputs(m, x)
            outputs_before[:] = [tuple(t.shape) for t in out]
            return out

        graph = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=example,
            forward_fn=trace,
            # L2Norm's per-channel scale follows its input's channels (dim 0).
            unwrapped_parameters=[(m.weight, 0) for m in model.modules() if isinstance(m, L2Norm)],
        )
        plan, labels = _score_groups(graph, ignored, names, config)
        groups, cut = _cut_groups(graph, plan, _choose(plan, names, config), labels, probes)
    finally:
        for key, cell in cells.items():
            model.temporal[key] = cell
        model.train(was_training)

    for key, cell in cells.items():
        groups.update(prune_cell(cell, f"temporal.{key}", cell_plans[key], cut[key]["in"], cut[key]["out"]))
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            outputs_after = [tuple(t.shape) for t in _outputs(model, example)]
        finally:
            model.train(was_training)
    if outputs_after != outputs_before:  # the head's predictors are ignored: can't happen
        raise RuntimeError(f"pruning changed the output shapes {outputs_before} -> {outputs_after}")

    check_recorded(model, shapes_before)
    widths = _record_widths(model, widths_before)
    before = sum(b for b, _ in groups.values())
    after = sum(a for _, a in groups.values())
    return PruneResult(channels_before=before, channels_after=after, groups=groups, widths=widths)


def _score_groups(graph, ignored: set[nn.Module], names: dict[nn.Module, str], config: PruneConfig
                  ) -> tuple[list[tuple[nn.Module, Any, Tensor]], list[str]]:
    """Every prunable group of the dependency graph with its channels' L1 scores:
    ``[(root module, pruning function, scores)]`` and each group's name."""
    import torch_pruning as tp

    importance = tp.importance.MagnitudeImportance(
        p=1, group_reduction="mean", normalizer="mean" if config.mode == "global" else None
    )
    plan = []
    labels = []
    for group in graph.get_all_groups(ignored_layers=list(ignored), root_module_types=[nn.Conv2d]):
        _check_group(group, names)
        scores = importance(group)
        if scores is None:
            continue
        plan.append((group[0].dep.target.module, group[0].dep.handler, scores.detach().float().cpu()))
        labels.append(_group_label(group, graph, names))
    return plan, labels


def _cut_groups(graph, plan, removed: list[list[int]], labels: list[str], probes: dict[str, CellProbe]
                ) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, list[int]]]]:
    """Remove the chosen channels of every group. Returns each group's ``(before, after)`` widths
    and, per temporal cell, the channels the graph cut from its input (``"in"``) and output
    (``"out"``), which :func:`prune_cell` then removes inside the cell."""
    groups: dict[str, tuple[int, int]] = {}
    probe_of = {probe.conv: key for key, probe in probes.items()}
    cut: dict[str, dict[str, list[int]]] = {key: {"in": [], "out": []} for key in probes}
    for (root, handler, scores), idxs, label in zip(plan, removed, labels):
        groups[label] = (len(scores), len(scores) - len(idxs))
        if not idxs:
            continue
        group = graph.get_pruning_group(root, handler, idxs)
        for dep, dep_idxs in group:  # what the graph cut from a cell's inputs and outputs
            key = probe_of.get(dep.target.module)
            if key is not None:
                side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
                cut[key][side] = sorted(int(i) for i in dep_idxs)
        group.prune()
    return groups, cut


def _record_widths(model: nn.Module, widths_before: dict[str, Any]) -> dict[str, Any]:
    """Record the widths that changed in ``model.arch`` (merged with an earlier pruning's), so
    that :func:`rebuild_model` can rebuild the model; returns them."""
    changed = {n: w for n, w in module_widths(model).items() if widths_before.get(n) != w}
    arch = dict(getattr(model, "arch", None) or {})
    widths = {**arch.get(ARCH_KEY, {}), **changed}
    if hasattr(model, "arch") and widths:
        model.arch = {**arch, ARCH_KEY: widths}
    return widths


def _outputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    # The tensors the dependency graph is traced back from: class logits and box offsets (a
    # temporal model's new state is left out: its cell is pruned by hand).
    out = model(images)
    return list(out[:2])


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _ignored_modules(model: nn.Module, patterns: Sequence[str]) -> set[nn.Module]:
    """The modules whose output channels are kept: the head's predictors and ``patterns``' matches."""
    ignored: set[nn.Module] = set()
    head = model.head
    for branch in [*head.cls_layers, *head.box_layers]:
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        ignored.add(convs[-1])  # the convolution that writes the predictions
    named = dict(model.named_modules())
    for pattern in patterns:
        matches = [m for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(f"ignore pattern {pattern!r} matches no module of the model")
        for m in matches:
            ignored.update(m.modules())
    return ignored


def _check_group(group: Any, names: Mapping[nn.Module, str]) -> None:
    # Grouped (not depthwise) convolutions would need their channels pruned per group; none of
    # our architectures has one, so refuse rather than cut them wrong.
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels):
            raise ValueError(f"{names.get(m, m)}: grouped convolutions (groups={m.groups}) can't be pruned")


def _group_label(group: Any, graph: Any, names: Mapping[nn.Module, str]) -> str:
    # A group is named after the first convolution that produces its channels (not a depthwise
    # one, which only passes them through), e.g. "backbone.features.13.conv.2".
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups == 1 and graph.is_out_channel_pruning_fn(dep.handler):
            return names[m]
    return names[group[0].dep.target.module]


def _choose(
    plan: Sequence[tuple[nn.Module, Callable, Tensor]], names: Mapping[nn.Module, str], config: PruneConfig
) -> list[list[int]]:
    """Per group, the indices of the channels to remove (its lowest scores)."""
    if config.ratio == 0 or not plan:
        return [[] for _ in plan]
    if config.mode == "uniform":
        counts = []
        for root, _, scores in plan:
            n = len(scores)
            target = n * (1.0 - config.ratio)
            if target < 1:
                raise ValueError(
                    f"ratio {config.ratio} would leave no channel of the {n} of {names[root]}; "
                    "lower the ratio or add the layer to ignore"
                )
            counts.append(n - kept_count(n, target, config.round_to))
    else:
        # Global ranking: remove the lowest normalised scores across all groups, skipping a
        # group once it has lost max_layer_ratio of its channels.
        sizes = [len(s) for _, _, s in plan]
        caps = [n - max(1, math.ceil(n * (1.0 - config.max_layer_ratio))) for n in sizes]
        pool = torch.cat([s for _, _, s in plan])
        owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        goal = int(config.ratio * len(pool))
        taken = [0] * len(plan)
        done = 0
        for j in torch.argsort(pool, stable=True).tolist():
            if done == goal:
                break
            g = int(owner[j])
            if taken[g] < caps[g]:
                taken[g] += 1
                done += 1
        # Rounding to round_to may go down past a cap: then the next multiple up (or all) stays.
        step = config.round_to or 1
        counts = []
        for n, t, cap in zip(sizes, taken, caps):
            kept = kept_count(n, n - t, config.round_to) if t else n
            if n - kept > cap:
                kept = min(n, math.ceil((n - cap) / step) * step)
            counts.append(n - kept)
    return [torch.argsort(s, stable=True)[:c].tolist() for (_, _, s), c in zip(plan, counts)]


# ---------------------------------------------------------------------------------------------
# Cost


def count_macs_params(model: nn.Module, image_size: int | None = None) -> tuple[int, int]:
    """``(multiply-adds, parameters)`` of one forward at batch 1 and ``image_size`` (default ``model.image_size``).

    Multiply-adds are Torch-Pruning's count: convolutions and linear layers, plus one per element
    for batch norms and activations (well under 1% of the total for these detectors).
    """
    import torch_pruning as tp

    size = int(image_size or model.image_size)
    example = torch.zeros(1, 3, size, size, device=_device(model))
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)
