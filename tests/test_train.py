"""The training stage, run as users run it: subprocesses, one process and two (gloo on CPU)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from pipeline.stage import StageError
from procs import free_port, kill_tree, max_difference, weights
from shardgen import write_clip_dataset, write_frame_dataset
from ssd.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

TRAIN = {
    "name": "tiny",
    "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
    "data": {"shards": "shards", "batch_size": 4, "num_workers": 1, "streams": 2, "shuffle_buffer": 8},
    "optim": {"lr": 0.003, "warmup_steps": 2},
    "steps": 14,
    "checkpoint_every": 4,
    "log_every": 2,
    "trace": True,
    "validation": {"every": 4, "num_workers": 0, "batch_size": 8},
    "ema": {"enabled": True, "decay": 0.9},
}


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


LSTM = {
    **TRAIN,
    "model": {"name": "lstm_ssd_mobilenet_v2", "image_size": 48, "width_mult": 0.25},
    "data": {"shards": "clips", "kind": "clips", "batch_size": 2, "num_workers": 1, "streams": 2, "shuffle_buffer": 4},
    "steps": 10,
    "checkpoint_every": 3,
    "freeze_backbone_steps": 2,
    "validation": {"every": 4, "num_workers": 0, "modes": ["video", "per_frame"]},
}


def workdir(tmp_path: Path, base: dict = TRAIN, **overrides) -> Path:
    """A project directory with tiny frame and clip shards and a params.yaml holding ``train``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    frames = tmp_path.parent / "shards-cache"
    if not frames.exists():
        write_frame_dataset(frames, {"train": [9, 7, 5], "val": [6]})
    clips = tmp_path.parent / "clips-cache"
    if not clips.exists():
        write_clip_dataset(clips, {"train": [12, 9, 8], "val": [8]}, clip_length=4)
    (tmp_path / "shards").symlink_to(frames)
    (tmp_path / "clips").symlink_to(clips)
    cfg = json.loads(json.dumps(base))
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": cfg}))
    return tmp_path


def launch(cwd: Path, procs: int, *extra: str) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "pipeline.train", *extra]
    return [*ACCELERATE, "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.train", *extra]


