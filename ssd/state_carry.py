"""Carry a temporal model's state from one training clip to the next clip of the same video.

Truncated backpropagation through time: a clip starts from the detached state the
previous clip of its video ended with, so the cell learns to use memory built up over
many clips (as in video evaluation, where the state runs through the whole video),
while gradients still stop at the clip boundary.

Clips are matched to states by key, not by batch position: the state left after a clip
waits under the key of the clip that would continue it, and the clip that starts with
that key takes it. :func:`clip_keys` makes the keys from a batch's ``(run, video, frame
number)``: a state passes only to the next frames of the same video *in the same run*
(the loader's sequence mode augments a run alike, and two runs of one video may be in
flight at once). This works whatever order the batches come in (several loader streams
interleave their batches); a clip with no waiting state (the first of a run, after a
gap in the frame numbers) starts from zeros, like the first frame of a
video at evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

State = tuple[Tensor, ...]


def clip_keys(
    video: Sequence[str], frames: Sequence[Sequence[int]], runs: Sequence[int] | None = None
) -> tuple[list[Hashable], list[Hashable]]:
    """Per clip, ``(start key, continuation key)``: where its state comes from and goes to.

    ``video``, ``frames``, ``runs``: a clip :class:`ssd.data.loader.Batch`'s (``runs`` is
    None outside the loader's sequence mode).
    """
    runs = [None] * len(video) if runs is None else runs  # type: ignore[list-item]
    starts = [(r, v, int(f[0])) for r, v, f in zip(runs, video, frames)]
    nexts = [(r, v, int(f[-1]) + 1) for r, v, f in zip(runs, video, frames)]
    return starts, nexts  # type: ignore[return-value]


def carry_keep(streams: int, sequence_clips: int) -> int:
    """The ``keep`` of a :class:`StateCarry` for the loader's sequence mode: how many micro-batches
    a state may wait for the clip that continues it.

    A run spans at most ``sequence_clips`` batches of one loader stream, and a stream's batches
    are ``streams`` micro-batches apart. A clip's continuation is the next clip of its run, or,
    with overlapping clips (``clip_stride`` below ``clip_length``), a later one of the run, so
    ``streams * sequence_clips`` covers every continuation a run holds (twice ``streams`` at least).
    """
    return streams * max(2, sequence_clips)


class StateCarry:
    """Detached per-clip states waiting for the clip that continues them.

    Args:
        keep: states not taken within this many :meth:`put` calls are dropped (a run
            that ended, or a clip the loader will not follow up), so memory stays bounded.
            Must be at least the micro-batches between two consecutive batches of one
            loader stream (``streams``: the loader deals its batches to the streams in turn,
            whatever the gradient accumulation).
    """

    def __init__(self, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._waiting: dict[Hashable, tuple[int, State]] = {}
        self._puts = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def take(self, zero: State, keys: Sequence[Hashable]) -> tuple[State, int]:
        """The state each clip of a batch starts from.

        Args:
            zero: the model's zero state for this batch (``init_state(B)``): ``Tensor[B, ...]`` each.
            keys: per clip, its start key (:func:`clip_keys`).

        Returns:
            ``(state, carried)``: ``zero`` with the waiting states copied into their rows (new
            tensors; ``zero`` is not changed), and how many clips got one.
        """
        rows: dict[int, State] = {}
        for i, key in enumerate(keys):
            entry = self._waiting.pop(key, None)
            if entry is not None:
                rows[i] = entry[1]
        if not rows:
            return zero, 0
        order = sorted(rows)
        index = torch.tensor(order, device=zero[0].device)
        state = []
        for j, z in enumerate(zero):
            carried = torch.stack([rows[i][j] for i in order]).to(device=z.device, dtype=z.dtype)
            state.append(z.index_copy(0, index, carried))
        return tuple(state), len(rows)

    def put(self, state: State, keys: Sequence[Hashable]) -> None:
        """Keep each clip's final state (detached) under its continuation key (:func:`clip_keys`)."""
        self._puts += 1
        for i, key in enumerate(keys):
            self._waiting[key] = (self._puts, tuple(s[i].detach() for s in state))
        old = [k for k, (n, _) in self._waiting.items() if n <= self._puts - self.keep]
        for k in old:
            del self._waiting[k]

    def state_dict(self) -> dict[str, Tensor]:
        """The waiting states as tensors only (a checkpoint's safetensors file): each named by the
        JSON of ``[key, put, part]``, plus ``"puts"``. Keys must be JSON-able (:func:`clip_keys`')."""
        out = {"puts": torch.tensor(self._puts)}
        for key, (put, state) in self._waiting.items():
            for j, part in enumerate(state):
                out[json.dumps([list(key), put, j])] = part
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved: a resumed run carries the same states on."""
        parts: dict[tuple, dict[int, Tensor]] = {}
        puts: dict[tuple, int] = {}
        for name, tensor in state.items():
            if name == "puts":
                continue
            key, put, j = json.loads(name)
            key = tuple(key)
            parts.setdefault(key, {})[j] = tensor
            puts[key] = put
        self._puts = int(state["puts"])
        self._waiting = {k: (puts[k], tuple(p[j] for j in sorted(p))) for k, p in parts.items()}
