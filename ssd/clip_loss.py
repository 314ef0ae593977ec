"""The MultiBox loss over video clips: every frame of every clip counts.

A clip batch of ``B`` clips of ``T`` frames is scored as one batch of ``B*T``
images by :class:`ssd.loss.MultiBoxLoss`: hard negatives are mined per frame,
and the sum over all frames is divided by the number of positive priors in all
frames together. A frame with many objects therefore weighs more than an empty
one, exactly as an image does in an image batch; no frame is dropped (the old
LSTM-SSD attempt backpropagated one frame's loss in five).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ssd.loss import MultiBoxLoss


def clip_loss(
    criterion: MultiBoxLoss,
    class_logits: Tensor,
    box_deltas: Tensor,
    targets: Sequence[Sequence[dict[str, Tensor]]],
) -> dict[str, Tensor]:
    """Loss of a clip batch.

    Args:
        criterion: the MultiBox loss of the model's priors.
        class_logits: ``Tensor[B, T, P, C]``, e.g. from ``LSTMSSD.forward_clip``.
        box_deltas: ``Tensor[B, T, P, 4]``.
        targets: ``B`` lists of ``T`` per-frame targets, each as :class:`MultiBoxLoss` takes
            them (``{"boxes": Tensor[N, 4] xyxy normalised, "labels": int64 Tensor[N], ...}``).

    Returns:
        The criterion's dict (``loss``, ``box_loss``, ``class_loss``, ``num_positives``)
        for the ``B*T`` frames.
    """
    b, t = class_logits.shape[:2]
    if box_deltas.shape[:2] != (b, t):
        raise ValueError(f"logits are for {b}x{t} frames but box deltas for {tuple(box_deltas.shape[:2])}")
    if len(targets) != b or any(len(clip) != t for clip in targets):
        raise ValueError(f"expected targets for {b} clips of {t} frames, got {[len(clip) for clip in targets]}")
    frames = [frame for clip in targets for frame in clip]  # clip-major, as flatten(0, 1) orders the frames
    return criterion(class_logits.flatten(0, 1), box_deltas.flatten(0, 1), frames)