def run_train(cwd: Path, procs: int = 1, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(launch(cwd, procs, *extra), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def trace(cwd: Path, rank: int) -> list[dict]:
    path = cwd / "runs" / "tiny" / f"trace-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted two-process run: the yardstick for the resumed ones."""
    cwd = workdir(tmp_path_factory.mktemp("reference"))
    result = run_train(cwd, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    (cwd / "stderr.txt").write_text(result.stderr)
    return cwd


def test_the_logged_loss_is_the_mean_over_the_processes(reference_run):
    """It was process 0's micro-batch alone: with 8 GPUs, an eighth of the batch."""
    with open(reference_run / "plots" / "train-tiny.csv", newline="") as f:
        logged = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
    own = [{t["step"]: t["loss"] for t in trace(reference_run, rank)} for rank in (0, 1)]
    assert logged and all(own[0][s] != own[1][s] for s in logged)
    for step, loss in logged.items():
        assert loss == pytest.approx((own[0][step] + own[1][step]) / 2, abs=2e-6)
    # The metrics' final_loss (what `dvc metrics diff` compares) is the job's too: it was
    # process 0's mean alone.
    job = [(own[0][s] + own[1][s]) / 2 for s in sorted(own[0])]
    final = json.loads((reference_run / "metrics" / "train-tiny.json").read_text())["final_loss"]
    assert final == pytest.approx(sum(job) / len(job), abs=2e-6)
    assert final != pytest.approx(sum(own[0].values()) / len(own[0]), abs=2e-6)


def test_two_processes_read_different_samples_and_keep_identical_weights(reference_run):
    cwd = reference_run
    r0, r1 = trace(cwd, 0), trace(cwd, 1)
    assert len(r0) == len(r1) == TRAIN["steps"]
    for a, b in zip(r0, r1):
        assert a["checksum"] == b["checksum"], f"weights differ between ranks after step {a['step']}"
    assert all(a["keys"] != b["keys"] for a, b in zip(r0, r1))
    # The first epoch (ceil(21 / (4 x 2)) = 3 steps) is one pass over the 21 samples between them:
    # 24 draws, of which only the 3 that round it up to whole batches come twice.
    first = [k for r in (r0, r1) for t in r[:3] for k in t["keys"]]
    assert len(first) == 24 and len(set(first)) == 21
    assert sorted(p.name for p in (cwd / "models").iterdir()) == ["tiny-best.pt", "tiny.pt"]
    # With ema.enabled the model file holds the average, not the last step's weights (the trace's checksum).
    model, info = load_model_file(cwd / "models/tiny.pt")
    assert info["meta"]["ran"]["ema"] is True
    assert abs(sum(float(p.detach().double().sum()) for p in model.parameters()) - r0[-1]["checksum"]) > 1e-3
    metrics = json.loads((cwd / "metrics" / "train-tiny.json").read_text())
    assert metrics["steps"] == TRAIN["steps"] and metrics["world_size"] == 2
    assert metrics["images_per_s"] > 0 and metrics["final_loss"] > 0
    assert not (cwd / "checkpoints" / "tiny").exists()  # removed once the run finished
    rows = (cwd / "plots" / "train-tiny.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,") and len(rows) == 1 + TRAIN["steps"] // TRAIN["log_every"]


def logged_steps(cwd: Path, table: str = "train") -> list[int]:
    """The steps of the plots CSV's rows, in file order."""
    with open(cwd / "plots" / f"{table}-tiny.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def tensorboard_steps(cwd: Path, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` in every TensorBoard event file of the run, sorted (repeats kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in (cwd / "runs" / "tiny").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


def expected_rows(steps: int, every: int) -> list[int]:
    return [s for s in range(1, steps + 1) if s % every == 0 or s == steps]


def stop_and_resume(cwd: Path, reference: Path, steps: int) -> None:
    """SIGTERM a 2-process run at a random step; rerun; compare with the uninterrupted ``reference``."""
    stop_after = random.Random().randint(2, steps - 3)
    proc = subprocess.Popen(launch(cwd, 2), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while len(trace(cwd, 0)) < stop_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid, signal.SIGTERM)  # what a spot instance's shutdown does to every process
    output, _ = proc.communicate(timeout=120)
    stopped = len(trace(cwd, 0))
    assert stopped < steps, "the run finished before it could be stopped"
    assert "stopped at step" in output, output[-3000:]
    assert (cwd / "checkpoints" / "tiny" / f"step-{stopped:08d}" / "meta.json").is_file()
    assert not (cwd / "models" / "tiny.pt").exists()

    shutil.rmtree(cwd / "plots")  # what `dvc repro` does to a stage's outputs before it reruns it
    resumed = run_train(cwd, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoints/tiny/step-{stopped:08d}" in resumed.stderr
    # Every logged step once, in the plots CSV (rebuilt from the checkpoint) and in TensorBoard.
    every = yaml.safe_load((cwd / "params.yaml").read_text())["train"]["log_every"]
    assert logged_steps(cwd) == expected_rows(steps, every)
    assert tensorboard_steps(cwd) == expected_rows(steps, every)
    # The EMA (the model file's weights) and the best model travel in the checkpoints.
    assert max_difference(weights(cwd / "models/tiny.pt"), weights(reference / "models/tiny.pt")) < 1e-5
    assert max_difference(weights(cwd / "models/tiny-best.pt"), weights(reference / "models/tiny-best.pt")) < 1e-5
    validated = expected_rows(steps, 4)
    assert logged_steps(cwd, "val") == tensorboard_steps(cwd, "val/map") == validated
    ran = json.loads((cwd / "metrics" / "train-tiny.json").read_text())["val"]
    ref = json.loads((reference / "metrics" / "train-tiny.json").read_text())["val"]
    assert ran["best_step"] == ref["best_step"]
    assert {k: pytest.approx(v, abs=1e-4) for k, v in ran.items() if k.startswith(("map", "best_map"))} == {
        k: v for k, v in ref.items() if k.startswith(("map", "best_map"))}
    # no batch replayed or skipped: the resumed trace continues the reference's keys
    ref = trace(reference, 1)
    assert [t["keys"] for t in trace(cwd, 1)] == [t["keys"] for t in ref[:stopped]] + [t["keys"] for t in ref[stopped:]]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(reference_run, tmp_path):
    stop_and_resume(workdir(tmp_path), reference_run, TRAIN["steps"])


def test_lstm_ssd_trains_on_clips_in_two_processes_and_resumes_after_sigterm(tmp_path):
    reference = workdir(tmp_path / "reference", LSTM)
    result = run_train(reference, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = trace(reference, 0), trace(reference, 1)
    assert len(r0) == len(r1) == LSTM["steps"] and all(a["checksum"] == b["checksum"] for a, b in zip(r0, r1))
    assert all(k.startswith(("trainvid", "train")) for k in r0[0]["keys"])
    model, info = load_model_file(reference / "models/tiny.pt")
    assert info["arch"]["name"] == "lstm_ssd_mobilenet_v2" and model.is_temporal
    stop_and_resume(workdir(tmp_path / "interrupted", LSTM), reference, LSTM["steps"])


def test_lstm_ssd_carries_its_state_from_clip_to_clip_and_through_a_resume(tmp_path):
    # Train videos of 12, 9 and 8 frames: runs of 3, 2 and 2 clips of 4 frames.
    cwd = workdir(tmp_path, LSTM, **{"data.sequence_clips": 3, "steps": 6, "trace": False, "keep_checkpoints": True})
    result = run_train(cwd, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((cwd / "metrics" / "train-tiny.json").read_text())
    # 7 clips, batch 2, 2 streams: each stream makes 2 batches an epoch (4 steps), and runs end with
    # the epoch, so each batch position carries at most one clip an epoch: at most 4 in the first
    # epoch, none in the 2 steps of the second. A run cut where a stream's slice of the data
    # begins or ends carries none.
    assert 2 <= summary["carried_clips"] <= 4
    # Rerun from the kept checkpoint of step 3: the states waiting there were dropped, so the
    # resumed clips started from zeros and the run ended elsewhere (0.7 apart).
    uninterrupted = weights(cwd / "models" / "tiny.pt")
    result = run_train(cwd, 1)
    assert result.returncode == 0 and "resumed from checkpoints/tiny/step-00000003" in result.stderr
    assert max_difference(uninterrupted, weights(cwd / "models" / "tiny.pt")) == 0.0
    assert json.loads((cwd / "metrics" / "train-tiny.json").read_text())["carried_clips"] == summary["carried_clips"]


def test_clips_carried_count_every_process_and_a_job_that_could_carry_none_is_refused(tmp_path):
    """carried_clips was process 0's count alone; and with 2 processes and batch 2 (one batch per
    loader stream an epoch) sequence mode carried nothing and exited 0."""
    lstm = {**LSTM, "data": {**LSTM["data"], "batch_size": 1}, "freeze_backbone_steps": 0,
            "validation": {"every": 0}}
    cwd = workdir(tmp_path / "carry", lstm, **{"data.sequence_clips": 3, "steps": 8})
    result = run_train(cwd, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [sum(t["carried"] for t in trace(cwd, rank)) for rank in (0, 1)]
    assert all(n > 0 for n in per_rank)
    assert json.loads((cwd / "metrics" / "train-tiny.json").read_text())["carried_clips"] == sum(per_rank)
    assert "2 process(es) x 1 accumulated = 2 samples per optimiser step" in result.stderr

    cwd = workdir(tmp_path / "none", LSTM, **{"data.sequence_clips": 3, "validation.every": 0})
    result = subprocess.run([sys.executable, "-m", "pipeline.supervise", *launch(cwd, 2)], cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: data.sequence_clips 3: no clip would start from a carried state" in result.stderr


def test_an_accumulation_count_from_accelerate_s_environment_is_refused(tmp_path):
    """Accelerate divides every loss by ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which the loop never
    uses: the run trained on with gradients a quarter of their size."""
    cwd = workdir(tmp_path, **{"steps": 2, "validation.every": 0})
    result = subprocess.run(launch(cwd, 1), cwd=cwd, env={**env(), "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 would scale every gradient down; unset it and use "
        "optim.grad_accum")
    assert not (cwd / "models" / "tiny.pt").exists()


def test_sigkill_resumes_from_last_periodic_checkpoint_ignoring_half_written(reference_run, tmp_path):
    cwd = workdir(tmp_path)
    kill_after = random.Random().randint(TRAIN["checkpoint_every"] + 1, TRAIN["steps"] - 2)
    proc = subprocess.Popen(launch(cwd, 2), cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while len(trace(cwd, 0)) < kill_after and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = cwd / "checkpoints" / "tiny"
    complete = sorted(d.name for d in ckpts.iterdir() if (d / "meta.json").exists())
    assert complete, "no periodic checkpoint before the kill"
    # A checkpoint caught mid-write: files but no meta.json, under both possible names.
    last = int(complete[-1].split("-")[1])
    for name in (f".tmp-step-{last + 1:08d}", f"step-{last + 2:08d}"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.safetensors").write_bytes(b"half")

    resumed = run_train(cwd, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoints/tiny/{complete[-1]}" in resumed.stderr, resumed.stderr[-1500:]
    # Rows logged after the last checkpoint and before the kill are logged again, and kept once.
    assert logged_steps(cwd) == tensorboard_steps(cwd) == expected_rows(TRAIN["steps"], TRAIN["log_every"])
    assert max_difference(weights(cwd / "models/tiny.pt"), weights(reference_run / "models/tiny.pt")) < 1e-5


def test_tensorboard_has_loss_and_learning_rate(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in (reference_run / "runs" / "tiny").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
    for tag in ("train/loss", "train/lr", "train/box_loss", "train/class_loss", "train/grad_norm", "train/images_per_s"):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["train/loss"]) == TRAIN["steps"] // TRAIN["log_every"]
    assert all(v > 0 for v in scalars["train/lr"])
    assert (reference_run / "runs" / "tiny" / "config.yaml").is_file()


def one_process_map(cwd: Path, model: str, **extra) -> float:
    """VOC07 mAP of the evaluate stage run in one process on the validation split."""
    section = {"model": model, "shards": "shards", "split": "val", "name": "check", "examples": 0, "num_workers": 0, **extra}
    (cwd / "eval.yaml").write_text(yaml.safe_dump({"evaluate": section}))
    result = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--params", "eval.yaml"], cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "metrics" / "eval-check.json").read_text())["voc07"]["map"]


def test_validation_in_two_processes_equals_a_one_process_evaluation_and_keeps_the_best(reference_run):
    cwd = reference_run
    with open(cwd / "plots" / "val-tiny.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 14] == tensorboard_steps(cwd, "val/map")
    val = json.loads((cwd / "metrics" / "train-tiny.json").read_text())["val"]
    assert val["map"] == rows[-1]["map"]
    best = max(rows, key=lambda r: r["map"])
    assert (val["best_map"], val["best_step"]) == (best["map"], int(best["step"]))
    # The figure the 2-process run gathered is the one-process evaluate stage's, for the last model
    # and for the best one (the model file of the best step, its meta saying which).
    assert one_process_map(cwd, "models/tiny.pt") == pytest.approx(val["map"], abs=1e-6)
    assert one_process_map(cwd, "models/tiny-best.pt") == pytest.approx(val["best_map"], abs=1e-6)
    _, info = load_model_file(cwd / "models/tiny-best.pt")
    assert info["meta"]["best"] == {"step": val["best_step"], "map": val["best_map"]}


def test_validations_that_are_all_undefined_stop_with_a_readable_line(tmp_path, monkeypatch, capsys, caplog):
    """A validation split without objects has no mAP (NaN): the early stop's line formatted the
    missing best with %.4f, and logging printed its own error and traceback instead."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict
    from pipeline.training.validation import Validator

    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(Validator, "evaluate", lambda self, model, accelerator: {"map": float("nan")})
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "trace": False, "data": {**TRAIN["data"], "num_workers": 0},
                                            "validation": {"every": 2, "patience": 2, "num_workers": 0}})
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.train"):
            assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert "step 4: no better validation mAP in 2 validations: stopping early (best none: every mAP was undefined)" \
        in caplog.text


def test_a_log_file_gets_plain_progress_lines_not_a_bar(reference_run):
    stderr = (reference_run / "stderr.txt").read_text()
    assert "\r" not in stderr
    lines = [line for line in stderr.splitlines() if "tiny step " in line]
    assert len(lines) == TRAIN["steps"] // TRAIN["log_every"]
    assert " tiny step 14/14 loss " in lines[-1] and "images/s ETA " in lines[-1] and "(box " in lines[0]
    assert "step 8: validation VOC07 mAP " in stderr


def test_no_better_validation_for_patience_validations_stops_early(tmp_path, monkeypatch):
    """In-process, with a validation that never improves: the run stops after the patience, exit 0,
    its outputs those of the step it stopped at."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict
    from pipeline.training.validation import Validator

    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(Validator, "evaluate", lambda self, model, accelerator: {"map": 0.25})
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "trace": False, "data": {**TRAIN["data"], "num_workers": 0},
                                            "log_every": 4,
                                            "validation": {"every": 2, "patience": 2, "num_workers": 0}})
    try:
        assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    summary = json.loads((cwd / "metrics" / "train-tiny.json").read_text())
    assert summary["steps"] == 6  # best at step 2, no better at 4 and 6
    assert logged_steps(cwd, "train") == [4, 6]  # the curves end at the stop, not at the last log_every row
    assert summary["val"] == {"map": 0.25, "best_map": 0.25, "best_step": 2, "seconds": summary["val"]["seconds"]}
    assert logged_steps(cwd, "val") == [2, 4, 6]
    assert load_model_file(cwd / "models/tiny-best.pt")[1]["meta"]["best"]["step"] == 2


def test_images_per_s_counts_training_time_only(tmp_path, monkeypatch):
    """The column counted the validations' and checkpoints' time (rows of 3.7 between rows of 46),
    while the metrics' figure didn't. A fake clock jumps 1,000 s in every validation here."""
    from types import SimpleNamespace

    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    import pipeline.training.loop as loop_mod
    from pipeline.config import from_dict
    from pipeline.training.validation import Validator

    jump = [0.0]  # the loop's clock: still, except 1,000 s per validation (no real time in the figures)
    monkeypatch.setattr(loop_mod, "time", SimpleNamespace(perf_counter=lambda: jump[0]))

    def slow(self, model, accelerator):
        jump[0] += 1000.0
        return {"map": 0.25}

    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(Validator, "evaluate", slow)
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "steps": 6, "trace": False, "log_every": 3,
                                            "data": {**TRAIN["data"], "num_workers": 0},
                                            "validation": {"every": 2, "num_workers": 0}})
    try:
        assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    with open(cwd / "plots" / "train-tiny.csv", newline="") as f:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(f)]
    assert len(rates) == 2 and min(rates) > 0.1  # 12 images over the 1,000 s would be 0.012


def test_warmup_longer_than_the_run_is_named(tmp_path, monkeypatch, caplog):
    from pipeline.config import from_dict
    from pipeline.training.setup import check_data
    import pipeline.train as train_mod

    monkeypatch.chdir(workdir(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        check_data(from_dict(train_mod.TrainConfig, {**TRAIN, "steps": 2, "optim": {"warmup_steps": 10}}))
    assert "optim.warmup_steps 10 is more than steps 2: the learning rate stops at" in caplog.text


def test_a_frames_from_clips_epoch_is_every_frame_slot(tmp_path, monkeypatch):
    """The epoch was sized by the manifest's distinct frames while the loader draws every clip's
    frames: with overlapping clips an epoch ended short of a pass."""
    from pipeline.config import from_dict
    from pipeline.training.setup import check_data
    import pipeline.train as train_mod

    cwd = workdir(tmp_path)
    manifest = json.loads((cwd / "clips" / "manifest.json").read_text())
    overlapping = tmp_path / "overlapping"
    shutil.copytree(cwd / "clips", overlapping)
    manifest["splits"]["train"].update(frames=100, frame_slots=116)  # 16 frames in two clips each
    (overlapping / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(cwd)
    data = {**TRAIN["data"], "shards": str(overlapping), "kind": "frames_from_clips"}
    assert check_data(from_dict(train_mod.TrainConfig, {**TRAIN, "data": data}))[2] == 116
    del manifest["splits"]["train"]["frame_slots"]  # a manifest from before frame_slots
    (overlapping / "manifest.json").write_text(json.dumps(manifest))
    assert check_data(from_dict(train_mod.TrainConfig, {**TRAIN, "data": data}))[2] == 100


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.momentun=0.9"], "train.optim.momentun: unknown key; valid keys are:"),
        (["steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["data.shards=nowhere"], "nowhere/manifest.json: no manifest"),
        (["data.sequence_clips=4"], "it needs kind 'clips', not 'frames'"),
        # checkpoints/.. (the project) was removed when the run finished; ../../x wrote outside it
        (["name=..", "steps=2", "checkpoint_every=1"], "train: name '..' is not a valid run name"),
        (["name=../../escape"], "train: name '../../escape' is not a valid run name"),
        (["name=''"], "train.name: must not be empty"),
        (["ema.decay=1.0"], "train.ema.decay: must be less than 1, got 1.0"),
        (["validation.split=test"], "shards/manifest.json: no split 'test' (splits: train, val)"),
        (["validation.modes=[video]"], "mode 'video' needs clip shards, these are frames"),
        # A prefix that names no parameter changed no learning rate, silently.
        (["optim.lr_factors={temporl: 10}"], "optim.lr_factors: 'temporl' names no trainable parameter"),
        (["compile=inductr"], "compile: unknown torch.compile backend 'inductr'"),
        # Keys the run would have ignored without a word.
        # One image per batch was a ValueError traceback from batch norm on the 1x1 map.
        (["data.batch_size=1"], "data.batch_size 1: batch norm in training needs more than one image per batch"),
        (["model.from_file=models/a.pt", "model.init_weights=models/b.pt"],
         "train.model: from_file loads the whole model; init_weights would be ignored"),
        (["model.init_weights=models/b.pt", "model.backbone_weights=w.pth"],
         "train.model: init_weights loads the backbone too, over backbone_weights: give one"),
        (["validation.every=0", "validation.patience=3"], "train.validation: patience 3 needs validations (every > 0)"),
        # ... and keys the chosen architecture does not read.
        (["model.residual=true"], "train.model.residual: only LSTM-SSD models read it (model.name is "
                                  "ssdlite_mobilenet_v2); remove it"),
        (["model.name=ssd300_vgg16", "model.width_mult=0.5"], "train.model.width_mult: only MobileNet models read it"),
        (["model.reduced_tail=false"], "train.model.reduced_tail: only MobileNetV3 models read it"),
        (["model.name=ssdlite_mobilenet_v3_large", "model.taps=[6, 13]"], "train.model.taps: only MobileNetV2 models"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, overrides, message, stage_main):
    code, stderr = stage_main("train", *sum((["--set", o] for o in overrides), []), cwd=workdir(tmp_path))
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in stderr
    assert "Traceback" not in stderr


def test_from_file_refuses_model_keys_that_disagree_with_the_file(tmp_path, stage_main):
    """The run trained the file's 64 px model while its records said 96 px, and exited 0."""
    cwd = workdir(tmp_path)
    init_file(cwd / "start.pt", seed=0)  # an SSDLite at 64 px, width 0.25: what TRAIN's model keys say
    code, stderr = stage_main("train", "--set", "model.from_file=start.pt", "--set", "model.image_size=96", cwd=cwd)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "error: model.image_size: 96 here, but start.pt holds a model with image_size 64 (from_file takes the "
        "file's architecture: give the file's value or leave the key out)")
    code, stderr = stage_main("train", "--set", "model.from_file=start.pt", "--set", "steps=1", "--set", "trace=false",
                              "--set", "validation.every=0", cwd=cwd)
    assert code == 0, stderr[-2000:]


def test_from_file_refuses_a_key_the_file_s_arch_does_not_record():
    """residual: true beside a non-residual LSTM-SSD file trained the file's model under the key
    (the file records residual only when true); width_mult beside a VGG file likewise."""
    from pipeline.train_config import ModelConfig
    from pipeline.training.setup import _check_file_arch
    from ssd.models import lstm_ssd_mobilenet_v2

    lstm = lstm_ssd_mobilenet_v2(3, width_mult=0.25, image_size=64)
    info = {"class_names": ["a", "b"], "arch": lstm.arch}
    assert "residual" not in lstm.arch
    cfg = ModelConfig(name="lstm_ssd_mobilenet_v2", width_mult=0.25, image_size=64, from_file="lstm.pt", residual=True)
    with pytest.raises(StageError, match=r"^model\.residual: True here, but lstm\.pt holds a model with residual "
                                         r"none \(its default\)"):
        _check_file_arch(cfg, info)
    _check_file_arch(ModelConfig(name="lstm_ssd_mobilenet_v2", from_file="lstm.pt"), info)  # keys left out: fine
    vgg = {"class_names": ["a", "b"], "arch": {"name": "ssd300_vgg16", "num_classes": 3, "image_size": 300}}
    with pytest.raises(StageError, match=r"^model\.width_mult: 0\.5 here"):
        _check_file_arch(ModelConfig(from_file="vgg.pt", width_mult=0.5), vgg)


CRASH_AT_STEP_3 = """
import sys
import pipeline.training.loop as loop
original = loop.step
def step(r, stream, stop):
    if r.step == 2:
        raise RuntimeError("injected failure at step 3")
    return original(r, stream, stop)
loop.step = step
from pipeline.train import main
sys.exit(main([]))
"""


def test_an_unexpected_error_with_loader_workers_exits_instead_of_hanging(tmp_path):
    """The workers are started with SIGTERM blocked (a preemption must not kill them mid-epoch);
    after an uncaught error the stream was never closed, and at exit multiprocessing's terminate()
    could not reach them: a CUDA out-of-memory error hung the job until it was killed."""
    cwd = workdir(tmp_path, **{"data.num_workers": 1, "validation.every": 0, "trace": False})
    result = subprocess.run([sys.executable, "-c", CRASH_AT_STEP_3], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "RuntimeError: injected failure at step 3" in result.stderr


EVIL = """
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


@pytest.mark.parametrize("name, error", [
    # Accelerate unpickles registered objects with weights_only=False; none is registered (the
    # scheduler's state is JSON in meta.json), so a planted one is refused, never read.
    ("custom_checkpoint_0.pkl", "RuntimeError: Number of custom checkpoints in folder"),
    # Every file Accelerate does read is loaded with weights_only=True.
    ("optimizer.bin", "UnpicklingError: "),
])
def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(kept_checkpoints, tmp_path, name, error):
    """Checkpoints may come from a shared bucket: a replaced pickle in one must not run."""
    import pickle
    import types

    marker = tmp_path / "pwned"
    module = types.ModuleType("evil")
    exec(EVIL.format(marker=marker), module.__dict__)
    cwd = copy_project(kept_checkpoints, tmp_path / "project")
    checkpoint = cwd / "checkpoints" / "tiny" / "step-00000004"
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
    (checkpoint / name).write_bytes(pickle.dumps(module.Payload()))
    result = run_train(cwd, 1, timeout=120)
    assert not marker.exists(), "a pickle in the checkpoint ran its payload"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoints/tiny/step-00000004: the checkpoint can't be loaded ({error}")


SIGNAL_IN_SAVE = """
import os, signal, sys
import pipeline.train as train
import pipeline.training.outputs as outputs
original = outputs.save_model_file
def save_model_file(*args, **kw):
    os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives while the model is written
    return original(*args, **kw)
outputs.save_model_file = save_model_file
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_while_the_model_is_written_finishes_it_keeps_a_checkpoint_and_exits_75(tmp_path):
    cwd = workdir(tmp_path, steps=6, checkpoint_every=4, trace=False)
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_SAVE], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 75, result.stderr[-3000:]
    model = cwd / "models" / "tiny.pt"
    written = weights(model)  # complete and loadable
    assert json.loads((cwd / "metrics" / "train-tiny.json").read_text())["steps"] == 6
    assert (cwd / "checkpoints" / "tiny" / "step-00000006").is_dir()  # the finished state, kept
    again = run_train(cwd, 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 6" in again.stderr  # resumed at the end: no step trained twice
    assert max_difference(weights(model), written) == 0
    assert not (cwd / "checkpoints" / "tiny").exists()


def test_a_bad_sample_read_in_a_loader_worker_stops_the_run_and_the_process_exits(tmp_path):
    """The loader's workers ignore SIGTERM (so a preemption can't kill one mid-step): the run
    used to print its error and then wait forever for them at exit."""
    cwd = workdir(tmp_path, **{"data.num_workers": 2, "trace": False})
    local = tmp_path / "own-shards"
    shutil.copytree(cwd / "shards", local)
    with tarfile.open(local / "train-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(local / "train-000000.tar", "w") as tar:
        for info, data in members:
            data = b"\xff\xd8\xff" + bytes(200) if info.name.endswith(".jpg") else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (cwd / "shards").unlink()
    (cwd / "shards").symlink_to(local)
    result = run_train(cwd, 1, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: shards/train-000000.tar: sample '")


def test_a_bad_sample_read_by_one_of_two_processes_is_exit_2_under_the_supervisor(tmp_path):
    """Process 1 stopped with its one line (exit 2); process 0 then failed in the next all-reduce
    (gloo: connection closed by peer) with a traceback, and the supervised job exited 1, "a bug"."""
    cwd = workdir(tmp_path, **{"steps": 30, "validation.every": 0, "trace": False})
    local = tmp_path / "own-shards"
    shutil.copytree(cwd / "shards", local)
    with tarfile.open(local / "train-000002.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last = max(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg"))
    with tarfile.open(local / "train-000002.tar", "w") as tar:
        for i, (info, data) in enumerate(members):
            data = b"\xff\xd8\xff" + bytes(200) if i == last else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (cwd / "shards").unlink()
    (cwd / "shards").symlink_to(local)
    result = subprocess.run([sys.executable, "-m", "pipeline.supervise", *launch(cwd, 2)], cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: shards/train-000002.tar: sample '" in result.stderr
    # The other process says in one line why it stopped, instead of a traceback burying the cause.
    assert "error: stopped because the job's other processes can't be reached" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (cwd / "models" / "tiny.pt").exists()


def test_a_checkpoints_folder_that_holds_other_things_is_refused(tmp_path):
    """The run deletes its checkpoints folder when it ends: `checkpoints_dir: runs` deleted the
    run's TensorBoard logs, and a name matching a folder of the user's deleted that, exit 0."""
    cwd = workdir(tmp_path, **{"steps": 2, "validation.every": 0, "trace": False})
    result = run_train(cwd, 1, "--set", "checkpoints_dir=runs", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: checkpoints_dir: runs/tiny holds the run's logs (runs_dir) (runs/tiny); writing the output there "
        "would delete it: choose another folder")
    mine = cwd / "photos" / "tiny"
    mine.mkdir(parents=True)
    (mine / "holiday.jpg").write_bytes(b"mine")
    result = run_train(cwd, 1, "--set", "checkpoints_dir=photos", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: checkpoints_dir: photos/tiny exists and is not a folder of this run's checkpoints" in result.stderr
    assert (mine / "holiday.jpg").read_bytes() == b"mine" and not (cwd / "models" / "tiny.pt").exists()


def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(tmp_path):
    """Two runs of one name started seconds apart both resumed from the same checkpoint, and the
    plots held 64 rows for 40 steps; both exited 0."""
    cwd = workdir(tmp_path, **{"steps": 400, "validation.every": 0, "trace": False, "log_every": 1})
    first = subprocess.Popen(launch(cwd, 1), cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        lock = cwd / "checkpoints" / "tiny.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and "pid" in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        result = run_train(cwd, 1, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: another run of tiny holds checkpoints/tiny.lock (pid {first.pid} on {socket.gethostname()}); "
            "wait for it to end, or stop it")
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.wait()
    result = run_train(cwd, 1, "--set", "steps=2", "--restart", timeout=120)  # the lock went with its process
    assert "another run" not in result.stderr, result.stderr[-2000:]


def test_the_run_lock_goes_with_the_run_not_with_its_forked_workers(tmp_path):
    """Loader workers are forked and kept the lock's file open: after a SIGKILL of the training
    process its workers held the name about 5 s more, and a quick restart was refused."""
    from pipeline.checkpoints import hold_run_lock

    lock = hold_run_lock(tmp_path / "tiny")
    started, tell = os.pipe()
    worker = os.fork()
    if worker == 0:  # a loader worker, alive after its parent is gone
        os.write(tell, b"x")
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"x"
        lock.close()  # what the kernel does for the killed process
        hold_run_lock(tmp_path / "tiny").close()
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        os.close(started)
        os.close(tell)


def test_a_run_lock_dropped_without_close_is_released():
    """The lock's file object used to close itself when collected; the raw descriptor didn't, and
    a train() whose clean-up raised before closing it kept the name locked in that process."""
    import gc
    import tempfile

    from pipeline.checkpoints import hold_run_lock

    with tempfile.TemporaryDirectory() as tmp:
        lock = hold_run_lock(Path(tmp) / "tiny")
        del lock
        gc.collect()
        hold_run_lock(Path(tmp) / "tiny").close()


def test_a_refused_set_up_leaves_the_name_unlocked(tmp_path, monkeypatch, capsys):
    """The lock is taken early in the set-up; a refusal after it (here a temporal model on frame
    shards) kept it while the traceback lived: in a notebook, the next try was refused as a
    second run of the name, by the same process."""
    from pipeline.config import load_config, load_params
    from pipeline.stage import StageError
    from pipeline.train_config import TrainConfig
    from pipeline.training.setup import setup

    cwd = workdir(tmp_path, **{"model.name": "lstm_ssd_mobilenet_v2", "validation.every": 0})
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("ACCELERATE_CONFIG_FILE", raising=False)
    cfg = load_config(TrainConfig, load_params("params.yaml"), "train", [])
    with pytest.raises(StageError, match="a temporal model") as first:
        setup(cfg, restart=False)
    with pytest.raises(StageError, match="a temporal model"):  # `first` keeps the traceback alive
        setup(cfg, restart=False)
    assert first.value is not None


def test_missing_shard_is_a_one_line_error(tmp_path):
    cwd = workdir(tmp_path)
    local = tmp_path / "own-shards"
    shutil.copytree(cwd / "shards", local)
    (local / "train-000001.tar").unlink()
    result = run_train(cwd, 1, "--set", f"data.shards={local}", timeout=60)
    assert result.returncode == 2 and "train-000001.tar: shard listed in" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def kept_checkpoints(tmp_path_factory) -> Path:
    """A finished 1-process run that kept its checkpoints (steps 2 and 4 of 6): rerunning resumes at 4.

    It starts from an init-weights file of its own, so that the refusals can cover its contents.
    """
    cwd = workdir(tmp_path_factory.mktemp("kept"), steps=6, checkpoint_every=2, keep_checkpoints=True,
                  **{"model.init_weights": "init.pt"})
    init_file(cwd / "init.pt", seed=0)
    result = run_train(cwd, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def init_file(path: Path, seed: int) -> None:
    from shardgen import CLASSES
    from ssd.model_file import save_model_file
    from ssd.models import ssdlite_mobilenet_v2

    torch.manual_seed(seed)
    save_model_file(path, ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64), CLASSES)


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# What a user changes when rerunning an interrupted run: each changes the trajectory.
TRAJECTORY_KEYS = [
    (["optim.lr=0.5"], "optim.lr: 0.003 in the checkpoint, 0.5 now"),
    (["seed=3"], "seed: 0 in the checkpoint, 3 now"),
    (["loss.neg_pos_ratio=5"], "loss.neg_pos_ratio: 3.0 in the checkpoint, 5.0 now"),
    (["data.augment.flip_p=0"], "data.augment.flip_p: 0.5 in the checkpoint, 0.0 now"),
    (["data.batch_size=2", "optim.grad_accum=2"], "data.batch_size: 4 in the checkpoint, 2 now; optim.grad_accum: 1"),
    (["mixed_precision=bf16"], "mixed_precision: 'no' in the checkpoint, 'bf16' now"),
    (["model.image_size=96"], "model.image_size: 64 in the checkpoint, 96 now"),
]


@pytest.mark.parametrize("overrides, message", TRAJECTORY_KEYS, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_resuming_with_a_changed_training_key_is_refused(kept_checkpoints, overrides, message, stage_main):
    code, stderr = stage_main("train", *sum((["--set", o] for o in overrides), []), cwd=kept_checkpoints)
    assert code == 2, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoints/tiny/step-00000004: the checkpoint was trained with other settings")
    assert message in line and "--restart" in line and "Traceback" not in stderr


def test_resuming_with_changed_data_or_init_weights_is_refused(kept_checkpoints, tmp_path):
    cwd = copy_project(kept_checkpoints, tmp_path / "data")
    shards = tmp_path / "own-shards"
    shutil.copytree(cwd / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][:2]  # a re-prepared dataset
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = run_train(cwd, 1, "--set", f"data.shards={shards}", timeout=120)
    assert result.returncode == 2 and "contents.data.shards: file " in result.stderr, result.stderr[-2000:]

    # Re-prepared with other pixels (another JPEG quality, say): the same manifest, other shards.
    rewritten = tmp_path / "rewritten-shards"
    shutil.copytree(cwd / "shards", rewritten)
    with open(sorted(rewritten.glob("*.tar"))[0], "ab") as f:
        f.write(bytes(1024))  # two more zero blocks: still a valid tar, another size
    result = run_train(cwd, 1, "--set", f"data.shards={rewritten}", timeout=120)
    assert result.returncode == 2 and "contents.data.shard_sizes: " in result.stderr, result.stderr[-2000:]

    moved = tmp_path / "same-shards"
    shutil.copytree(cwd / "shards", moved)  # the same data elsewhere: not a change
    init_file(cwd / "init.pt", seed=1)  # the file the run started from, retrained since
    result = run_train(cwd, 1, "--set", f"data.shards={moved}", timeout=120)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "contents.model.init_weights: file " in line, result.stderr[-2000:]
    assert "data.shards" not in line

    restarted = run_train(cwd, 1, "--restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "--restart: discarding checkpoints/tiny" in restarted.stderr and "resumed from" not in restarted.stderr


def test_resume_safe_keys_may_change(kept_checkpoints, tmp_path):
    cwd = copy_project(kept_checkpoints, tmp_path / "safe")
    result = run_train(cwd, 1, "--set", "steps=9", "--set", "log_every=3", "--set", "checkpoint_every=4",
                       "--set", "data.num_workers=2", "--set", "keep_checkpoints=false", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from checkpoints/tiny/step-00000004" in result.stderr
    assert json.loads((cwd / "metrics" / "train-tiny.json").read_text())["steps"] == 9
    assert not (cwd / "checkpoints" / "tiny").exists()
    # The rows before the checkpoint were logged every 2 steps, those after it every 3.
    assert logged_steps(cwd) == [2, 4, 6, 9]


def test_a_stop_while_the_run_starts_saves_at_the_first_step_and_exits_75(tmp_path):
    """A spot notice during the set-up (loading, forking the loader) killed the process outright:
    exit 143 alone, and exit 1 with tracebacks under a launcher. It now waits for the first step."""
    cwd = workdir(tmp_path, trace=False)
    script = (
        "import os, signal, sys\n"
        "import pipeline.train as t\n"
        "real = t.setup\n"
        "def setup(*a, **k):\n"
        "    r = real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return r\n"
        "t.setup = setup\n"
        "sys.exit(t.main([]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env(), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 75, result.stderr[-3000:]
    assert "stopped at step 1; rerun the same command to resume" in result.stderr
    assert (cwd / "checkpoints" / "tiny" / "step-00000001" / "meta.json").is_file()


def test_a_checkpoint_past_the_new_step_count_is_refused(kept_checkpoints):
    result = run_train(kept_checkpoints, 1, "--set", "steps=3", timeout=120)
    assert result.returncode == 2
    assert "steps: the checkpoint is at step 4, past steps 3" in result.stderr.strip().splitlines()[-1]


def poison_loss(monkeypatch, poisoned: Callable[[int], bool]) -> None:
    """Make the loss NaN on the calls (counted from 1) that ``poisoned`` picks."""
    from ssd.loss import MultiBoxLoss

    calls = {"n": 0}
    real = MultiBoxLoss.forward

    def forward(self, *args):
        out = real(self, *args)
        calls["n"] += 1
        if poisoned(calls["n"]):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MultiBoxLoss, "forward", forward)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """In-process, with the loss poisoned from the third step on."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict

    cwd = workdir(tmp_path, max_nonfinite=2)
    monkeypatch.chdir(cwd)
    poison_loss(monkeypatch, lambda n: n > 2)
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "max_nonfinite": 2, "data": {**TRAIN["data"], "num_workers": 0}})
    try:
        with pytest.raises(train_mod.StageError, match=r"step 5: loss not finite for 3 consecutive steps; last sample keys: train_"):
            train_mod.train(cfg)
    finally:
        reset_accelerate()


def test_a_skipped_step_is_logged_as_nan_not_as_a_loss_of_zero(tmp_path, monkeypatch):
    """Its row read loss 0.0: a false dip to zero in the plots."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict

    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    poison_loss(monkeypatch, lambda n: n == 3)
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "steps": 4, "log_every": 1, "trace": False, "ema": {},
                                            "data": {**TRAIN["data"], "num_workers": 0}, "validation": {}})
    try:
        assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    with open(cwd / "plots" / "train-tiny.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert math.isnan(float(rows[3]["loss"])) and math.isnan(float(rows[3]["class_loss"]))
    assert all(math.isfinite(float(rows[s]["loss"])) and float(rows[s]["loss"]) > 0 for s in (1, 2, 4))


def test_a_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(tmp_path):
    """`steps` may change on a resume; the first resumed step used the old total's learning rate."""
    from ssd.optim import OptimConfig, lr_factor

    cwd = workdir(tmp_path, steps=4, checkpoint_every=3, log_every=1, keep_checkpoints=True, trace=False)
    assert run_train(cwd, 1).returncode == 0
    result = run_train(cwd, 1, "--set", "steps=8")
    assert result.returncode == 0 and "resumed from checkpoints/tiny/step-00000003" in result.stderr, result.stderr[-2000:]
    with open(cwd / "plots" / "train-tiny.csv", newline="") as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    optim = OptimConfig(**TRAIN["optim"])
    old, new = (TRAIN["optim"]["lr"] * lr_factor(optim, total)(3) for total in (4, 8))
    assert abs(old - new) > 1e-4  # the test tells the two apart
    assert lr[4] == pytest.approx(new, rel=1e-6)  # the row of step 4 holds the rate it was taken at (step 3's)
    assert lr[5] == pytest.approx(TRAIN["optim"]["lr"] * lr_factor(optim, 8)(4), rel=1e-6)


def test_the_lr_column_is_optim_lr_as_scheduled_whatever_lr_factors_scale(tmp_path):
    """It was optimiser group 0's rate, which lr_factors={extras: 0.1} made ten times too small."""
    from ssd.optim import OptimConfig, lr_factor

    cwd = workdir(tmp_path, steps=4, log_every=1, trace=False, **{"validation.every": 0,
                                                                  "optim.lr_factors": {"extras": 0.1}})
    result = run_train(cwd, 1)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(cwd / "plots" / "train-tiny.csv", newline="") as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    optim = OptimConfig(**TRAIN["optim"])
    assert lr == {s: pytest.approx(TRAIN["optim"]["lr"] * lr_factor(optim, 4)(s - 1), rel=1e-9) for s in range(1, 5)}


def test_a_frozen_backbone_keeps_its_batch_norm_statistics_too(tmp_path, monkeypatch):
    """freeze_backbone_steps held the weights still while the running statistics moved (up to 0.9)."""
    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict

    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    init_file(cwd / "init.pt", seed=0)
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "steps": 2, "trace": False, "ema": {}, "validation": {},
                                            "freeze_backbone_steps": 5, "optim": {**TRAIN["optim"], "warmup_steps": 0},
                                            "model": {**TRAIN["model"], "init_weights": "init.pt"},
                                            "data": {**TRAIN["data"], "num_workers": 0}})
    try:
        assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    before, after = weights(cwd / "init.pt"), weights(cwd / "models" / "tiny.pt")
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    assert max_difference({k: before[k] for k in backbone}, {k: after[k] for k in backbone}) == 0.0
    head = [k for k in before if k.startswith("head.") and before[k].is_floating_point()]
    assert max_difference({k: before[k] for k in head}, {k: after[k] for k in head}) > 0  # the rest trained


def test_grad_clip_measures_only_what_the_step_trains(tmp_path, monkeypatch):
    """During freeze_backbone_steps the frozen backbone's gradients set the clipped norm (1,355,901
    in the grad_norm column) and scaled the trained layers' gradients down about 1000x."""
    import accelerate

    from pipeline.device import reset_accelerate

    import pipeline.train as train_mod
    from pipeline.config import from_dict

    clipped: list[set[int]] = []
    original = accelerate.Accelerator.clip_grad_norm_

    def recording(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return original(self, parameters, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording)
    cwd = workdir(tmp_path)
    monkeypatch.chdir(cwd)
    cfg = from_dict(train_mod.TrainConfig, {**TRAIN, "steps": 3, "trace": False, "ema": {}, "validation": {},
                                            "freeze_backbone_steps": 2,
                                            "optim": {**TRAIN["optim"], "warmup_steps": 0, "grad_clip": 1.0},
                                            "data": {**TRAIN["data"], "num_workers": 0}})
    try:
        assert train_mod.train(cfg) == 0
    finally:
        reset_accelerate()
    model, _ = load_model_file(cwd / "models" / "tiny.pt")
    assert len(clipped) == 3
    sizes = [len(c) for c in clipped]
    backbone = sum(1 for n, _ in model.named_parameters() if n.startswith("backbone."))
    total = sum(1 for _ in model.parameters())
    assert sizes == [total - backbone, total - backbone, total]  # frozen for two steps, then all


def test_several_training_sections_need_a_section_and_a_wrong_one_is_named(tmp_path):
    cwd = workdir(tmp_path)
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["train_other"] = params["train"]
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_train(cwd, 1, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: --section is required: 2 train sections (train, train_other)")
    result = run_train(cwd, 1, "--section", "train_voc", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: no section 'train_voc' (sections this stage can run: train, train_other)")
    assert not (cwd / "models").exists() and not (cwd / "checkpoints").exists()


def test_mixed_precision_from_the_launcher_is_used_and_a_conflict_stops(tmp_path):
    """`accelerate launch --mixed_precision bf16` with the section's key unset: bf16 is used.
    `--set mixed_precision=no` (YAML 1.1's False) against it: a one-line error naming both."""
    cwd = workdir(tmp_path, steps=2, checkpoint_every=10, trace=False)
    # Through pipeline.supervise, as pipeline.launch runs it: accelerate launch alone turns the
    # stage's exit code 2 into 1 (with a traceback of its own).
    launch_bf16 = [sys.executable, "-m", "pipeline.supervise", *ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16",
                   "--dynamo_backend", "no", "-m", "pipeline.train"]
    result = subprocess.run(launch_bf16, cwd=cwd, env=env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training tiny on cpu (CPU), 1 process(es), mixed precision bf16" in result.stderr
    assert load_model_file(cwd / "models" / "tiny.pt")[1]["meta"]["ran"]["mixed_precision"] == "bf16"

    conflict = subprocess.run([*launch_bf16, "--set", "mixed_precision=no"], cwd=cwd, env=env(),
                              capture_output=True, text=True, timeout=240)
    assert conflict.returncode == 2, conflict.stderr[-3000:]
    assert any(line.startswith("error: mixed_precision is 'no' but the launcher asks for 'bf16'")
               for line in conflict.stderr.splitlines()), conflict.stderr[-3000:]

    plain = run_train(cwd, 1, "--set", "mixed_precision=no", "--set", "name=plain")  # `no` works as written
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "training plain on cpu (CPU), 1 process(es), mixed precision no" in plain.stderr


def launch_config(cwd: Path, procs: int) -> Path:
    """An Accelerate config of the user's own (ACCELERATE_CONFIG_FILE): pipeline.launch uses it as is."""
    path = cwd / "accelerate.yaml"
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU" if procs > 1 else "NO",
        "num_machines": 1, "machine_rank": 0, "num_processes": procs, "mixed_precision": "no",
        "use_cpu": procs == 1, "main_process_port": free_port(),
    }))
    return path


def test_sigterm_to_pipeline_launch_reaches_the_workers_and_its_exit_code_is_75(reference_run, tmp_path):
    """What `dvc repro` runs, signalled alone: 2 processes under accelerate launch save and stop, the
    launcher's own exit code (1) becomes 75, and on a new machine (no runs/, no plots/) the rerun
    resumes, logs every step once and ends with the uninterrupted run's weights."""
    cwd = workdir(tmp_path)
    launch_env = {**env(), "ACCELERATE_CONFIG_FILE": str(launch_config(cwd, 2))}
    cmd = [sys.executable, "-m", "pipeline.launch", "train", "--section", "train"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while len(trace(cwd, 0)) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # only the outer process
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, output[-3000:]
    stopped = len(trace(cwd, 0))
    assert stopped < TRAIN["steps"] and (cwd / "checkpoints" / "tiny" / f"step-{stopped:08d}" / "meta.json").is_file()
    assert not (cwd / "models" / "tiny.pt").exists()  # nobody trained on after the launcher returned
    time.sleep(1)
    assert not (cwd / "models" / "tiny.pt").exists()

    keys = [t["keys"] for t in trace(cwd, 1)]
    shutil.rmtree(cwd / "runs")  # a spot recovery: a new machine with only the checkpoints
    shutil.rmtree(cwd / "plots")
    resumed = subprocess.run(cmd, cwd=cwd, env=launch_env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoints/tiny/step-{stopped:08d}" in resumed.stderr
    assert logged_steps(cwd) == tensorboard_steps(cwd) == expected_rows(TRAIN["steps"], TRAIN["log_every"])
    assert keys + [t["keys"] for t in trace(cwd, 1)] == [t["keys"] for t in trace(reference_run, 1)]
    assert max_difference(weights(cwd / "models/tiny.pt"), weights(reference_run / "models/tiny.pt")) < 1e-5


def test_ctrl_c_on_pipeline_launch_saves_a_checkpoint_and_exits_75(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the trainer must not be
    killed a moment later with nothing saved."""
    cwd = workdir(tmp_path, steps=60, checkpoint_every=100)
    cmd = [sys.executable, "-m", "pipeline.launch", "train"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a process group of its own, as a shell's job
    while len(trace(cwd, 0)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    stopped = len(trace(cwd, 0))
    assert (cwd / "checkpoints" / "tiny" / f"step-{stopped:08d}" / "meta.json").is_file(), output[-3000:]


def teacher_file(path: Path, classes: list[str] | None = None, image_size: int = 64) -> None:
    from shardgen import CLASSES
    from ssd.model_file import save_model_file
    from ssd.models import ssdlite_mobilenet_v2

    classes = classes or CLASSES
    torch.manual_seed(7)
    save_model_file(path, ssdlite_mobilenet_v2(len(classes) + 1, width_mult=0.5, image_size=image_size), classes)


def test_distillation_learns_from_the_teacher_and_logs_its_loss(tmp_path):
    distilled = workdir(tmp_path / "distilled", steps=4, trace=False, **{"validation.every": 0, "ema.enabled": False,
                                                                       "distill": {"teacher": "teacher.pt", "weight": 2.0}})
    plain = workdir(tmp_path / "plain", steps=4, trace=False, **{"validation.every": 0, "ema.enabled": False})
    teacher_file(distilled / "teacher.pt")  # a wider model than the student (width 0.5 against 0.25)
    for cwd in (distilled, plain):  # two processes: the student is wrapped by DDP, the teacher not
        result = run_train(cwd, 2)
        assert result.returncode == 0, result.stderr[-3000:]
    with open(distilled / "plots" / "train-tiny.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:  # the logged loss is the MultiBox loss plus the distillation loss
        assert row["distill_loss"] > 0
        assert row["loss"] == pytest.approx(row["box_loss"] + row["class_loss"] + row["distill_loss"], rel=1e-4)
    with open(plain / "plots" / "train-tiny.csv", newline="") as f:
        assert "distill_loss" not in next(csv.DictReader(f))
    # the same seed, data and initial weights: the teacher alone changed what was learnt
    assert max_difference(weights(distilled / "models/tiny.pt"), weights(plain / "models/tiny.pt")) > 1e-4
    _, info = load_model_file(distilled / "models/tiny.pt")
    assert info["meta"]["train_config"]["distill"] == {"weight": 2.0, "temperature": 1.0, "box_weight": 1.0,
                                                       "teacher": "teacher.pt"}


@pytest.mark.parametrize("classes, image_size, message", [
    (["cat", "dog", "bird"], 64, "classes ['cat', 'dog', 'bird'] differ from the data's"),
    (None, 96, "priors differ from the model's"),
])
def test_a_teacher_that_does_not_fit_is_a_one_line_error(tmp_path, classes, image_size, message):
    cwd = workdir(tmp_path, steps=2, **{"distill": {"teacher": "teacher.pt"}})
    teacher_file(cwd / "teacher.pt", classes, image_size)
    result = run_train(cwd, 1, timeout=60)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: distill.teacher teacher.pt: ") and message in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_resumed_trace_is_cut_back_to_the_checkpoint(tmp_path):
    """After a kill -9 past a periodic checkpoint, the resumed run appended steps 11 and 12 again
    to the trace the killed one had written (and to a line the kill cut in half)."""
    from types import SimpleNamespace

    from pipeline.training.loop import _trace_path

    logs = tmp_path / "runs" / "tiny"
    logs.mkdir(parents=True)
    rows = [json.dumps({"step": s, "keys": [f"k{s}"]}) + "\n" for s in range(1, 13)]
    (logs / "trace-rank0.jsonl").write_text("".join(rows) + '{"step": 13, "ke')
    run = SimpleNamespace(paths=SimpleNamespace(logs=logs), accelerator=SimpleNamespace(process_index=0), step=10)
    path = _trace_path(run)
    assert path.read_text() == "".join(rows[:10])
    run.step = 0
    assert not _trace_path(run).exists()  # a fresh run starts afresh
