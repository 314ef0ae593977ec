"""Pruning the Bottleneck ConvLSTM cells of a temporal model (LSTM-SSD), by hand.

:func:`ssd.pruning.prune_model` prunes the graph with Torch-Pruning, which can't trace a cell's
recurrence. While the graph is built and pruned a :class:`CellProbe` stands in for each cell;
the cell's own units are chosen here (:func:`plan_cell`) and cut with the library's low-level
functions once the graph has decided the cell's inputs and outputs (:func:`prune_cell`).

A cell (:class:`ssd.lstm.BottleneckConvLSTMCell`) has three sets of channels of its own besides
its input x (M channels) and output (O):

- hidden units u (N): h and c channel u, the unit's four gate filters (rows u, N+u, 2N+u, 3N+u
  of gates[1]), its recurrent input (channel M+u of bottleneck[0] and column M+u of
  bottleneck[1]) and its column of the projection; without a projection h *is* the output, and
  the hidden units are the output channels the graph chose;
- bottleneck units v (N_b): row v of bottleneck[1], channel v of gates[0], column v of gates[1];
- inputs and outputs, which belong to the groups of the layers around the cell.

The cell's units are scored by the L1 norm of their filters, with the graph's ratio and
rounding (in global mode too: the cell's units are not ranked against the graph's channels).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ssd.lstm import BottleneckConvLSTMCell


def kept_count(n: int, keep: float, round_to: int | None) -> int:
    """Channels kept of ``n`` when ``keep`` of them should stay: rounded to ``round_to``, at least one."""
    step = round_to or 1
    k = math.floor(keep / step + 0.5) * step
    return int(min(n, max(k, step, 1)))


class CellProbe(nn.Module):
    """Stands in for a cell while the graph is traced and pruned: ``x -> (conv1x1(x), state)``.

    Zero weights: the probe adds nothing to the importance of the channels around it.
    """

    def __init__(self, cell: BottleneckConvLSTMCell):
        super().__init__()
        self.conv = nn.Conv2d(cell.in_channels, cell.out_channels, 1, bias=False)
        nn.init.zeros_(self.conv.weight)
        self.conv.to(cell.gates[1].weight.device)
        self.init_state = cell.init_state  # the model asks its cells for the zero state

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.conv(x), state


def temporal_cells(model: nn.Module) -> dict[str, BottleneckConvLSTMCell]:
    """A temporal model's cells by their key in ``model.temporal`` (none for other models)."""
    if not getattr(model, "is_temporal", False):
        return {}
    temporal = getattr(model, "temporal", None)
    if not isinstance(temporal, nn.ModuleDict) or not all(isinstance(c, BottleneckConvLSTMCell) for c in temporal.values()):
        raise ValueError("a temporal model can be pruned only with its Bottleneck ConvLSTM cells in model.temporal")
    return dict(temporal.items())


def _lowest(scores: Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


def plan_cell(
    cell: BottleneckConvLSTMCell, name: str, ratio: float, round_to: int | None, frozen: bool
) -> dict[str, list[int] | None]:
    """The hidden and bottleneck units to remove (``None``: hidden units follow the outputs): ``ratio``
    of each, the kept counts rounded to ``round_to`` as the graph's channels are."""
    n, nb = cell.hidden_channels, cell.bottleneck[1].out_channels
    if frozen or ratio == 0:
        return {"hidden": [] if cell.project is not None else None, "bottleneck": []}
    for units, what in ((n, "hidden"), (nb, "bottleneck")):
        if units * (1.0 - ratio) < 1:
            raise ValueError(
                f"ratio {ratio} would leave no {what} unit of the {units} of {name}; "
                "lower the ratio or add the cell to ignore"
            )
    with torch.no_grad():
        # Li et al.'s L1 norm of a unit's filters: its four gate filters, its bottleneck filter.
        gate_l1 = cell.gates[1].weight.abs().flatten(1).sum(1).view(4, n).sum(0)
        bottleneck_l1 = cell.bottleneck[1].weight.abs().flatten(1).sum(1)
    hidden = None
    if cell.project is not None:
        hidden = _lowest(gate_l1.cpu(), n - kept_count(n, n * (1.0 - ratio), round_to))
    bottleneck = _lowest(bottleneck_l1.cpu(), nb - kept_count(nb, nb * (1.0 - ratio), round_to))
    return {"hidden": hidden, "bottleneck": bottleneck}


def prune_cell(
    cell: BottleneckConvLSTMCell,
    name: str,
    plan: Mapping[str, list[int] | None],
    inputs: Sequence[int],
    outputs: Sequence[int],
) -> dict[str, tuple[int, int]]:
    """Cut ``cell``'s removed input channels, output channels, hidden and bottleneck units."""
    import torch_pruning as tp

    m, n, nb = cell.in_channels, cell.hidden_channels, cell.bottleneck[1].out_channels
    hidden = list(outputs) if plan["hidden"] is None else list(plan["hidden"])
    bottleneck = list(plan["bottleneck"] or [])
    concat = [*inputs, *(m + u for u in hidden)]  # the bottleneck reads cat(x, h)
    dw_b, pw_b = cell.bottleneck[0], cell.bottleneck[1]
    dw_g, pw_g = cell.gates[0], cell.gates[1]
    if concat:
        tp.prune_depthwise_conv_out_channels(dw_b, concat)
        tp.prune_conv_in_channels(pw_b, concat)
    if bottleneck:
        tp.prune_conv_out_channels(pw_b, bottleneck)
        tp.prune_depthwise_conv_out_channels(dw_g, bottleneck)
        tp.prune_conv_in_channels(pw_g, bottleneck)
    if hidden:
        tp.prune_conv_out_channels(pw_g, [g * n + u for g in range(4) for u in hidden])  # gates i, f, g, o
    if cell.project is not None:
        if hidden:
            tp.prune_conv_in_channels(cell.project, hidden)
        if outputs:
            tp.prune_conv_out_channels(cell.project, list(outputs))
    cell.in_channels = m - len(inputs)
    cell.hidden_channels = n - len(hidden)
    cell.out_channels = cell.project.out_channels if cell.project is not None else cell.hidden_channels
    report = {f"{name}.bottleneck": (nb, nb - len(bottleneck))}
    if plan["hidden"] is not None:  # otherwise counted with the output group
        report[f"{name}.hidden"] = (n, cell.hidden_channels)
    return report
