"""The training stream: micro-batches from a position on, across epochs, with the next epoch's
loader workers started before the current epoch ends.

Each epoch has a loader of its own (its order and augmentation are seeded by the epoch, so a
resumed run gets the same batches). Starting an epoch's workers costs a pause: forking them and
filling their shuffle buffers before the first batch. On an H200 that paused the real loop about
1.5 s at every epoch boundary (docs/gpu.md), so the next epoch's loader is started
:data:`LEAD` batches (at least; the number of workers when more) before the current one ends,
and its workers fill up while the last batches train. The batches are the same either way:
each loader draws its workers' seeds from a generator of its own, not from the training
process's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch

from pipeline.train_config import DataConfig
from pipeline.training.signals import signals_blocked

if TYPE_CHECKING:
    from pipeline.training.setup import Run

#: Batches before an epoch's end at which the next epoch's loader starts (or the number of workers).
LEAD = 2


def micro_batches(r: Run, first: int) -> Iterator[Any]:
    """Micro-batches from position ``first`` on, across epochs; deterministic in the position."""
    from ssd.data.loader import batches, stop_workers

    epoch, start = divmod(first, r.batches_per_epoch)
    lead = max(LEAD, r.cfg.data.num_workers)
    upcoming = None
    try:
        while True:
            current = upcoming if upcoming is not None else _started(r, epoch, start)
            upcoming = None
            for n, batch in enumerate(batches(current), start + 1):  # n: batches of the epoch so far
                if upcoming is None and n >= r.batches_per_epoch - lead:
                    upcoming = _started(r, epoch + 1, 0)
                yield batch
            epoch, start = epoch + 1, 0
    finally:  # the run ended (or failed) with the next epoch's workers started: stop them too
        if upcoming is not None:
            stop_workers(upcoming)


def _started(r: Run, epoch: int, start: int) -> Iterator[Any]:
    """An iterator over the loader of ``epoch`` from batch ``start``, its workers forked
    (:func:`ssd.data.loader.start_workers`).

    With SIGTERM/SIGINT blocked while they start, they inherit the block and a preemption signal
    can't kill one mid-epoch; the training process gets the pending signal as soon as the block
    is lifted."""
    from ssd.data.loader import start_workers

    loader = _loader(r, r.accelerator.process_index, r.accelerator.num_processes, epoch, start)
    with signals_blocked():
        return start_workers(loader)


def _loader(r: Run, rank: int, world: int, epoch: int, start: int):
    from ssd.data.loader import train_loader

    data: DataConfig = r.cfg.data
    return train_loader(
        r.shards,
        data.augment,
        image_size=r.unwrapped.image_size,
        rank=rank,
        world_size=world,
        seed=r.cfg.seed,
        epoch=epoch,
        batches_per_epoch=r.batches_per_epoch,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        start_batch=start,
        kind=data.kind,
        streams=data.streams,
        shuffle_buffer=data.shuffle_buffer,
        sequence_clips=data.sequence_clips,
        pin_memory=torch.cuda.is_available(),
        num_classes=len(r.classes),
    )
