"""The GPU check (scripts/gpu_check.sh, pipeline/bench/gpu.py), run as its dry run on the CPU:
every part runs and lands in the JSON; without CUDA the real check stops with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.bench.device_timing import Budget
from shardgen import write_frame_dataset

ROOT = Path(__file__).resolve().parents[1]


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_dry_run_measures_every_part_and_counts_the_tests(tmp_path):
    shards = write_frame_dataset(tmp_path / "voc", {"train": [6, 6]})
    out = tmp_path / "gpu.json"
    result = script("--dry-run", "--tests", "streaming", "--out", str(out), "--set", f"gpu.shards={shards}",
                    "--set", "gpu.models=[ssdlite_mobilenet_v2]", "--set", "gpu.precisions=[fp32]", "--set", "gpu.option_precision=fp32",
                    "--set", "gpu.compile_backend=eager")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())["gpu"]
    setup = json.loads((tmp_path / "gpu-setup.json").read_text())
    assert figures["dry_run"] is True
    assert figures["tests"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0, "passed": 1}
    train = figures["train"]["ssdlite_mobilenet_v2"]["fp32"]["bs2"]
    assert train["limit_images_per_s"] > 0 and train["peer_images_per_s"] > 0
    assert train["ours_vs_torchvision"] == pytest.approx(train["limit_images_per_s"] / train["peer_images_per_s"], rel=0.02)
    for key in ("bs2", "bs2_colour_on_device"):
        loop = figures["loop"]["ssdlite_mobilenet_v2"]["fp32"][key]
        assert loop["images_per_s"] > 0 and 0 <= loop["data_wait_fraction"] < 1 and loop["vs_limit"] > 0
    assert figures["colour_ms_per_image"] > 0
    inference = figures["inference"]["ssdlite_mobilenet_v2"]["fp32"]
    assert inference["latency_ms_ours"] > 0 and inference["images_per_s_torchvision"] > 0
    options = figures["options"]["ssdlite_mobilenet_v2"]
    assert options["channels_last_vs_plain"] > 0 and options["compile_vs_plain"] > 0
    assert set(figures["headline"]) == {
        "loop_vs_limit.ssdlite_mobilenet_v2.fp32.bs2", "loop_vs_limit.ssdlite_mobilenet_v2.fp32.bs2_colour_on_device",
        "train_ours_vs_torchvision.ssdlite_mobilenet_v2.fp32.bs2",
        "inference_ours_vs_torchvision.ssdlite_mobilenet_v2.fp32"}
    assert setup["gpu"]["skipped"] == "none" and setup["gpu"]["failed"] == "none"
    assert setup["gpu"]["torch"] == torch.__version__
    assert not (ROOT / "reports" / "gpu-check.json").exists()  # --out was honoured


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_the_real_check_without_cuda_is_a_one_line_error(tmp_path):
    result = script("--out", str(tmp_path / "gpu.json"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: torch sees no CUDA device here")
    assert not (tmp_path / "gpu.json").exists()


def test_a_failing_part_is_named_and_the_rest_go_on_and_a_spent_budget_skips():
    budget = Budget(60)

    def out_of_memory(batch: int) -> None:
        raise RuntimeError(f"CUDA out of memory at batch {batch}\n(traceback detail)")

    assert budget.run("train bs64", out_of_memory, 64) is None
    assert budget.run("train bs32", lambda batch: batch * 2, 32) == 64
    assert budget.failed == ["train bs64: RuntimeError: CUDA out of memory at batch 64"]
    assert budget.run("compile", lambda: 1, needs=120) is None  # would end after the limit: not started
    assert budget.skipped == ["compile"]
    spent = Budget(0)
    assert spent.run("loop", lambda: 1) is None
    assert spent.skipped == ["loop"] and not spent.failed


@pytest.mark.parametrize("key, value, message", [
    ("models", "[resnet50]", "benchmark.gpu: unknown model 'resnet50'; known: ssd300_vgg16, ssdlite_mobilenet_v2"),
    ("precisions", "[fp8]", "benchmark.gpu: unknown precision 'fp8'; known: fp32, tf32, bf16, fp16"),
])
def test_an_unknown_model_or_precision_is_a_one_line_error(tmp_path, capsys, key, value, message):
    from pipeline.benchmark import main

    assert main(["--only", "gpu", "--out", str(tmp_path / "g.json"), "--set", f"gpu.{key}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "g.json").exists()


def test_a_part_past_its_own_limit_is_stopped_named_and_the_alarm_cleared():
    """torch.compile ran past 4 minutes on the first H200 run and the script's limit killed the
    whole benchmark: a part with a ``limit`` is stopped alone."""
    budget = Budget(60)
    t0 = time.monotonic()
    assert budget.run("compile ssd300_vgg16", time.sleep, 30, limit=0.2) is None
    assert time.monotonic() - t0 < 10
    assert budget.failed == ["compile ssd300_vgg16: PartTimeout: over its 0.2 s limit"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert budget.run("next", lambda: 3, limit=5) == 3  # a part inside its limit is untouched


def test_the_partial_json_holds_the_figures_so_far_and_names_the_part_under_way(tmp_path, monkeypatch):
    from pipeline.bench import gpu

    partial = tmp_path / "gpu-partial.json"
    seen = []

    def fake_pair(name, precision, batch, s, device):
        seen.append(json.loads(partial.read_text()))
        if precision == "tf32":
            raise RuntimeError("CUDA out of memory")
        return {"limit_images_per_s": 10.0, "peer_images_per_s": 5.0, "ours_vs_torchvision": 2.0}

    monkeypatch.setattr(gpu, "train_pair", fake_pair)
    monkeypatch.setattr(gpu.gpu_infer, "compare", lambda *a: {"throughput_ours_vs_torchvision": 1.5})
    monkeypatch.setattr(gpu, "colour_cost", lambda *a: 1.0)
    monkeypatch.setattr(gpu, "train_option", lambda name, option, s, device: {f"{option}_vs_plain": 1.1})
    result = gpu.run(["ssdlite_mobilenet_v2"], ["fp32", "tf32", "bf16"], [2], 1, 1, "bf16", "inductor", [], [],
                     1, "unused", 1, 2, 2, 60.0, 10.0, "cpu", partial=str(partial), dry_run=True)
    assert [s["running"] for s in seen] == [f"train ssdlite_mobilenet_v2 {p} bs2" for p in ("fp32", "tf32", "bf16")]
    assert seen[0]["train"] == {} and seen[2]["train"]["ssdlite_mobilenet_v2"]["fp32"]["bs2"]["ours_vs_torchvision"] == 2.0
    assert seen[2]["failed"].startswith("train ssdlite_mobilenet_v2 tf32 bs2: RuntimeError: CUDA out of memory")
    assert not partial.exists()  # the run returned: the full JSON is the benchmark's to write
    assert result["options"]["ssdlite_mobilenet_v2"]["compile_vs_plain"] == 1.1
    assert result["options"]["ssdlite_mobilenet_v2"]["channels_last_vs_plain"] == 1.1
