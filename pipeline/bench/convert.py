"""Conversion throughput and memory: the ``prepare`` stage's sources and writers, one worker.

Usage: python -m pipeline.bench.convert VOC_DIR [--videos 8] [--frames 150] [--size 320 240]

- ``frames``: the VOC-layout dataset ``VOC_DIR`` (the generated sample) to frame shards:
  images per second with one worker (the conversion scales by workers: each image is
  an independent task).
- ``video``: synthetic videos (``--frames`` frames of ``--size``, MPEG-4 with one box per
  frame in a box list) to clip shards, 1 video and then ``--videos`` videos: frames per
  second with one worker, and the peak resident memory of each conversion. Each
  conversion runs in a fresh Python process that imports only the converter, so its
  peak RSS (``VmHWM``) is the conversion's own.
  ``rss_ratio`` (many over one) near 1 says memory does not grow with the number of
  videos: the writers stream, at most a few videos decoded at a time. Most of the peak is
  the imports (webdataset imports torch: about 0.5 GB); ``video_rss_growth_mb_*`` is the
  conversion's own part: the peak minus the resident memory just before it started.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ssd.errors import InputError


CLIP = 4  # frames per clip of the video conversion (synthetic videos have at least as many)


def _write_videos(root: Path, count: int, frames: int, size: tuple[int, int]) -> None:
    """``videos/v<i>.mp4`` + ``annotations/v<i>.txt``: a moving bright square, its box per line."""
    (root / "videos").mkdir(parents=True)
    (root / "annotations").mkdir()
    w, h = size
    rng = np.random.default_rng(0)
    background = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    for i in range(count):
        writer = cv2.VideoWriter(str(root / "videos" / f"v{i}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
        lines = []
        for n in range(frames):
            x, y = (7 * n + 13 * i) % (w - 24), (5 * n + 11 * i) % (h - 24)
            image = background.copy()
            image[y : y + 20, x : x + 20] = 230
            writer.write(image)
            lines.append(f"{x} {y} 20 20")
        writer.release()
        (root / "annotations" / f"v{i}.txt").write_text("\n".join(lines) + "\n")


def _convert(kind: str, root: str, out: str) -> dict[str, Any]:
    """One conversion in this process, one worker: the figures and this process's peak RSS."""
    from ssd.data.sources import video, voc
    from ssd.data.sources.clip_writer import ClipOptions, write_clips
    from ssd.data.sources.frame_writer import WriteOptions, write_frames
    from ssd.data.sources.records import classes
    from ssd.data.sources.report import Report

    import webdataset.writer  # noqa: F401 - the shard writer's import (it brings torch), counted apart

    report, opts = Report(), WriteOptions(workers=1)
    before_kib = _status_kib("VmRSS")  # the interpreter and the imports
    t0 = time.perf_counter()
    if kind == "frames":
        listing = voc.read(Path(root), voc.VocLayout(), report)
        manifest = write_frames(listing, classes(None, listing), Path(out), opts, report)
    else:
        listing = video.read(Path(root), video.VideoLayout(val_fraction=0.0), report)
        manifest = write_clips(listing, classes(None, listing), Path(out), opts, ClipOptions(CLIP, CLIP), report)
    seconds = time.perf_counter() - t0
    frames = sum(s["frames"] for s in manifest["splits"].values())
    peak_kib = _status_kib("VmHWM")
    return {"frames": frames, "seconds": seconds, "peak_rss_mb": peak_kib / 1024,
            "growth_mb": (peak_kib - before_kib) / 1024, "skipped": len(report.skipped)}  # fmt: skip


def _status_kib(field: str) -> int:
    """``VmRSS`` (resident memory now) or ``VmHWM`` (its peak) of this process, from Linux ``/proc``.

    Not ``getrusage``'s ``ru_maxrss``: it survives ``exec``, so a child started from a large
    process (the benchmark stage holds torch and the models) reports its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(kind: str, root: Path, out: Path) -> dict[str, Any]:
    """:func:`_convert` in a fresh interpreter (so that its peak RSS is the conversion's alone)."""
    code = "import json, sys; from pipeline.bench.convert import _convert; print(json.dumps(_convert(*sys.argv[1:])))"
    args = [sys.executable, "-c", code, kind, str(root.resolve()), str(out.resolve())]
    done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"{root}: the conversion benchmark ({kind}) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(voc_dir: str, videos: int = 8, frames: int = 150, size: tuple[int, int] = (320, 240)) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp_path = Path(tmp)
        still = _measure("frames", Path(voc_dir), tmp_path / "frames-out")
        result: dict[str, Any] = {
            "frames_per_s_per_worker": round(still["frames"] / still["seconds"], 1),
            "frames_images": still["frames"],
        }
        one, many = (tmp_path / "one", tmp_path / "many")
        _write_videos(one, 1, frames, size)
        _write_videos(many, videos, frames, size)
        a, b = _measure("video", one, tmp_path / "one-out"), _measure("video", many, tmp_path / "many-out")
    if a["frames"] != frames or b["frames"] != videos * frames:  # every frame decoded and kept
        raise RuntimeError(f"video conversion lost frames: {a['frames']} of {frames}, {b['frames']} of {videos * frames}")
    result.update(
        video_frames_per_s_per_worker=round(b["frames"] / b["seconds"], 1),
        video_peak_rss_mb_1=round(a["peak_rss_mb"], 1),
        video_peak_rss_mb_many=round(b["peak_rss_mb"], 1),
        video_rss_growth_mb_1=round(a["growth_mb"], 1),
        video_rss_growth_mb_many=round(b["growth_mb"], 1),
        videos_many=videos,
        rss_ratio=round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
    )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("voc_dir")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--size", type=int, nargs=2, default=(320, 240))
    a = p.parse_args(argv)
    print(json.dumps(run(a.voc_dir, a.videos, a.frames, tuple(a.size)), indent=2))


if __name__ == "__main__":
    main()
