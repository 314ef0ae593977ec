"""Generate the embedded default data sets (a fresh clone has no VOC and no internet).

Usage::

    python -m pipeline.sample [--params params.yaml] [--set voc.train_images=20 ...]

Reads the ``sample`` section of ``params.yaml`` and writes, from its seed alone
(byte-identical on every run, whatever the number of worker processes):

``<voc.out_dir>`` (default ``data/sample/voc``), a Pascal VOC layout::

    Annotations/<id>.xml   JPEGImages/<id>.jpg   ImageSets/Main/{train,val}.txt   classes.txt

``<ir.out_dir>`` (default ``data/sample/ir``), the same infrared videos twice::

    README.txt
    frames/   VOC layout, one grey JPEG per frame, <id> = <video>_<frame> (frame from 1,
              not zero-padded: sort numerically), plus classes.txt and degraded.txt
    video/    videos/<video>.mp4 (or .avi), annotations/<video>.txt (one object:
              "x y w h" per frame, "0 0 0 0" when absent) or annotations/<video>/gt.txt
              (MOT: frame,id,x,y,w,h,conf,class,visibility), splits.json, meta.json

Each output directory is built under a temporary name and renamed when
complete, so a killed or failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.pool
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import cv2
from tqdm import tqdm

from pipeline import sample_files as files
from pipeline.config import ConfigError, load_config, load_params
from pipeline.stage import arg_parser, check_replaceable, run
from ssd.bounds import Seed
from ssd.atomic import atomic_dir
from ssd.data.synthetic import video_splits
from ssd.data.workers import opencv_one_thread

log = logging.getLogger("pipeline.sample")


@dataclass(frozen=True)
class VocParams:
    """The VOC-style image set."""

    out_dir: str = "data/sample/voc"  # output directory (dvc.yaml's outs read the same key)
    train_images: int = 2000  # enough for a from-scratch SSDLite at 160x160 to reach mAP@0.5 >= 0.6
    val_images: int = 300  # ids follow the training ones
    min_side: int = 128  # image width and height are drawn from [min_side, max_side]
    max_side: int = 224  # small: training resizes to 160x160 anyway
    max_objects: int = 6  # a non-empty image has 1..max_objects objects
    empty_fraction: float = 0.03  # share of background-only images (no objects)
    jpeg_quality: int = 90  # about what VOC's own JPEGs use

    def __post_init__(self) -> None:
        _check(self.train_images >= 0 and self.val_images >= 0, "sample.voc: image counts must be >= 0")
        _check(16 <= self.min_side <= self.max_side, "sample.voc: need 16 <= min_side <= max_side")
        _check(self.max_objects >= 1, "sample.voc.max_objects: must be >= 1")
        _check(0.0 <= self.empty_fraction <= 1.0, "sample.voc.empty_fraction: must be in [0, 1]")
        _check(1 <= self.jpeg_quality <= 100, "sample.voc.jpeg_quality: must be in [1, 100]")


@dataclass(frozen=True)
class IrParams:
    """The infrared video set."""

    out_dir: str = "data/sample/ir"  # output directory (dvc.yaml's outs read the same key)
    videos: int = 36  # a few dozen short videos
    frames: int = 48  # frames per video: several clips of 8-16 frames each
    width: int = 160  # frame size; a small thermal sensor
    height: int = 120
    max_objects: int = 3  # video i holds 1 + i % max_objects objects
    degraded_fraction: float = 0.33  # share of degraded frames in every video (noise, occlusion, ...)
    val_fraction: float = 0.25  # share of whole videos in val
    fps: int = 10  # frame rate written into the video files
    jpeg_quality: int = 95  # frames as grey JPEG

    def __post_init__(self) -> None:
        _check(self.videos >= 0, "sample.ir.videos: must be >= 0")
        _check(self.frames >= 2, "sample.ir.frames: must be >= 2")
        _check(
            self.width >= 32 and self.height >= 32 and self.width % 2 == 0 and self.height % 2 == 0,
            "sample.ir: width and height must be even and >= 32 (video encoders need even sizes)",
        )
        _check(1 <= self.max_objects <= 100, "sample.ir.max_objects: must be in [1, 100]")
        _check(0.0 <= self.degraded_fraction <= 0.9, "sample.ir.degraded_fraction: must be in [0, 0.9]")
        _check(0.0 <= self.val_fraction <= 1.0, "sample.ir.val_fraction: must be in [0, 1]")
        _check(self.fps >= 1, "sample.ir.fps: must be >= 1")
        _check(1 <= self.jpeg_quality <= 100, "sample.ir.jpeg_quality: must be in [1, 100]")


@dataclass(frozen=True)
class SampleConfig:
    """The ``sample`` section of ``params.yaml``."""

    seed: Seed = 0  # every image and video is a function of (seed, data set, index)
    workers: int = 2  # processes (the machine this was tuned on has 2 cores); output does not depend on it
    voc: VocParams = field(default_factory=VocParams)
    ir: IrParams = field(default_factory=IrParams)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "sample.workers: must be >= 1")
        voc, ir = Path(self.voc.out_dir).resolve(), Path(self.ir.out_dir).resolve()
        _check(
            voc != ir and voc not in ir.parents and ir not in voc.parents,
            "sample: voc.out_dir and ir.out_dir must be separate directories",
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__).parse_args(argv)

    def body() -> None:
        cfg = load_config(SampleConfig, load_params(args.params), "sample", args.overrides, args.params)
        write_sample(cfg)

    return run(body)


#: What the sample's folders hold: an existing folder with anything else is not replaced.
VOC_ENTRIES = frozenset({"Annotations", "ImageSets", "JPEGImages", "classes.txt"})
IR_ENTRIES = frozenset({"README.txt", "frames", "video"})


def write_sample(cfg: SampleConfig) -> None:
    """Generate both data sets and write them to ``cfg.voc.out_dir`` and ``cfg.ir.out_dir``."""
    start = time.monotonic()
    n_train, n_val = cfg.voc.train_images, cfg.voc.val_images
    splits = video_splits(cfg.seed, cfg.ir.videos, cfg.ir.val_fraction)
    # Videos first: they are the longest items, so both workers end at about the same time.
    tasks = [("ir", i, s) for i, s in enumerate(splits)]
    tasks += [("voc", i, "train" if i < n_train else "val") for i in range(n_train + n_val)]

    for key, out, other, names in (("voc", cfg.voc.out_dir, "ir", VOC_ENTRIES), ("ir", cfg.ir.out_dir, "voc", IR_ENTRIES)):
        check_replaceable(out, f"sample.{key}.out_dir", lambda p, n=names: {e.name for e in p.iterdir()} <= n,
                          "a generated sample", {f"sample.{other}.out_dir": getattr(cfg, other).out_dir})
    with atomic_dir(cfg.voc.out_dir) as voc_tmp, atomic_dir(cfg.ir.out_dir) as ir_tmp:
        for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc_tmp / d).mkdir(parents=True)
            (ir_tmp / "frames" / d).mkdir(parents=True)
        (ir_tmp / "video" / "videos").mkdir(parents=True)
        (ir_tmp / "video" / "annotations").mkdir(parents=True)
        job = files.Job(cfg, voc_tmp, ir_tmp)
        voc_results: dict[int, dict] = {}
        ir_results: dict[int, dict] = {}
        with _workers(cfg.workers) as pool:
            # Probe the video writer in a worker: the parent does no OpenCV work of its own.
            probe = pool.apply(files.probe_video, (ir_tmp,)) if pool else files.probe_video(ir_tmp)
            job = replace(job, video=probe)
            work = functools.partial(_work, job)
            results: Iterable = pool.imap_unordered(work, tasks, chunksize=4) if pool else map(work, tasks)
            progress = tqdm(results, total=len(tasks), desc="sample", unit="item", mininterval=0.5)
            for kind, index, result in progress:
                (ir_results if kind == "ir" else voc_results)[index] = result

        files.write_voc_index(voc_tmp, [voc_results[i] for i in range(n_train + n_val)])
        files.write_ir_index(job, [ir_results[i] for i in range(len(splits))])

    voc_objects = sum(r["objects"] for r in voc_results.values())
    log.info(
        "wrote %d images (%d train, %d val; %d objects, %d difficult, %d empty images) to %s",
        n_train + n_val,
        n_train,
        n_val,
        voc_objects,
        sum(r["difficult"] for r in voc_results.values()),
        sum(r["objects"] == 0 for r in voc_results.values()),
        cfg.voc.out_dir,
    )
    frames = sum(len(r["degradation"]) for r in ir_results.values())
    degraded = sum(sum(bool(k) for k in r["degradation"]) for r in ir_results.values())
    log.info(
        "wrote %d videos (%d train, %d val; %d frames, %.1f%% degraded; %s) to %s",
        len(splits),
        splits.count("train"),
        splits.count("val"),
        frames,
        100.0 * degraded / max(frames, 1),
        job.video[1],
        cfg.ir.out_dir,
    )
    log.info("done in %.1f s", time.monotonic() - start)


@contextlib.contextmanager
def _workers(n: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of ``n`` worker processes, or ``None`` (work in this process) when ``n == 1``."""
    if n == 1:
        yield None
        return
    # fork: the workers need not import anything again; spawn where there is no fork. Forked
    # workers inherit OpenCV at one thread, its pool stopped here for the fork (a child that set
    # it itself after this process's pool had run could wait for ever: ssd.data.workers);
    # spawned ones start afresh and set it.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with opencv_one_thread():
        pool = multiprocessing.get_context(method).Pool(n, initializer=_init_worker if method == "spawn" else None)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _work(job: files.Job, task: tuple[str, int, str]) -> tuple[str, int, dict]:
    kind, index, split = task
    if kind == "voc":
        return kind, index, files.write_voc_image(job, index, split)
    return kind, index, files.write_ir_video(job, index, split)


if __name__ == "__main__":
    raise SystemExit(main())
