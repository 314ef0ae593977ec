"""Training-loader throughput: shards through :func:`ssd.data.loader.train_loader`, against two references.

Usage: python -m pipeline.bench.loader SHARD_DIR [--voc-dir DIR] [--image-size 300]
           [--batch-size 32] [--num-workers 4] [--num-batches 50]

- ``shards``: the training loader (workers, shuffle buffer, per-sample seeding, collate).
- ``bare``: the same sample bytes, already in memory, decoded and augmented in a plain loop
  in this process (no loader, no I/O): the per-core limit of the decode and
  augmentation work. ``shard_over_bare`` above 1 is what the workers add in parallel;
  ``per_worker_efficiency`` divides it by the number of workers.
- ``voc`` (with ``--voc-dir``): the same images (by the shard JSON ``id``; an id without its
  files there is an error) read as individual JPEG and XML files through a DataLoader with
  the same workers and batch size: what the shards save over loose files.

Throughput is images per second after the first batch (the start-up is reported apart);
a clip counts as its T images. All figures use the training augmentation. Torch and OpenCV
run on one thread in this process during the run, as they do in each loader worker: with
``--num-workers 0`` the loader then works like the bare loop plus its own overhead, instead
of fighting the other threads for the cores (on a busy 2-core machine, default threading made
the in-process loader 7x slower).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssd.data.loader import Sample, batches, collate, decode_sample, read_raw_samples, train_loader
from ssd.errors import InputError
from ssd.data.transforms import AugmentConfig, DetectionTransform, train_transform


def run(
    shard_dir: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    num_batches: int,
    voc_dir: str | None = None,
) -> dict[str, Any]:
    """Measure the loader on the ``*.tar`` shards in ``shard_dir``; returns the figures as a dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each loader worker gets
    cv2.setNumThreads(1)
    try:
        return _run(shard_dir, image_size, batch_size, num_workers, num_batches, voc_dir)
    finally:
        torch.set_num_threads(threads)


