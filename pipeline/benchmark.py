"""Benchmark stage: where the time goes, as JSON for ``dvc metrics diff``.

Usage::

    python -m pipeline.benchmark [--params params.yaml] [--only postprocess,...] [--out FILE] [--set key=value ...]

Each section is a module of :mod:`pipeline.bench` with a ``run(**settings) -> dict``;
the settings come from the ``benchmark`` section of ``params.yaml``. Figures
are timings on the machine that runs it: the JSON records its device and
thread count. Benchmarks are never tests: no timing is asserted anywhere.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field

import torch

from pipeline import atomic
from pipeline.config import load_config, load_params, to_dict
from pipeline.stage import StageError, arg_parser, run

log = logging.getLogger("pipeline.benchmark")


@dataclass(frozen=True)
class PostprocessBench:
    batch: int = 8
    """Images per call (the issue's 8 x 2,990 priors x 21 classes)."""
    num_classes: int = 21
    """Classes including the background (VOC: 21)."""
    repeat: int = 20
    """Timed calls per measurement; the median is reported."""


@dataclass(frozen=True)
class BenchmarkConfig:
    sections: tuple[str, ...] = ("postprocess",)
    """Which benchmarks to run, in order."""
    out: str = "metrics/benchmark.json"
    """Where the JSON goes."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    postprocess: PostprocessBench = field(default_factory=PostprocessBench)


def _sections() -> dict:
    from pipeline.bench import postprocess

    return {"postprocess": lambda cfg: postprocess.run(**to_dict(cfg.postprocess))}


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", help="comma-separated sections to run (default: the params' sections)")
    parser.add_argument("--out", help="output JSON path (default: the params' out)")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load_config(BenchmarkConfig, load_params(args.params), "benchmark", args.overrides)
        available = _sections()
        names = args.only.split(",") if args.only else list(cfg.sections)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise StageError(f"unknown benchmark section {unknown[0]!r}; known: {', '.join(available)}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        result = {
            "device": _device_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        for name in names:
            log.info("benchmark %s ...", name)
            t0 = time.perf_counter()
            result[name] = available[name](cfg)
            log.info("benchmark %s done in %.1f s", name, time.perf_counter() - t0)
        out = args.out or cfg.out
        atomic.write_json(out, result)
        log.info("wrote %s", out)
        return 0

    return run(body)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    raise SystemExit(main())
