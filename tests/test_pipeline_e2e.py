"""The whole `dvc repro`, on a tiny configuration, in a temporary copy of the repository.

This is what guards the pipeline end to end in CI: every stage of dvc.yaml runs as users
run it (the same commands, the same params.yaml keys, only smaller numbers), a second
`dvc repro` has nothing to do, and an experiment with a changed training key shows up in
`dvc metrics diff`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: params.yaml keys changed for the tiny run (dotted paths); everything else is the real file.
TINY = {
    "sample.voc.train_images": 40,
    "sample.voc.val_images": 12,
    "sample.ir.videos": 4,
    "sample.ir.frames": 16,
    "sample.ir.val_fraction": 0.25,
    "prepare.voc.shard_size": 16,
    "prepare.ir.shard_size": 4,
}
for section in ("train_voc", "train_ir_base", "train_ir_ssdlite", "train_ir_lstm"):
    TINY.update({
        f"{section}.model.width_mult": 0.25,
        f"{section}.model.image_size": 96,
        f"{section}.data.batch_size": 2,
        f"{section}.data.num_workers": 0,
        f"{section}.data.shuffle_buffer": 8,
        f"{section}.steps": 3,
        f"{section}.checkpoint_every": 2,
        f"{section}.log_every": 1,
        f"{section}.optim.warmup_steps": 1,
        f"{section}.validation.num_workers": 0,  # every: 200 > steps: validated once, at the end
    })
TINY["train_ir_lstm.data.batch_size"] = 1
for section in ("evaluate", "evaluate_ir_ssdlite", "evaluate_ir_lstm", "evaluate_ir_lstm_per_frame", "evaluate_pruned"):
    TINY[f"{section}.num_workers"] = 0
    TINY[f"{section}.batch_size"] = 4
    TINY[f"{section}.examples"] = 2
    # 3 steps from the background prior (0.99) leave every class score near 0.01 / 6: keep them,
    # so that the PR curves have detections to draw
    TINY[f"{section}.postprocess.score_threshold"] = 0.0002
TINY.update({
    "prune.finetune.steps": 2,
    "prune.finetune.data.batch_size": 2,
    "prune.finetune.data.num_workers": 0,
    "prune.finetune.data.shuffle_buffer": 8,
    "prune.finetune.checkpoint_every": 1,
    "prune.finetune.optim.warmup_steps": 1,
    "prune.evaluate.num_workers": 0,
    "deploy.int8.frames": 8,
    "prune.latency.runs": 2,
    "prune.latency.warmup": 1,
    "benchmark.models.batch": 2,
    "benchmark.models.source_image": None,  # the tiny sample has no image 002006
    "benchmark.models.repeats": 2,
    "benchmark.models.throughput_repeats": 1,
    "benchmark.models.warmup": 1,
    "benchmark.postprocess.batch": 2,
    "benchmark.postprocess.repeat": 2,
    "benchmark.loader.batch_size": 2,
    "benchmark.loader.num_workers": 0,
    "benchmark.loader.num_batches": 2,
    "benchmark.loader.image_size": 96,
    "benchmark.train_step.batch_size": 2,
    "benchmark.train_step.num_workers": 0,
    "benchmark.train_step.steps": 2,
    "benchmark.train_step.warmup": 1,
    "benchmark.convert.videos": 2,
    "benchmark.convert.frames": 8,
    "benchmark.convert.size": [64, 48],
    "benchmark.deployed.batch": 2,
    "benchmark.deployed.repeats": 2,
    "benchmark.deployed.throughput_repeats": 1,
    "benchmark.deployed.warmup": 1,
    "benchmark.deployed.camera_rounds": 2,
    "benchmark.deployed.camera_block": 2,
    "benchmark.feed.source_size": [100, 75],
    "benchmark.feed.samples": 4,
    "benchmark.feed.repeats": 1,
})


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY.items():
        _set(params, key, value)
    return params


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(cwd)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh copy of the tracked files (as a clone would have them), with the tiny params, committed."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("data/", "models/", "metrics/", "plots/", "reports/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-qm", "tiny pipeline"], dest)
    run(["dvc", "repro"], dest, timeout=1500)
    run([*git, "add", "-A"], dest)  # dvc.lock and the metrics: the baseline `dvc metrics diff` compares with
    run([*git, "commit", "-qm", "results"], dest)
    return dest


def test_dvc_repro_runs_every_stage(repo):
    for name in ("train-ssdlite_voc", "train-ssdlite_ir_base", "train-ssdlite_ir", "train-lstm_ir", "eval-ssdlite_voc",
                 "eval-ssdlite_ir",
                 "eval-lstm_ir", "eval-lstm_ir_per_frame", "prune-ssdlite_voc", "eval-ssdlite_voc-pruned", "benchmark"):
        data = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert data, name
    for model in ("ssdlite_voc", "ssdlite_ir_base", "ssdlite_ir", "lstm_ir", "ssdlite_voc-pruned",
                  "ssdlite_voc-best", "ssdlite_ir_base-best", "ssdlite_ir-best", "lstm_ir-best"):
        assert (repo / "models" / f"{model}.pt").is_file()
    assert json.loads((repo / "reports" / "lstm_ir" / "evaluation.json").read_text())["mode"] == "video"
    assert (repo / "reports" / "benchmark.png").is_file()
    assert any((repo / "reports" / "ssdlite_voc").iterdir())


def test_plots_people_read(repo):
    """`dvc plots show` draws what dvc.yaml defines: titled training curves with every loss part and the
    learning rate, one PR chart per evaluation with all classes, the mAP of every model in one chart,
    confusion matrices, and the benchmark and example pictures."""
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not shown.get("errors"), shown.get("errors")
    # A chart of an empty CSV has no data: the int8 graph of this barely trained model has no score over
    # the evaluation's 0.01 (the float one's flat scores sit just above it), so its PR curves are empty.
    empty = {k for k in shown["data"] if k.endswith(".csv") and len((repo / k).read_text().splitlines()) == 1}
    assert all(len(v) == 1 for k, v in shown["data"].items() if k not in empty), {
        k: len(v) for k, v in shown["data"].items() if len(v) != 1}
    assert empty <= {f"plots/pr-{n}-int8.csv" for n in ("ssdlite_voc", "ssdlite_voc-pruned", "lstm_ir")}, empty
    charts = {k: v[0] for k, v in shown["data"].items() if v}
    loss = charts["train_voc loss"]["content"]
    assert loss["title"]["text"] == "Training loss (ssdlite_voc)"
    assert {v["field"] for v in loss["data"]["values"]} == {"loss", "box_loss", "class_loss"}
    lr = charts["train_ir_lstm learning rate"]["content"]
    assert lr["title"]["text"] == "Learning rate (lstm_ir)" and '"title": "learning rate"' in json.dumps(lr)
    val = charts["train_ir_lstm validation mAP"]["content"]
    assert val["title"]["text"] == "Validation mAP while training (lstm_ir, voc07)"
    assert {v["field"] for v in val["data"]["values"]} == {"map", "map_per_frame"}  # memory on and off
    assert "VOC07 mAP per model" in json.dumps(charts["mAP per model"]["content"]["title"])
    models = charts["mAP per model"]["content"]["data"]["values"]
    assert sorted(v["model"] for v in models) == sorted(  # the int8 graphs too
        ["ssdlite_voc", "ssdlite_ir", "lstm_ir", "lstm_ir_per_frame", "ssdlite_voc-pruned", "ssdlite_voc-int8",
         "ssdlite_voc-pruned-int8", "lstm_ir-int8"])
    pr = charts["plots/pr-ssdlite_voc.csv"]["content"]
    classes = json.loads((repo / "data" / "shards" / "voc" / "manifest.json").read_text())["classes"]
    drawn = {v["class"] for v in pr["data"]["values"]}  # a class without detections has no curve
    assert drawn and drawn <= set(classes) and pr["encoding"]["color"]["field"] == "curve"
    confusion = json.dumps(charts["plots/confusion-lstm_ir.csv"]["content"])
    assert '"field": "predicted"' in confusion and '"field": "actual"' in confusion
    images = [k for k, v in charts.items() if v["type"] == "image"]
    # The example detections are outs, not plots: a fresh clone has no DVC cache, and with them
    # listed `dvc plots show` wrote nothing.
    assert "reports/benchmark.png" in images and not any("/examples/" in k for k in images)
    assert not [k for k in charts if k.startswith("plots/pr-ssdlite_voc/")]  # no chart per class
    # `dvc metrics show` holds numbers only: no paths or settings among its columns.
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    for rev in metrics.values():
        for name, content in rev["data"].items():
            if name.startswith(("metrics/eval-", "metrics/prune-")):
                flat = json.dumps(content["data"])
                assert '"model"' not in flat and '"postprocess"' not in flat and '"mode"' not in flat, name
            assert not strings(content["data"]), (name, strings(content["data"]))


def strings(tree) -> list[str]:
    """The string values anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in strings(v)]
    return [tree] if isinstance(tree, str) else []


def test_second_repro_does_nothing(repo):
    out = run(["dvc", "repro"], repo)
    assert "Data and pipelines are up to date" in out.stdout + out.stderr
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout


def test_experiment_shows_in_metrics_diff(repo):
    # `+key=no`: a key params.yaml leaves out, written as YAML 1.1 reads a boolean; it must mean "no".
    # A key of the last training stage, and that stage as the target: only it reruns (without the
    # target its evaluations, the deploy stage and the benchmark would too: 165 s instead of 35, to
    # test the same plumbing; a train_voc key would rerun almost the whole pipeline).
    run(["dvc", "exp", "run", "-S", "train_ir_lstm.optim.lr=0.01", "-S", "+train_ir_lstm.mixed_precision=no",
         "train_ir_lstm"], repo, timeout=1500)
    diff = run(["dvc", "metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)
    assert "metrics/train-lstm_ir.json" in changed, changed.keys()
    assert changed["metrics/train-lstm_ir.json"]["final_loss"]["diff"] != 0
    assert "metrics/train-ssdlite_voc.json" not in changed  # upstream of the change: not rerun
