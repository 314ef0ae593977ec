"""Training and evaluation loaders over WebDataset shards (format: ``docs/data-format.md``).

Three kinds of sample:

- ``"frames"``: frame shards, one image per sample -> ``Batch.images`` ``Tensor[B, 3, S, S]``;
- ``"clips"``: clip shards, T frames per sample -> ``Batch.images`` ``Tensor[B, T, 3, S, S]``;
- ``"frames_from_clips"``: clip shards, every frame of every clip a frame sample, so a
  per-frame baseline trains on exactly the frames the LSTM sees.

The parts, one module each:

- :mod:`ssd.data.samples`: reading a shard's samples and decoding them (:class:`Sample`,
  :class:`Batch`, :func:`collate`, :func:`decode_sample`, :func:`read_raw_samples`);
- :mod:`ssd.data.train_streams`: :func:`train_loader`, every rank the same number of batches
  per epoch, deterministic streams, exact resume at any batch;
- :mod:`ssd.data.eval_index`: :func:`eval_loader`, every sample exactly once, split across
  ranks (whole videos for clips);

and here :func:`batches`, which starts a loader's workers (:mod:`ssd.data.workers`), iterates it
and stops them however the loop ends.
This module is the one the rest of the project imports them from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from ssd.data.eval_index import eval_loader
from ssd.data.samples import (
    Batch,
    Kind,
    RawSample,
    Sample,
    collate,
    decode_sample,
    decode_sequence,
    read_raw_samples,
)
from ssd.data.train_streams import train_loader
from ssd.data.workers import start_workers, stop_workers

__all__ = [
    "Batch",
    "Kind",
    "RawSample",
    "Sample",
    "batches",
    "collate",
    "decode_sample",
    "decode_sequence",
    "eval_loader",
    "read_raw_samples",
    "start_workers",
    "stop_workers",
    "train_loader",
]


def batches(loader: DataLoader | Iterator[Any]) -> Iterator[Any]:
    """The batches of ``loader`` (or of an iterator over one), its worker processes stopped
    however the iteration ends.

    A DataLoader iterator stops its workers when it is garbage-collected. An exception from a
    batch (a bad sample raised in a worker) keeps the iterator alive in its traceback, and
    the workers with it; Python's exit then waits for them, forever when they ignore SIGTERM
    (training starts them so). Iterating through this stops them at once instead.
    """
    iterator = start_workers(loader) if isinstance(loader, DataLoader) else iter(loader)
    try:
        yield from iterator
    finally:
        stop_workers(iterator)