def _run(
    shard_dir: str, image_size: int, batch_size: int, num_workers: int, num_batches: int, voc_dir: str | None
) -> dict[str, Any]:
    shards = sorted(str(p) for p in Path(shard_dir).glob("*.tar"))
    if not shards:
        raise ValueError(f"{shard_dir}: no .tar shards")
    kind = _kind(shard_dir, shards)
    cfg = AugmentConfig()
    result: dict[str, Any] = {
        "kind": kind,
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "num_batches": num_batches,
    }

    loader = train_loader(
        shards, cfg, image_size=image_size, rank=0, world_size=1, seed=0, epoch=0,
        batches_per_epoch=num_batches + 1, batch_size=batch_size, num_workers=num_workers, kind=kind,
    )  # fmt: skip
    startup, rate = _time_loader(loader, num_batches)
    result.update(shards_startup_s=round(startup, 3), shards_images_per_s=round(rate, 1))

    # The bytes of as many samples as the loader delivered after its first batch, in memory.
    wanted = num_batches * batch_size
    raws = []
    while len(raws) < wanted:
        before = len(raws)
        for raw in read_raw_samples(shards, kind):
            raws.append(raw)
            if len(raws) == wanted:
                break
        if len(raws) == before:
            raise ValueError(f"{shard_dir}: the shards hold no samples")
    transform = train_transform(image_size, cfg)
    bare = _time_bare(raws, kind, transform)
    result.update(bare_images_per_s=round(bare, 1), shard_over_bare=round(rate / bare, 3))
    result["per_worker_efficiency"] = round(rate / bare / max(1, num_workers), 3)

    if voc_dir is not None:
        if kind != "frames":
            raise InputError(f"{shard_dir}: {kind} shards; --voc-dir compares frame shards only")
        files = _voc_files(Path(voc_dir), [json.loads(r.meta).get("id", "") for r in raws])
        voc = DataLoader(
            _VocFiles(files, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
            shuffle=False, persistent_workers=False,
        )  # fmt: skip
        voc_startup, voc_rate = _time_loader(voc, num_batches)
        result.update(
            voc_startup_s=round(voc_startup, 3),
            voc_images_per_s=round(voc_rate, 1),
            shard_over_voc=round(rate / voc_rate, 3),
        )
    return result


def _kind(shard_dir: str, shards: list[str]) -> str:
    """``frames`` or ``clips`` from the manifest, else from the first sample's members."""
    manifest = Path(shard_dir) / "manifest.json"
    if manifest.exists():
        return "clips" if json.loads(manifest.read_text()).get("kind") == "clips" else "frames"
    try:
        next(read_raw_samples(shards[:1], "frames"))
    except ValueError:
        return "clips"
    return "frames"


def _time_loader(loader: Any, num_batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images per second over the next ``num_batches``)."""
    start = time.perf_counter()
    images = 0
    first = None
    # The workers stopped however the loop ends: a bad shard raised in a worker kept the iterator
    # (and the workers, which ignore SIGTERM) alive in the traceback, and the exit waited for ever.
    with contextlib.closing(batches(loader)) as stream:
        for i, batch in enumerate(stream):
            if i == 0:
                first = time.perf_counter()
                continue
            images += batch.images.shape[0] * (batch.images.shape[1] if batch.images.ndim == 5 else 1)
            if i == num_batches:
                break
    end = time.perf_counter()
    assert first is not None
    return first - start, images / max(end - first, 1e-9)


def _time_bare(raws: list, kind: str, transform: DetectionTransform) -> float:
    """Images per second decoding and augmenting ``raws`` in a plain loop."""
    torch.manual_seed(0)
    start = time.perf_counter()
    images = 0
    for raw in raws:
        sample = decode_sample(raw, kind, transform)  # type: ignore[arg-type]
        images += sample.image.shape[0] if sample.image.ndim == 4 else 1
    return images / (time.perf_counter() - start)


def _voc_files(voc_dir: Path, ids: list[str]) -> list[tuple[Path, Path]]:
    """(JPEG, XML) pairs for the shard ids; InputError when one is missing (other images, of
    other sizes, would make the comparison one of two workloads)."""
    images, notes = voc_dir / "JPEGImages", voc_dir / "Annotations"
    pairs, missing = [], []
    for source_id in ids:
        stem = Path(source_id).stem
        jpg, xml = images / f"{stem}.jpg", notes / f"{stem}.xml"
        if jpg.exists() and xml.exists():
            pairs.append((jpg, xml))
        else:
            missing.append(stem or "(no id)")
    if missing:
        raise InputError(f"{voc_dir}: {len(missing)} of the {len(ids)} shard images read have no JPEGImages/<id>.jpg "
                         f"with Annotations/<id>.xml (first: {missing[0]}); the comparison needs the shards' own "
                         "source files (benchmark.loader.voc_dir; null: skip it)")
    return pairs


class _VocFiles(Dataset):
    """Loose VOC files, read, parsed, decoded and augmented like a shard sample."""

    def __init__(self, files: list[tuple[Path, Path]], transform: DetectionTransform):
        self.files, self.transform = files, transform
        self.classes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Sample:
        jpg, xml = self.files[i]
        root = ET.parse(xml).getroot()
        boxes, labels, difficult = [], [], []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(self.classes.setdefault(obj.findtext("name") or "", len(self.classes)) + 1)
            difficult.append(obj.findtext("difficult") == "1")
        data = np.fromfile(jpg, np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        height, width = rgb.shape[:2]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "boxes": (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / scale).clamp(0, 1),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.bool),
        }
        image, target = self.transform(torch.from_numpy(rgb).permute(2, 0, 1), target)
        return Sample(image, target, jpg.stem, (width, height))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shard_dir")
    parser.add_argument("--voc-dir")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--num-batches", type=int, default=50)
    args = parser.parse_args(argv)
    result = run(args.shard_dir, args.image_size, args.batch_size, args.num_workers, args.num_batches, args.voc_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
