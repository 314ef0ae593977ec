"""The GPU check's figures (``scripts/gpu_check.sh``, docs/gpu.md), in one JSON.

- ``train[model][precision][bsN]``: our step on a batch already on the device (``limit``) and
  torchvision's model of the same family with its own loss (``peer``), timed alternately step by
  step; images/s, ``ours_vs_torchvision`` and each one's peak device memory;
- ``options[model]``: the limit at ``option_precision`` and the largest batch with
  ``channels_last`` and with ``torch.compile`` (``compile_backend``, at most ``compile_limit_s``
  per model), each against the plain step timed alternately with it;
- ``loop[model][precision][bsN]``: the real training stage from shards (:func:`training_loop`):
  images/s, ``vs_limit`` and the data-wait fraction; ``bsN_colour_on_device``: the same with
  the colour change left to the device (``data.augment.photometric_device``);
- ``inference[model][precision]``: batch-1 latency and ``inference_batch`` throughput with the
  post-processing on the device (the evaluation's thresholds, torchvision's defaults), ours
  and torchvision's, and their ratios;
- ``colour_ms_per_image``: the colour change the loader workers leave to the device
  (``data.augment.photometric_device``), per image of a batch of the largest size;
- ``tests``: the counts of the CUDA tests' JUnit report, when the script ran them.

Each part checks ``time_limit_s`` before it starts and is left out (named in ``skipped``) once
it is spent; a part that fails is named with its error in ``failed`` and the others go on.
``dry_run``: on the CPU, at the smallest sizes, to prove the check runs; no figure of a dry
run says anything about a GPU.
"""

from __future__ import annotations

import math
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.bench import gpu_infer
from pipeline.bench.device_timing import Budget, peak_memory, timed
from pipeline.bench.gpu_train import MODELS, our_step, peer_step, synthetic_batch, training_loop
from ssd import atomic


def train_pair(name: str, precision: str, batch: int, s: dict, device: str) -> dict[str, Any]:
    """Our limit step against torchvision's, alternately."""
    images, targets = synthetic_batch(batch, MODELS[name][0]["image_size"], device)
    ours = our_step(name, images, targets, precision, device)
    peer = peer_step(name, images, targets, precision, device)
    mem = [peak_memory(device, fn, s["warmup"]) for fn in (ours, peer)]
    t_ours, t_peer = timed([ours, peer], s["steps"], device)
    out = {"limit_images_per_s": round(batch / t_ours, 2), "peer_images_per_s": round(batch / t_peer, 2),
           "ours_vs_torchvision": round(t_peer / t_ours, 3)}
    if mem[0] is not None:
        out.update(limit_peak_gib=mem[0], peer_peak_gib=mem[1])
    return out


def train_option(name: str, option: str, s: dict, device: str) -> dict[str, Any]:
    """``channels_last`` or ``compile`` (torch.compile with ``compile_backend``) against the plain
    limit step at ``option_precision`` and the largest batch, alternately."""
    precision, batch = s["option_precision"], max(s["batches"])
    images, targets = synthetic_batch(batch, MODELS[name][0]["image_size"], device)
    extra = {"channels_last": True} if option == "channels_last" else {"compile_backend": s["compile_backend"]}
    variants = [our_step(name, images, targets, precision, device),
                our_step(name, images, targets, precision, device, **extra)]
    for fn in variants:
        peak_memory(device, fn, s["warmup"])  # compiles here
    plain, other = timed(variants, s["steps"], device)
    return {f"{option}_images_per_s": round(batch / other, 2), f"{option}_vs_plain": round(plain / other, 3),
            f"{option}_plain_images_per_s": round(batch / plain, 2)}


def colour_cost(batch: int, device: str, size: int = 300, repeats: int = 5) -> float:
    """Milliseconds per image of the colour change left to the device (``photometric_device``):
    SSD's photometric distortion with every step drawn, on a ``batch`` of ``size`` images."""
    from ssd.data.transforms import DEFERRED_COLOUR, AugmentConfig, DeviceColour

    colour = DeviceColour(AugmentConfig(photometric_first=False, photometric_p=1.0, photometric_device=True))
    images = torch.rand(batch, 3, size, size, device=device)
    state = torch.get_rng_state().numpy().tobytes()
    targets = [{DEFERRED_COLOUR: state} for _ in range(batch)]
    colour(images, targets)  # warm-up
    return round(timed([lambda: colour(images, targets)], repeats, device)[0] / batch * 1e3, 3)


