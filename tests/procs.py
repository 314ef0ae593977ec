"""Helpers for tests that run stages as processes: free ports, signalling process trees, weights."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from ssd.model_file import load_model_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (launchers put their workers in sessions of their own)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a model file."""
    model, _ = load_model_file(path)
    return model.state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


#: Python lines that start OpenCV's thread pool and make it run in the process they are part of:
#: the parent whose forked workers a test checks (a child that calls cv2.setNumThreads after this
#: waits for ever unless the pool was stopped for the fork: ssd.data.workers).
RUN_OPENCV_POOL = """
import cv2, numpy as np
cv2.setNumThreads(2)
image = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(5):
    cv2.GaussianBlur(cv2.resize(image, (2500, 2500)), (15, 15), 0)
"""
