"""Tiny frame and clip shard datasets, in the project's shard format (docs/data-format.md),
for tests of the stages that read shards (train, evaluate, ...)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np

CLASSES = ["red", "blue"]
COLOURS = {0: (40, 40, 230), 1: (230, 60, 40)}  # BGR


def _draw(rng: np.random.Generator, size: int, n_objects: int) -> tuple[np.ndarray, list, list]:
    img = np.full((size, size, 3), 110, np.uint8)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    boxes, labels = [], []
    for _ in range(n_objects):
        w, h = rng.integers(size // 5, size // 2, 2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        c = int(rng.integers(0, 2))
        img[y : y + h, x : x + w] = COLOURS[c]
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
        labels.append(c)
    return img, boxes, labels


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_frame_dataset(root: Path, counts: dict[str, list[int]], size: int = 64, seed: int = 0) -> Path:
    """``counts``: per split, samples per shard. Writes shards and manifest.json; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {"kind": "frames", "classes": CLASSES, "splits": {}, "skipped": []}
    for split, per_shard in counts.items():
        names, n = [], 0
        for s, count in enumerate(per_shard):
            name = f"{split}-{s:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for _ in range(count):
                    img, boxes, labels = _draw(rng, size, int(rng.integers(1, 3)))
                    key = f"{split}_{n:05d}"
                    ann = {"id": key, "width": size, "height": size, "boxes": boxes, "labels": labels,
                           "difficult": [False] * len(boxes)}
                    _add(tar, f"{key}.jpg", cv2.imencode(".jpg", img)[1].tobytes())
                    _add(tar, f"{key}.json", json.dumps(ann).encode())
                    n += 1
            names.append(name)
        manifest["splits"][split] = {"samples": n, "frames": n, "shards": names}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_clip_dataset(
    root: Path, videos: dict[str, list[int]], clip_length: int = 4, size: int = 48, seed: int = 0
) -> Path:
    """``videos``: per split, frame counts of its videos (one shard per video). Objects drift slowly."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {"kind": "clips", "classes": CLASSES, "splits": {}, "skipped": []}
    for split, lengths in videos.items():
        names, clips, frames = [], 0, 0
        for v, length in enumerate(lengths):
            video = f"{split}vid{v}"
            w = h = size // 3
            x, y = float(rng.integers(0, size - w)), float(rng.integers(0, size - h))
            vx, vy = rng.uniform(-1, 1, 2)
            c = int(rng.integers(0, 2))
            name = f"{split}-{v:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for start in range(0, length - clip_length + 1, clip_length):
                    key = f"{video}_{start + 1:06d}"
                    ann = {"video": video, "frames": [], "width": size, "height": size, "boxes": [], "labels": [], "difficult": []}
                    for t in range(clip_length):
                        fx = min(max(x + vx * (start + t), 0), size - w)
                        fy = min(max(y + vy * (start + t), 0), size - h)
                        img = np.full((size, size, 3), 90, np.uint8)
                        img[int(fy) : int(fy) + h, int(fx) : int(fx) + w] = COLOURS[c]
                        _add(tar, f"{key}.{t:03d}.jpg", cv2.imencode(".jpg", img)[1].tobytes())
                        ann["frames"].append(start + t + 1)
                        ann["boxes"].append([[float(int(fx)), float(int(fy)), float(int(fx) + w), float(int(fy) + h)]])
                        ann["labels"].append([c])
                        ann["difficult"].append([False])
                    _add(tar, f"{key}.json", json.dumps(ann).encode())
                    clips += 1
                    frames += clip_length
            names.append(name)
        manifest["splits"][split] = {"samples": clips, "frames": frames, "shards": names}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
