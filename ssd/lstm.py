"""The Bottleneck ConvLSTM of LSTM-SSD (Liu & Zhu, arXiv 1711.06368, section 3.3).

A convolutional LSTM made cheap enough for mobile detectors: the input and the
previous output are first squeezed through a depthwise-separable "bottleneck"
convolution, and one depthwise-separable convolution on that bottleneck
produces all four gates at once. With ``phi = ReLU6`` (the paper's choice: it
keeps the activations in the range MobileNet's quantisation-friendly layers
expect, where ``tanh`` would be used in a textbook LSTM)::

    b_t = phi(W_b * [x_t, h_{t-1}])                 # depthwise 3x3 + pointwise 1x1, N channels
    i_t, f_t, g_t, o_t = W_gates * b_t              # depthwise 3x3 + pointwise 1x1, 4N channels
    c_t = sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * phi(g_t)
    h_t = sigmoid(o_t) * phi(c_t)

The state is explicit: the cell stores nothing between calls, it takes
``(h, c)`` and returns the new pair, so a whole clip can be unrolled with
gradients through every step, and the state can be reset per sample and
exported to ONNX as plain inputs and outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _separable(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # Depthwise k x k (no bias: the pointwise bias follows) then pointwise 1x1 with bias,
    # with no normalisation: batch norm inside a recurrence would see B samples per
    # step in training but running statistics in streaming, and the paper's cell has none.
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1),
    )


class BottleneckConvLSTMCell(nn.Module):
    """One step of the Bottleneck ConvLSTM.

    Args:
        in_channels: channels ``M`` of the input map ``x_t``.
        hidden_channels: channels ``N`` of the state ``h`` and ``c`` (the paper shrinks
            them with a width multiplier; fewer channels make the cell cheaper).
        out_channels: when given and different from ``hidden_channels``, a linear 1x1
            convolution (with bias, no activation, like MobileNetV2's projection layers)
            maps ``h_t`` to this many channels, so the layers after the cell keep the
            widths they had without it. ``None``: the output is ``h_t`` itself.
        kernel_size: side of the depthwise kernels (the paper's 3).
        residual: ``False`` (the paper): the output is ``h_t`` (or its projection) and
            replaces the input map. ``True``: the output is ``x_t + project(h_t)`` with the
            projection initialised to zero, so a cell inserted into a trained detector
            starts as the identity (the detector's accuracy is kept) and training only has
            to learn what memory adds; needs ``out_channels == in_channels``.

    The state is a pair ``(h, c)`` of ``Tensor[B, N, H, W]``; the output of
    :meth:`forward` is ``Tensor[B, out_channels or N, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        residual: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(f"channels must be positive, got in={in_channels}, hidden={hidden_channels}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels if out_channels is not None else hidden_channels
        self.residual = bool(residual)
        if self.residual and self.out_channels != in_channels:
            raise ValueError(f"a residual cell's output has the input's {in_channels} channels, got {self.out_channels}")
        self.bottleneck = _separable(in_channels + hidden_channels, hidden_channels, kernel_size)
        self.gates = _separable(hidden_channels, 4 * hidden_channels, kernel_size)
        needs_projection = self.residual or self.out_channels != hidden_channels
        self.project = nn.Conv2d(hidden_channels, self.out_channels, 1) if needs_projection else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default conv initialisation, zero biases, and forget-gate bias 1;
        a residual cell's projection starts at zero (the cell is the identity).

        A forget bias of 1 (Gers et al. 2000; Jozefowicz et al. 2015) starts the cell
        remembering about ``sigmoid(1) = 0.73`` of its state per step, so gradients reach
        early frames from the start of training.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        n = self.hidden_channels
        with torch.no_grad():
            self.gates[1].bias[n : 2 * n].fill_(1.0)  # gate order: i, f, g, o
            if self.residual:
                nn.init.zeros_(self.project.weight)

    def init_state(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero state ``(h, c)``, each ``Tensor[batch, N, height, width]``."""
        shape = (batch, self.hidden_channels, height, width)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One time step.

        Args:
            x: ``Tensor[B, M, H, W]``.
            state: ``(h, c)`` of the previous step, each ``Tensor[B, N, H, W]``; ``None``:
                zeros on ``x``'s device and dtype.

        Returns:
            ``(output, (h, c))``: ``output`` is ``Tensor[B, out_channels, H, W]`` (``h``
            itself when there is no projection; ``x + project(h)`` when residual), ``h`` and ``c`` are ``Tensor[B, N, H, W]``.
        """
        if state is None:
            state = self.init_state(x.shape[0], x.shape[2], x.shape[3], x.device, x.dtype)
        h, c = state
        b = F.relu6(self.bottleneck(torch.cat((x, h), dim=1)))
        i, f, g, o = self.gates(b).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * F.relu6(g)
        h = torch.sigmoid(o) * F.relu6(c)
        out = self.project(h) if self.project is not None else h
        if self.residual:
            out = x + out
        return out, (h, c)
