"""Benchmark stage: the project's speed figures, measured and collected in one place.

Usage::

    python -m pipeline.benchmark [--params params.yaml] [--only models,postprocess,...] [--out FILE] [--set key=value ...]

Sections (``sections`` of the ``benchmark`` params, or ``--only``), each a module of
:mod:`pipeline.bench` with a ``run(**settings) -> dict``:

- ``models`` (:mod:`pipeline.bench.models`): for every listed model file, batch-1 latency
  split into pre-processing, forward and post-processing (a temporal model: per-frame
  streaming latency), throughput at a larger batch, parameters and multiply-adds; the
  torchvision SSDLite peer at the same input size; LSTM-SSD against SSDLite;
- ``postprocess`` (:mod:`pipeline.bench.postprocess`): our post-processing against torchvision's;
- ``loader`` (:mod:`pipeline.bench.loader`): training-loader throughput from the shards;
- ``train_step`` (:mod:`pipeline.bench.train_step`): a full training step against forward + backward;
- ``convert`` (:mod:`pipeline.bench.convert`): the ``prepare`` stage's throughput per worker (frames
  and video) and its peak memory converting 1 and many videos;
- ``deployed`` (:mod:`pipeline.bench.deployed`): each model in PyTorch eager, ONNX Runtime float
  and int8 (the deploy stage's graphs), alternately: batch-1 latency parts, throughput, at 1 and 2
  threads; pruned against unpruned, int8 against eager, LSTM-SSD against SSDLite;
- ``feed`` (:mod:`pipeline.bench.feed`): decode + full SSD augmentation per loader worker at
  300 px on VOC-sized JPEGs, and the workers a GPU's training rate needs;
- ``gpu`` (:mod:`pipeline.bench.gpu`, not in the CPU run's sections): the GPU check's training
  and inference figures against torchvision's, run by ``scripts/gpu_check.sh``;
- ``kernels`` (:mod:`pipeline.bench.kernels`, not in the CPU run's sections): ONNX Runtime's
  int8 and float convolution kernels by channel width: the widths a pruning should avoid.

Outputs: ``out`` (``metrics/benchmark.json``, for ``dvc metrics diff``): measurements only
(timings, ratios, sizes, counts): the headline figures (``postprocess_share.<model>``: post-processing over
end-to-end latency at batch 1; ``lstm_vs_ssdlite_latency_ratio``: the first LSTM-SSD's
streaming forward over its SSDLite's forward; ``peer_ratio``: our end-to-end latency over
torchvision's SSDLite's), then ``models``, ``peer``, ``lstm_vs_ssdlite`` and one entry per
other section (``postprocess``, ``loader``, ``train_step``, ``convert``); ``setup``
(``reports/benchmark-setup.json``): how they were measured, in the same nesting: the device,
torch version and threads, each model's file, architecture and mode, batch sizes, thresholds
(:func:`split_setup`); ``chart``
(``reports/benchmark.png``, when ``models`` ran): a stacked bar per model of its
latency parts, and the peer.

Figures are timings of the machine that runs the stage; a benchmark is never a test and
no timing is asserted anywhere. A listed model file that does not exist is a one-line
error (exit code 2), before anything is timed.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import torch

from ssd import atomic
from pipeline.bench.config import BenchmarkConfig
from pipeline.config import load_config, load_params, to_dict
from pipeline.datasets import read_manifest
from pipeline.dvc_inputs import check_tracked
from pipeline.stage import StageError, arg_parser, check_writable, run
from ssd.data.images import read_image_file
from ssd.data.shards import list_shards
from ssd.model_file import ModelFileError, read_model_file

log = logging.getLogger("pipeline.benchmark")


Section = Callable[[BenchmarkConfig, str], dict[str, Any]]


def _models(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import models

    settings = {**to_dict(cfg.models), "postprocess": cfg.models.postprocess}
    try:
        return models.run(device=device, **settings)
    except ModelFileError as e:
        raise StageError(str(e)) from None


def _postprocess(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import postprocess

    # Timed on the CPU whatever benchmark.device says; the setup file records it.
    return {"postprocess": {**postprocess.run(**to_dict(cfg.postprocess)), "device": "cpu"}}


def _loader(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import loader

    c = cfg.loader
    return {"loader": loader.run(c.shards, c.image_size, c.batch_size, c.num_workers, c.num_batches, c.voc_dir)}


def _train_step(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import train_step

    c = cfg.train_step
    try:
        arch = read_model_file(c.model)["arch"]
    except ModelFileError as e:
        raise StageError(str(e)) from None
    if "placement" in arch:  # an LSTM-SSD arch: its step needs clips, this benchmark feeds frames
        raise StageError(f"{c.model}: benchmark.train_step needs a frame model (SSD/SSDLite), not {arch.get('name')}")
    shards = [str(p) for p in list_shards(c.shards, c.split)]
    figures = train_step.run(
        shards, arch["num_classes"], arch, batch_size=c.batch_size, num_workers=c.num_workers, steps=c.steps,
        warmup=c.warmup, device=device,
    )  # fmt: skip
    return {"train_step": {"model": Path(c.model).stem, **figures}}


def _convert(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import convert

    c = cfg.convert
    return {"convert": convert.run(c.voc_dir, c.videos, c.frames, c.size)}


def _deployed(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import deployed

    if device != "cpu":
        raise StageError("benchmark.deployed times ONNX Runtime on the CPU: run it with benchmark.device cpu")
    c = cfg.deployed
    m = cfg.models  # one frame for both sections: the same image, or the same synthetic size and quality
    return {"deployed": deployed.run(**to_dict(c), source_image=m.source_image, postprocess=m.postprocess,
                                     source_size=m.source_size, jpeg_quality=m.jpeg_quality)}


def _feed(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import feed

    return {"feed": feed.run(**to_dict(cfg.feed))}


def _gpu(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import gpu

    c = cfg.gpu
    if c.dry_run:  # the smallest run that goes through every part, the loop in the first precision
        first = c.precisions[0] if c.precisions else "fp32"  # (bf16 can be 25x fp32's time on a CPU)
        settings = {**to_dict(c), "batches": [2], "steps": 2, "warmup": 1, "loop_steps": 2, "num_workers": 1,
                    "loop": [[name, first, 2] for name in c.models], "inference_batch": 2, "latency_repeats": 2}
        device = "cpu"
    else:
        settings = to_dict(c)
        if device != "cuda":
            raise StageError("benchmark.gpu needs a CUDA device (gpu.dry_run: true runs it on the CPU)")
    return {"gpu": gpu.run(**settings, device=device)}


def _kernels(cfg: BenchmarkConfig, device: str) -> dict[str, Any]:
    from pipeline.bench import kernels

    if device != "cpu":
        raise StageError("benchmark.kernels times ONNX Runtime on the CPU: run it with benchmark.device cpu")
    return {"kernels": kernels.run(**to_dict(cfg.kernels))}


SECTIONS: dict[str, Section] = {
    "models": _models,
    "postprocess": _postprocess,
    "loader": _loader,
    "train_step": _train_step,
    "convert": _convert,
    "deployed": _deployed,
    "feed": _feed,
    "gpu": _gpu,
    "kernels": _kernels,
}


def check_inputs(cfg: BenchmarkConfig, names: list[str]) -> None:
    """Every file the chosen sections read exists: one-line :class:`StageError` otherwise, before any timing."""
    if "models" in names:
        for f in cfg.models.files:
            if not Path(f).is_file():
                raise StageError(f"{f}: model file not found (listed in benchmark.models.files)")
        image = cfg.models.source_image
        if image is not None:
            if not Path(image).is_file():
                raise StageError(f"{image}: image not found (benchmark.models.source_image)")
            pixels, why = read_image_file(image)
            if pixels is None:
                raise StageError(f"{image}: {why} (benchmark.models.source_image)")
        stems = [Path(f).stem for f in cfg.models.files]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise StageError(f"benchmark.models.files: two files named {repeated[0]!r}; the JSON names models by file stem")
    if "loader" in names:
        _check_loader(cfg.loader)
    if "train_step" in names:
        if not Path(cfg.train_step.model).is_file():
            raise StageError(f"{cfg.train_step.model}: model file not found (benchmark.train_step.model)")
        if not Path(cfg.train_step.shards).is_dir() or not list_shards(cfg.train_step.shards, cfg.train_step.split):
            raise StageError(f"{cfg.train_step.shards}: no {cfg.train_step.split} shards (benchmark.train_step.shards)")
        ours, theirs = _model_info(cfg.train_step.model)["class_names"], read_manifest(cfg.train_step.shards).classes
        if ours != theirs:
            raise StageError(f"{cfg.train_step.shards}: classes {theirs} are not those of {cfg.train_step.model} "
                             f"({ours}) (benchmark.train_step.shards)")
    if "deployed" in names:
        stems = {Path(f).stem for f in cfg.deployed.files}
        for key, pair in (("pruned", cfg.deployed.pruned), ("lstm", cfg.deployed.lstm)):
            missing = [s for s in pair if s not in stems]
            if len(missing) == 1:  # one of the pair listed: a typo would drop its ratios silently
                raise StageError(f"benchmark.deployed.{key}: {missing[0]!r} is not the stem of a file in "
                                 f"benchmark.deployed.files ({', '.join(sorted(stems))})")
        for f in cfg.deployed.files:
            stem = Path(f).stem
            if not Path(f).is_file():
                raise StageError(f"{f}: model file not found (listed in benchmark.deployed.files)")
            for name, what in ((f"{stem}.onnx", "float"), (f"{stem}-int8.onnx", "int8")):
                if not (Path(cfg.deployed.onnx_dir) / name).is_file():
                    raise StageError(f"{Path(cfg.deployed.onnx_dir) / name}: {what} graph not found (benchmark.deployed."
                                     "onnx_dir: the deploy stage writes it)")
        _check_lstm_pair(cfg.deployed.files, cfg.deployed.lstm)
    if "gpu" in names and cfg.gpu.loop and not (Path(cfg.gpu.shards).is_dir() and list_shards(cfg.gpu.shards, "train")):
        raise StageError(f"{cfg.gpu.shards}: no train shards (benchmark.gpu.shards, for gpu.loop)")
    if "convert" in names and not (Path(cfg.convert.voc_dir) / "Annotations").is_dir():
        raise StageError(f"{cfg.convert.voc_dir}: no VOC-layout dataset (benchmark.convert.voc_dir)")


def _model_info(path: str) -> dict[str, Any]:
    try:
        return read_model_file(path)
    except ModelFileError as e:
        raise StageError(str(e)) from None


def _check_lstm_pair(files: Sequence[str], pair: Sequence[str]) -> None:
    """``deployed.lstm`` compares an LSTM-SSD with the SSDLite it is built on: the same input and
    layers but the cell (another size was a traceback after all the timing)."""
    from pipeline.bench.models import arch_differences, ssdlite_arch

    paths = {Path(f).stem: f for f in files}
    if not all(stem in paths for stem in pair):
        return
    lstm, ssdlite = (_model_info(paths[stem])["arch"] for stem in pair)
    wanted = ssdlite_arch(lstm)
    differ = [f"{k} {ssdlite.get(k)}, not {wanted.get(k)}" for k in arch_differences(wanted, ssdlite)]
    if differ:
        raise StageError(f"benchmark.deployed.lstm: {paths[pair[1]]} is not the SSDLite {paths[pair[0]]} is built on "
                         f"({'; '.join(differ)})")


def _check_loader(c: Any) -> None:
    if not list(Path(c.shards).glob("*.tar")):
        raise StageError(f"{c.shards}: no .tar shards (benchmark.loader.shards)")
    if c.voc_dir is None:
        return
    if not (Path(c.voc_dir) / "Annotations").is_dir():
        raise StageError(f"{c.voc_dir}: no VOC-layout dataset (benchmark.loader.voc_dir; null: skip the comparison)")
    kind = read_manifest(c.shards).kind if (Path(c.shards) / "manifest.json").is_file() else "frames"
    if kind != "frames":
        raise StageError(f"{c.shards}: {kind} shards; benchmark.loader.voc_dir compares frame shards only (null: skip)")


def benchmark(cfg: BenchmarkConfig, names: list[str]) -> dict[str, Any]:
    """Run the sections ``names``; the JSON's content (device first, then each section's figures)."""
    device = _resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        cv2.setNumThreads(cfg.threads)
    result: dict[str, Any] = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for name in names:
        log.info("benchmark %s ...", name)
        t0 = time.perf_counter()
        result.update(SECTIONS[name](cfg, device))
        log.info("benchmark %s done in %.1f s", name, time.perf_counter() - t0)
    return result


#: Numbers that say how something was measured, not what was measured: with the texts (device,
#: file names, modes), they go to the setup file, so `dvc metrics diff` compares measurements only.
SETUP_NUMBERS = frozenset({
    "threads", "batch", "batch_size", "image_size", "width_mult", "num_classes", "num_priors", "num_batches",
    "num_workers", "score_threshold", "nms_threshold", "top_k", "max_detections",
})


def split_setup(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, setup)`` of a benchmark result, both in its nesting: strings and the
    :data:`SETUP_NUMBERS` keys go to ``setup``, every other value (timings, ratios, costs, counts,
    checks) to ``metrics``. Sections left empty on one side are dropped from it."""
    metrics: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            m, s = split_setup(value)
            if m:
                metrics[key] = m
            if s:
                setup[key] = s
        elif isinstance(value, str) or key in SETUP_NUMBERS:
            setup[key] = value
        else:
            metrics[key] = value
    return metrics, setup


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", help="comma-separated sections to run (default: the params' sections)")
    parser.add_argument("--out", help="output JSON path (default: the params' out); the setup file and the chart "
                                      "go beside it (FILE-setup.json, FILE.png) unless --set setup=/chart= names them")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load_config(BenchmarkConfig, load_params(args.params), "benchmark", args.overrides, args.params)
        names = args.only.split(",") if args.only else list(cfg.sections)
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            raise StageError(f"unknown benchmark section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        check_inputs(cfg, names)
        check_tracked(cfg, "benchmark", only=names)
        out, setup_path, chart = _outputs(args.out, cfg, args.overrides)
        check_writable(out.parent, setup_path.parent, chart.parent)
        for path in (out, setup_path, chart):
            if path.is_dir():  # found out only after all the timing
                raise StageError(f"{path}: is a folder; name the file to write")
        result = benchmark(cfg, names)
        metrics, setup = split_setup(result)
        atomic.write_json(setup_path, setup)
        atomic.write_json(out, metrics)
        log.info("wrote %s and %s", out, setup_path)
        if "models" in result:
            from pipeline.bench.chart import latency_chart

            title = f"{result['device']}, {result['threads']} thread(s), {result['source_size']} JPEG frames"
            atomic.write_bytes(chart, latency_chart(result["models"], result.get("peer"), title))
            log.info("wrote %s", chart)
        return 0

    return run(body)


def _outputs(out: str | None, cfg: BenchmarkConfig, overrides: list[str]) -> tuple[Path, Path, Path]:
    """The metrics, setup and chart paths. ``--out FILE`` moves all three (``FILE-setup.json``,
    ``FILE.png`` beside it), unless ``--set setup=`` / ``chart=`` names them: a partial run must
    not replace the stage's own setup file or chart, which describe the stage's metrics."""
    if not out:
        return Path(cfg.out), Path(cfg.setup), Path(cfg.chart)
    given = {o.split("=", 1)[0].strip() for o in overrides or []}
    path = Path(out)
    setup = Path(cfg.setup) if "setup" in given else path.with_name(f"{path.stem}-setup.json")
    chart = Path(cfg.chart) if "chart" in given else path.with_suffix(".png")
    return path, setup, chart


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("benchmark.device is cuda, but no CUDA device is available")
    return device


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    raise SystemExit(main())