def tests_summary(junit: str | None) -> dict[str, int] | None:
    """Counts of a pytest JUnit report (None: no report)."""
    if not junit or not Path(junit).is_file():
        return None
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run(models: Sequence[str], precisions: Sequence[str], batches: Sequence[int], steps: int, warmup: int,
        option_precision: str, compile_backend: str, loop: Sequence[Sequence[Any]], loop_colour: Sequence[str],
        loop_steps: int, shards: str,
        num_workers: int, inference_batch: int, latency_repeats: int, time_limit_s: float, compile_limit_s: float,
        device: str, tests_junit: str | None = None, partial: str | None = None,
        dry_run: bool = False) -> dict[str, Any]:
    """The figures of the module docstring, on ``device``. ``partial``: a JSON rewritten before
    each part with the figures so far and the part under way (``running``), so that a check killed
    at its limit still leaves what it measured; removed once the run returns."""
    s = dict(steps=steps, warmup=warmup, batches=list(batches), option_precision=option_precision,
             compile_backend=compile_backend)
    if torch.device(device).type != "cuda":  # fp16 autocast and its scaler are GPU paths
        precisions = [p for p in precisions if p != "fp16"]
    result: dict[str, Any] = {"dry_run": dry_run, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
                              "train": {}, "options": {}, "loop": {}, "inference": {}}

    def save_partial(part: str | None) -> None:
        if partial:
            atomic.write_json(partial, {**result, "running": part or "none", "skipped": ", ".join(budget.skipped),
                                        "failed": "; ".join(budget.failed)})

    budget = Budget(time_limit_s, on_start=save_partial)
    for name in models:
        for precision in precisions:
            for batch in batches:
                part = f"train {name} {precision} bs{batch}"
                figures = budget.run(part, train_pair, name, precision, batch, s, device)
                if figures is not None:
                    result["train"].setdefault(name, {}).setdefault(precision, {})[f"bs{batch}"] = figures
    with tempfile.TemporaryDirectory() as tmp:
        for (name, precision, batch), colour in ((entry, colour) for entry in loop for colour in loop_colour):
            key = f"bs{batch}" + ("_colour_on_device" if colour == "device" else "")
            figures = budget.run(f"loop {name} {precision} {key}", training_loop, name, precision, int(batch),
                                 loop_steps, shards, num_workers, Path(tmp), colour == "device",
                                 needs=0 if dry_run else 40)
            if figures is None:
                continue
            limit = result["train"].get(name, {}).get(precision, {}).get(f"bs{batch}", {}).get("limit_images_per_s")
            if limit:
                figures["vs_limit"] = round(figures["images_per_s"] / limit, 3)
            result["loop"].setdefault(name, {}).setdefault(precision, {})[key] = figures
    for name in models:
        for precision in precisions:
            figures = budget.run(f"inference {name} {precision}", gpu_infer.compare,
                                 name, precision, inference_batch, latency_repeats, device)
            if figures is not None:
                result["inference"].setdefault(name, {})[precision] = figures
    colour = budget.run("colour", colour_cost, max(batches), device)
    if colour is not None:
        result["colour_ms_per_image"] = colour
    for option in ("channels_last", "compile"):  # compile last: it spends minutes compiling
        for name in models:
            limit = None if dry_run or option != "compile" else compile_limit_s
            figures = budget.run(f"{option} {name}", train_option, name, option, s, device, limit=limit,
                                 needs=0 if dry_run else (limit or 30))
            if figures is not None:
                result["options"].setdefault(name, {"precision": option_precision, "batch": max(batches),
                                                    "compile_backend": compile_backend}).update(figures)
    result["headline"] = headline(result)
    result["skipped"] = ", ".join(budget.skipped) or "none"
    result["failed"] = "; ".join(budget.failed) or "none"
    tests = tests_summary(tests_junit)
    if tests is not None:
        result["tests"] = tests
    if partial:
        Path(partial).unlink(missing_ok=True)
    return result


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The issue's targets: SSD300 bf16 bs64 real loop over its limit; ours over torchvision (training
    at the largest batch, inference throughput), per model and precision."""
    out: dict[str, float] = {}
    for name, per in result["loop"].items():
        for precision, per_batch in per.items():
            for bs, f in per_batch.items():
                if "vs_limit" in f:
                    out[f"loop_vs_limit.{name}.{precision}.{bs}"] = f["vs_limit"]
    for name, per in result["train"].items():
        for precision, per_batch in per.items():
            largest = max(per_batch, key=lambda k: int(k[2:]))
            out[f"train_ours_vs_torchvision.{name}.{precision}.{largest}"] = per_batch[largest]["ours_vs_torchvision"]
    for name, per in result["inference"].items():
        for precision, f in per.items():
            if math.isfinite(f.get("throughput_ours_vs_torchvision", math.nan)):
                out[f"inference_ours_vs_torchvision.{name}.{precision}"] = f["throughput_ours_vs_torchvision"]
    return out
