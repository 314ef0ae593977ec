"""Starting and stopping worker processes safely: the loaders' (DataLoader) and the conversion's
(:func:`ssd.data.sources.decode.ordered_map`).

Workers are forked. A process whose OpenCV thread pool has run (any large resize or blur) leaves
its children a pool without threads, and a child that then calls ``cv2.setNumThreads`` (as
every worker's start does) waits for them for ever: it hung this project's CI twice, once in the
conversion's pool and once in the training loader's workers. :func:`opencv_one_thread` around
the fork stops the pool in the parent first, so the children inherit none.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import cv2
from torch.utils.data import DataLoader


@contextlib.contextmanager
def opencv_one_thread() -> Iterator[None]:
    """OpenCV at one thread inside (its thread pool stopped), its setting restored after."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def start_workers(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, its worker processes forked with OpenCV's pool stopped in this process."""
    with opencv_one_thread():
        return iter(loader)


def stop_workers(iterator: Iterator[Any]) -> None:
    """Stop the worker processes of a DataLoader iterator now (what its ``__del__`` would do)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
