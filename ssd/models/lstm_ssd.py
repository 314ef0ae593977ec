"""LSTM-SSD: SSD with Bottleneck ConvLSTMs in the feature path (Liu & Zhu, arXiv 1711.06368).

The detector is the very SSD of :mod:`ssd.models.ssd` (same backbone, extras,
head, priors and normalisation; :class:`LSTMSSD` subclasses it, so state-dict
keys are the same and a trained SSDLite initialises it with
:func:`load_matching_weights`), with :class:`ssd.lstm.BottleneckConvLSTMCell`
modules placed on some of the feature maps. A cell's output *replaces* its
map: the head reads it, and so do the layers that compute the following maps
(as in the paper, where the stride-32 layers consume the LSTM's output).

Placement (``placement`` of the builder, any non-empty combination):

* ``"backbone"``: one cell on the backbone's stride-16 map (block 13 of
  MobileNetV2), between the two backbone stages: the paper's layout;
* ``"extras"``: one cell after each extra layer (the original PyTorch
  project's layout): every map from stride 64 down to 1x1 is temporal;
* ``"stride8"``: one cell on the stride-8 map (block 6, which must be a tap), for
  small inputs where that map detects many of the objects: every map after it is
  computed from the cell's output, so all of them see the memory.

The state is explicit: ``init_state`` gives the zero state, a flat tuple
``(h_0, c_0, h_1, c_1, ...)`` with one pair per cell in map order (plain
tensors, so an exported graph has them as ordinary inputs and outputs);
``forward`` takes one frame and the state and returns the new state;
``forward_clip`` unrolls a whole clip with gradients through every frame.
Nothing is stored on the module between calls.

Cost (convolution multiply-adds, width 1, 300 px): SSDLite 550 M; the
``"backbone"`` cell (96 channels on the 19x19 map) adds 21 M (+4%) with
``state_reduction=1``, 3 M with 4; ``("backbone", "extras")`` with 4 adds 9 M.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ssd.lstm import BottleneckConvLSTMCell
from ssd.models.input_norm import IMAGENET, InputNorm
from ssd.models.ssd import SSD, feature_shapes
from ssd.models.mobilenet_v3 import ssdlite_mobilenet_v3_large
from ssd.models.ssdlite import STRIDE8_BLOCK, STRIDE16_BLOCK, TAPS, ssdlite_mobilenet_v2
from ssd.priors import PriorConfig

#: Where temporal cells can go (see the module docstring).
PLACEMENTS = ("backbone", "extras", "stride8")

#: The arch keys LSTM-SSD adds to its SSDLite's (without them, the arch builds that SSDLite).
TEMPORAL_ARCH_KEYS = ("placement", "state_reduction", "residual")

State = tuple[Tensor, ...]


class LSTMSSD(SSD):
    """SSD with temporal cells on some feature maps; streaming and clip forwards.

    Args:
        backbone: a module whose ``features`` (an ``nn.Sequential``) produces the
            backbone maps after the blocks listed in ``taps`` (e.g.
            :class:`ssd.models.ssdlite.MobileNetV2Backbone`); the forward runs those
            blocks itself, so a cell can sit between two backbone stages.
        extras, head, priors, image_size, input_norm, arch: as for :class:`SSD`.
        taps: indices of the ``backbone.features`` blocks whose outputs are maps.
        temporal: cell per map index ``k`` (0 = the first backbone map, in the
            order the head reads the maps); its output replaces map ``k``.
        map_sizes: ``(height, width)`` of every map at ``image_size`` (the state's
            spatial sizes).
    """

    #: Consumers (training, evaluation, export) branch on this: forward takes and returns a state.
    is_temporal = True

    def __init__(
        self,
        backbone: nn.Module,
        extras: nn.ModuleList,
        head: nn.Module,
        priors: Tensor,
        image_size: int,
        taps: Sequence[int],
        temporal: Mapping[int, BottleneckConvLSTMCell],
        map_sizes: Sequence[tuple[int, int]],
        input_norm: InputNorm = IMAGENET,
        arch: dict[str, Any] | None = None,
    ):
        super().__init__(backbone, extras, head, priors, image_size, input_norm, arch)
        num_maps = len(taps) + len(extras)
        if len(map_sizes) != num_maps:
            raise ValueError(f"{len(map_sizes)} map sizes for {num_maps} maps")
        bad = [k for k in temporal if not 0 <= k < num_maps]
        if bad:
            raise ValueError(f"temporal cells on maps {bad}, but the model has maps 0..{num_maps - 1}")
        self.taps = tuple(int(t) for t in taps)
        self.map_sizes = [tuple(int(s) for s in hw) for hw in map_sizes]
        # ModuleDict keys must be strings: the map index. Sorted, so the state's order is the maps'.
        self.temporal = nn.ModuleDict({str(k): temporal[k] for k in sorted(temporal)})

    @property
    def cell_maps(self) -> list[int]:
        """Indices of the maps that carry a temporal cell, in state order."""
        return [int(k) for k in self.temporal]

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Zero state: ``(h, c)`` per cell, flattened; each ``Tensor[batch_size, N_k, H_k, W_k]``.

        ``device`` and ``dtype`` default to the model's parameters'.
        """
        param = next(self.parameters())
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        state: list[Tensor] = []
        for k, cell in self.temporal.items():
            h, w = self.map_sizes[int(k)]
            state.extend(cell.init_state(batch_size, h, w, device, dtype))
        return tuple(state)

    def forward(
        self, images: Tensor, state: State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, Tensor, State]:
        """One streaming frame (or, given ``Tensor[B, T, 3, S, S]``, a whole clip: :meth:`forward_clip`,
        which is how DDP-wrapped training calls it, since DDP only syncs gradients through ``forward``).

        Args:
            images: ``Tensor[B, 3, S, S]`` RGB in ``[0, 1]``.
            state: the previous call's state; ``None``: zero state (a fresh video).
            reset: optional ``bool Tensor[B]``: samples whose state is zeroed before this
                frame (the first frame of a new video).

        Returns:
            ``(class_logits [B, P, C], box_deltas [B, P, 4], new_state)``.
        """
        if images.dim() == 5:
            return self.forward_clip(images, state, reset)
        logits, deltas, state = self.forward_clip(images.unsqueeze(1), state, reset)
        return logits.squeeze(1), deltas.squeeze(1), state

    def forward_clip(
        self, clips: Tensor, state: State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, Tensor, State]:
        """Unroll a clip: every frame's predictions, gradients through all of them.

        The per-frame layers run once over all ``B*T`` frames and only the cells step
        through time, which is much faster than ``T`` streaming calls. In eval mode the
        result equals streaming the frames one by one. In train mode batch norm
        normalises with the statistics of all ``B*T`` frames (streaming would use the
        ``B`` frames of each step): a clip batch trains like an image batch of ``B*T``.

        Args:
            clips: ``Tensor[B, T, 3, S, S]`` RGB in ``[0, 1]``, consecutive frames.
            state: state before the first frame; ``None``: zero state.
            reset: optional ``bool Tensor[B]``: samples whose state is zeroed before the
                first frame.

        Returns:
            ``(class_logits [B, T, P, C], box_deltas [B, T, P, 4], state after the last frame)``.
        """
        b, t = clips.shape[:2]
        if state is None:
            state = self.init_state(b, clips.device, clips.dtype)
        elif len(state) != 2 * len(self.temporal):
            raise ValueError(f"state has {len(state)} tensors; this model's has {2 * len(self.temporal)}")
        if reset is not None:
            keep = ~reset.to(device=clips.device, dtype=torch.bool).view(-1, 1, 1, 1)
            state = tuple(torch.where(keep, s, torch.zeros_like(s)) for s in state)
        pairs = {k: (state[2 * j], state[2 * j + 1]) for j, k in enumerate(self.cell_maps)}

        x = self.normalize(clips.flatten(0, 1))  # [B*T, 3, S, S]: sample b's frames are rows b*T .. b*T+T-1
        maps: list[Tensor] = []
        for layer, emits in self._feature_path():
            x = layer(x)
            if emits:
                k = len(maps)
                if k in pairs:
                    x, pairs[k] = self._unroll(self.temporal[str(k)], x, pairs[k], b, t)
                maps.append(x)
        logits, deltas = self.head(maps)  # [B*T, P, C], [B*T, P, 4]
        new_state = tuple(s for k in self.cell_maps for s in pairs[k])
        return logits.unflatten(0, (b, t)), deltas.unflatten(0, (b, t)), new_state

    def _feature_path(self) -> Iterator[tuple[nn.Module, bool]]:
        # The per-frame layers in order, each with whether its output is a map the head reads.
        for i, block in enumerate(self.backbone.features):
            if i > self.taps[-1]:
                break
            yield block, i in self.taps
        for layer in self.extras:
            yield layer, True

    @staticmethod
    def _unroll(
        cell: BottleneckConvLSTMCell, x: Tensor, state: tuple[Tensor, Tensor], b: int, t: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: [B*T, M, H, W] -> outputs [B*T, M', H, W], stepping the cell through T.
        frames = x.unflatten(0, (b, t))  # [B, T, M, H, W]
        outputs = []
        for step in range(t):
            out, state = cell(frames[:, step], state)
            outputs.append(out)
        return torch.stack(outputs, dim=1).flatten(0, 1), state

    def features(self, images: Tensor) -> list[Tensor]:
        # SSD.features would run the backbone without the cells: refuse rather than mislead.
        raise NotImplementedError("LSTM-SSD's maps depend on the state: use forward or forward_clip")

    def extra_features(self, last: Tensor) -> list[Tensor]:
        raise NotImplementedError("LSTM-SSD's maps depend on the state: use forward or forward_clip")


def lstm_ssd_mobilenet_v2(
    num_classes: int,
    width_mult: float = 1.0,
    image_size: int = 300,
    extra_channels: Sequence[int] | None = None,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    placement: Sequence[str] = ("backbone",),
    state_reduction: int = 1,
    backbone_state_dict: Mapping[str, Tensor] | None = None,
    taps: Sequence[int] = TAPS,
    residual: bool = False,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> LSTMSSD:
    """LSTM-SSD on SSDLite-MobileNetV2: the SSDLite of the same arguments plus temporal cells.

    Args:
        num_classes, width_mult, image_size, extra_channels, priors, backbone_state_dict, taps,
        input_norm:
            as for :func:`ssd.models.ssdlite.ssdlite_mobilenet_v2`; the detector parts,
            priors included, are exactly that model's.
        placement: where the cells go, a non-empty subset of ``("backbone", "extras", "stride8")``
            (module docstring).
        state_reduction: each cell's state has ``max(8, channels // state_reduction)``
            channels (the paper's LSTM width multiplier is ``1 / state_reduction``). When
            that differs from the map's channels, a 1x1 projection brings the cell's output
            back to them, so every layer after it keeps its SSDLite shape.
        residual: cells add their (zero-initialised) output to the map instead of
            replacing it (:class:`ssd.lstm.BottleneckConvLSTMCell`): LSTM-SSD started from a
            trained SSDLite then predicts exactly what that SSDLite predicts, and training
            learns what memory adds. ``False``: the paper's layout.
    """
    base = ssdlite_mobilenet_v2(
        num_classes, width_mult, image_size, extra_channels, priors, backbone_state_dict=backbone_state_dict,
        taps=taps, input_norm=input_norm,
    )
    blocks = {"stride8": (STRIDE8_BLOCK, 8), "backbone": (STRIDE16_BLOCK, 16)}
    return add_temporal_cells(base, "lstm_ssd_mobilenet_v2", blocks, placement, state_reduction, residual)


def lstm_ssd_mobilenet_v3_large(
    num_classes: int,
    image_size: int = 320,
    width_mult: float = 1.0,
    reduced_tail: bool = True,
    extra_channels: Sequence[int] | None = None,
    priors: PriorConfig | Mapping[str, Any] | None = None,
    placement: Sequence[str] = ("backbone",),
    state_reduction: int = 1,
    backbone_state_dict: Mapping[str, Tensor] | None = None,
    residual: bool = False,
    input_norm: InputNorm | Mapping[str, Any] | None = None,
) -> LSTMSSD:
    """LSTM-SSD on SSDLite-MobileNetV3-Large (:func:`ssd.models.mobilenet_v3.ssdlite_mobilenet_v3_large`,
    e.g. converted from torchvision's COCO model): ``"backbone"`` puts the cell on the stride-16
    map (C4's expansion layer, 672 channels), ``"extras"`` after each extra layer; there is no
    stride-8 map. Other arguments as for :func:`lstm_ssd_mobilenet_v2`.
    """
    base = ssdlite_mobilenet_v3_large(num_classes, image_size, width_mult, reduced_tail, extra_channels, priors,
                                      backbone_state_dict, input_norm)
    blocks = {"backbone": (0, 16)}
    return add_temporal_cells(base, "lstm_ssd_mobilenet_v3_large", blocks, placement, state_reduction, residual)


def add_temporal_cells(
    base: SSD,
    name: str,
    blocks: Mapping[str, tuple[int, int]],
    placement: Sequence[str],
    state_reduction: int,
    residual: bool,
) -> LSTMSSD:
    """``base`` (an SSD whose backbone has ``features`` and ``taps``) with cells where ``placement`` says.

    Args:
        name: the builder's name, for the arch.
        blocks: backbone placements -> ``(block index in backbone.features, stride)``, e.g.
            ``{"backbone": (13, 16)}``; the block must be a tap.
        placement, state_reduction, residual: as for :func:`lstm_ssd_mobilenet_v2`.
    """
    placement = list(placement)
    unknown = [p for p in placement if p not in PLACEMENTS]
    if not placement or unknown or len(set(placement)) != len(placement):
        raise ValueError(f"placement must be a non-empty subset of {list(PLACEMENTS)}, got {placement}")
    if int(state_reduction) != state_reduction or state_reduction < 1:
        raise ValueError(f"state_reduction must be a positive integer, got {state_reduction}")
    state_reduction = int(state_reduction)
    taps = base.backbone.taps
    shapes = feature_shapes(base.backbone, base.extras, base.image_size)
    cell_maps: list[int] = []
    for where in ("stride8", "backbone"):
        if where not in placement:
            continue
        if where not in blocks:
            raise ValueError(f"placement {where!r} is not available on this backbone (available: "
                             f"{', '.join([*blocks, 'extras'])})")
        block, stride = blocks[where]
        if block not in taps:
            raise ValueError(f"placement {where!r} needs block {block} (stride {stride}) among the taps {list(taps)}")
        cell_maps.append(taps.index(block))
    if "extras" in placement:
        cell_maps.extend(range(len(taps), len(shapes)))
    temporal = {}
    for k in cell_maps:
        channels = shapes[k][0]
        temporal[k] = BottleneckConvLSTMCell(
            channels, max(8, channels // state_reduction), out_channels=channels, residual=residual
        )
    arch = {**base.arch, "name": name, "placement": placement, "state_reduction": state_reduction}
    if residual:  # absent from older files, which are not residual
        arch["residual"] = True
    return LSTMSSD(
        base.backbone,
        base.extras,
        base.head,
        base.priors,
        base.image_size,
        taps=taps,
        temporal=temporal,
        map_sizes=[(h, w) for _, h, w in shapes],
        input_norm=base.input_norm,
        arch=arch,
    )


def load_matching_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy every same-named, same-shaped tensor of ``state_dict`` into ``model``.

    Meant to start LSTM-SSD from a trained SSDLite (the paper trains the detector
    first, then adds the LSTM): backbone, extras and head load, the cells keep their
    initialisation. The model's ``priors`` are never overwritten: they belong to its
    own configuration.

    Returns:
        ``(loaded_keys, skipped_keys)``, both in ``state_dict``'s order; skipped keys are
        those the model lacks, whose shape differs, or ``priors``.
    """
    own = model.state_dict()
    loaded, skipped = [], []
    for key, value in state_dict.items():
        if key != "priors" and key in own and own[key].shape == value.shape:
            loaded.append(key)
        else:
            skipped.append(key)
    model.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    return loaded, skipped


def set_backbone_trainable(model: SSD, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze the backbone's parameters, for stage-wise training.

    Only ``requires_grad`` changes: in train mode batch norm still updates the frozen
    backbone's running statistics unless the caller puts ``model.backbone`` in eval
    mode after ``model.train()``.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
