"""The prune stage, run as users run it: a subprocess on a tiny model file and tiny shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shardgen import CLASSES, write_frame_dataset
from ssd.model_file import load_model_file, read_model_file, save_model_file
from ssd.models import ssdlite_mobilenet_v2
from ssd.pruning import ARCH_KEY

ROOT = Path(__file__).resolve().parents[1]

PRUNE = {
    "model": "models/tiny.pt",
    "pruning": {"ratio": 0.5},
    "finetune": {
        "steps": 2,
        "data": {"shards": "shards", "batch_size": 4, "num_workers": 0, "streams": 2, "shuffle_buffer": 8},
        "optim": {"lr": 0.001, "warmup_steps": 1},
        "log_every": 1,
        "distill": {"weight": 1.0, "teacher": "control"},
        "channels_last": True,
    },
    "evaluate": {"shards": "shards", "batch_size": 6, "num_workers": 0},
    "latency": {"runs": 3, "warmup": 1, "batch": 2},
}


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.prune", *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    write_frame_dataset(root / "shards", {"train": [8], "val": [6]})
    torch.manual_seed(0)
    save_model_file(root / "models" / "tiny.pt", ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.5, image_size=64),
                    CLASSES, meta={"note": "untrained"})
    (root / "params.yaml").write_text(yaml.safe_dump({"prune": PRUNE}))
    return root


@pytest.fixture(scope="module")
def pruned(project) -> subprocess.CompletedProcess:
    result = run(project)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_stage_writes_the_pruned_model_and_its_metrics(project, pruned):
    metrics = json.loads((project / "metrics" / "prune-tiny.json").read_text())
    # Numbers only; the settings are in the model file.
    assert not {"model", "pruned_model", "ratio", "mode", "device", "finetune_steps", "image_size"} & set(metrics)
    assert metrics["params"]["after"] < 0.4 * metrics["params"]["before"]
    assert metrics["macs"]["after"] < 0.45 * metrics["macs"]["before"]
    assert metrics["params"]["reduction"] == pytest.approx(1 - metrics["params"]["after"] / metrics["params"]["before"], abs=1e-4)
    speed = metrics["cpu_forward"]
    for key in ("batch_1", "batch_2"):  # the test's latency.batch: 2
        fig = speed[key]
        assert fig["before_ms"] > 0 and fig["after_ms"] > 0
        assert fig["speedup"] == pytest.approx(fig["before_ms"] / fig["after_ms"], rel=1e-2)
    for key in ("before", "pruned", "finetuned"):  # an untrained model: numbers, not necessarily good ones
        assert 0.0 <= metrics["map_voc"][key] <= 1.0
        assert metrics["coco_map_50"][key] is None or 0.0 <= metrics["coco_map_50"][key] <= 1.0
    model, info = load_model_file(project / "models" / "tiny-pruned.pt")
    ran = info["meta"]["prune_run"]
    assert ran["finetune_steps"] == 2 and ran["ratio"] == 0.5 and ran["model"] == "models/tiny.pt"
    assert ran["map_voc_metric"] == "voc07" and ran["device"].startswith("cpu")
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]["after"]
    assert info["class_names"] == CLASSES and ARCH_KEY in info["arch"]
    assert info["meta"]["pruning"]["ratio"] == 0.5 and info["meta"]["source_model"] == "models/tiny.pt"
    assert info["meta"]["finetune"]["summary"]["steps"] == 2
    # fine-tuning changed the pruned weights
    before = read_model_file(project / "runs" / "tiny-pruned" / "prune" / "tiny-pruned-only.pt")["state_dict"]
    after = read_model_file(project / "models" / "tiny-pruned.pt")["state_dict"]
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not (project / "checkpoints" / "tiny-pruned").exists()  # removed once fine-tuning finished


def test_the_control_is_the_unpruned_model_fine_tuned_alike(project, pruned):
    # The fair comparison: the unpruned model gets the same fine-tuning steps, data, optimiser and
    # seed as the pruned one, and the metrics compare the two fine-tuned models.
    metrics = json.loads((project / "metrics" / "prune-tiny.json").read_text())
    work = project / "runs" / "tiny-pruned" / "prune"
    control, info = load_model_file(work / "tiny-control.pt")
    _, pruned_info = load_model_file(project / "models" / "tiny-pruned.pt")
    original, _ = load_model_file(project / "models" / "tiny.pt")
    assert sum(p.numel() for p in control.parameters()) == metrics["params"]["before"]
    assert info["meta"]["summary"]["steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(control.state_dict().values(), original.state_dict().values()))
    same = ("data", "optim", "loss", "seed", "steps", "channels_last")
    tuned_config = pruned_info["meta"]["finetune"]["train_config"]
    assert {k: info["meta"]["train_config"][k] for k in same} == {k: tuned_config[k] for k in same}
    assert tuned_config["channels_last"] is True  # finetune.channels_last reaches both trainings
    for key, read in (("map_voc", lambda m: m["map_voc"]), ("coco_map_50", lambda m: m["coco"]["map_50"])):
        assert metrics[key]["control"] == read(json.loads((work / "eval-tiny-control.json").read_text()))
        assert metrics[key]["finetuned"] == read(json.loads((work / "eval-tiny-pruned.json").read_text()))
        assert metrics[key]["finetuned_minus_control"] == pytest.approx(
            metrics[key]["finetuned"] - metrics[key]["control"], abs=1e-6)
    assert pruned_info["meta"]["prune_run"]["control"] is True
    assert not (project / "checkpoints" / "tiny-control").exists()


def test_the_pruned_model_learns_from_the_fine_tuned_control(project, pruned):
    # finetune.distill.teacher: control: the control is fine-tuned first, from the labels only,
    # and the pruned model's fine-tuning distils it.
    work = project / "runs" / "tiny-pruned" / "prune"
    _, control = load_model_file(work / "tiny-control.pt")
    _, tuned = load_model_file(project / "models" / "tiny-pruned.pt")
    assert control["meta"]["train_config"]["distill"]["teacher"] is None
    taught = tuned["meta"]["finetune"]["train_config"]["distill"]
    assert taught == {"weight": 1.0, "temperature": 1.0, "box_weight": 1.0, "teacher": "runs/tiny-pruned/prune/tiny-control.pt"}
    assert "distill_loss" in (work / "train-tiny-pruned.csv").read_text().splitlines()[0]
    assert "distill_loss" not in (work / "train-tiny-control.csv").read_text().splitlines()[0]


def test_pruned_file_loads_and_times_in_a_fresh_process(project, pruned):
    code = (
        "import sys, torch; from ssd.model_file import load_model_file; from pipeline.bench.latency import cpu_latency_ms; "
        "m, info = load_model_file(sys.argv[1]); x = torch.rand(1, 3, 64, 64); l, d = m(x); "
        "print(l.shape[1], l.shape[2], d.shape[2], cpu_latency_ms([m], info['image_size'], runs=3, warmup=1)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(project / "models" / "tiny-pruned.pt")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    priors, classes, four, ms = out.stdout.split()
    original, _ = load_model_file(project / "models" / "tiny.pt")
    assert (int(priors), int(classes), int(four)) == (original.priors.shape[0], len(CLASSES) + 1, 4)
    assert float(ms) > 0


def test_without_finetuning_or_evaluation_the_pruned_weights_are_the_output(project, tmp_path):
    sets = ["finetune.steps=0", "evaluate.enabled=false", "name=quick", f"metrics_dir={tmp_path}", f"models_dir={tmp_path}"]
    result = run(project, *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "prune-quick.json").read_text())
    model, info = load_model_file(tmp_path / "quick-pruned.pt")
    assert metrics["map_voc"]["before"] is None and info["meta"]["prune_run"]["finetune_steps"] == 0
    assert metrics["map_voc"]["control"] is None and metrics["map_voc"]["finetuned_minus_control"] is None
    original, _ = load_model_file(project / "models" / "tiny.pt")
    assert "finetune" not in info["meta"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x)[0].shape == original(x)[0].shape


def test_a_model_trained_with_frozen_batch_norm_is_fine_tuned_so(project, tmp_path):
    """The fine-tuning had no frozen_batchnorm key and always took each batch's statistics: a
    model trained with frozen ones (an LSTM-SSD on clips) had all of them replaced by the
    statistics of a few small batches."""
    torch.manual_seed(1)
    source = tmp_path / "frozen.pt"
    save_model_file(source, ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.5, image_size=64), CLASSES,
                    meta={"train_config": {"frozen_batchnorm": True}})
    sets = [f"model={source}", "name=frozen", "evaluate.enabled=false", "finetune.control=false",
            "finetune.distill=null", f"metrics_dir={tmp_path}", f"models_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}",
            f"checkpoints_dir={tmp_path / 'ck'}"]
    result = run(project, *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-4000:]
    info = read_model_file(tmp_path / "frozen-pruned.pt")
    assert info["meta"]["finetune"]["train_config"]["frozen_batchnorm"] is True
    pruned_only = read_model_file(tmp_path / "runs" / "frozen-pruned" / "prune" / "frozen-pruned-only.pt")
    stats = [k for k in pruned_only["state_dict"] if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(info["state_dict"][k], pruned_only["state_dict"][k]) for k in stats)
    # Asked for explicitly, the other way: the batches' statistics again.
    sets += ["finetune.frozen_batchnorm=false", "name=thawed"]
    result = run(project, *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-4000:]
    thawed = read_model_file(tmp_path / "thawed-pruned.pt")
    assert thawed["meta"]["finetune"]["train_config"]["frozen_batchnorm"] is False
    assert not all(torch.equal(thawed["state_dict"][k], pruned_only["state_dict"][k]) for k in stats)


@pytest.mark.parametrize("meta", [{"train_config": {"frozen_batchnorm": True}},
                                  {"finetune": {"train_config": {"frozen_batchnorm": True}}}])
def test_frozen_batch_norm_is_read_from_a_pruned_source_too(meta):
    """A pruned model keeps its training settings under meta.finetune: re-pruning a model
    fine-tuned with frozen statistics took live ones."""
    from pipeline.config import load_config, load_params
    from pipeline.prune import _as_trained
    from pipeline.prune_config import PruneStageConfig

    cfg = load_config(PruneStageConfig, load_params(ROOT / "params.yaml"), "prune", ["finetune.frozen_batchnorm=null"])
    assert _as_trained(cfg, {"meta": meta}).finetune.frozen_batchnorm is True
    assert _as_trained(cfg, {"meta": {}}).finetune.frozen_batchnorm is False


def test_a_preempted_fine_tuning_resumes_with_the_control_as_teacher(project, tmp_path):
    """The default recipe distils from the control. A preemption during the pruned model's
    fine-tuning, then a rerun (what `dvc repro` does): the control is retrained to the same
    weights, and the pruned model's fine-tuning resumes from its checkpoint. The control's file
    records the rerun's wall time, so counted by bytes the resume was refused, every time."""
    import signal
    import time

    from procs import kill_tree

    sets = ["name=spot", "finetune.steps=40", "finetune.checkpoint_every=1", "evaluate.enabled=false",
            f"metrics_dir={tmp_path / 'metrics'}", f"models_dir={tmp_path / 'models'}",
            f"runs_dir={tmp_path / 'runs'}", f"checkpoints_dir={tmp_path / 'checkpoints'}"]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.prune", *args], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pruned_checkpoints = tmp_path / "checkpoints" / "spot-pruned"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and len(list(pruned_checkpoints.glob("step-*"))) < 1:
        time.sleep(0.05)
    kill_tree(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 75, out[-3000:]  # preempted: a rerun resumes
    rerun = run(project, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "spot-pruned/step-" in rerun.stderr, rerun.stderr[-3000:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning.ratio=1.0", "ratio must be in [0, 1)"),
        ("pruning.mode=random", "prune.pruning.mode: expected one of"),
        ("finetune.step=3", "prune.finetune.step: unknown key"),
        ("model=models/none.pt", "model file not found"),
        ("pruning.ignore=[nothing]", "matches no module"),
        ("finetune.control=false", "teacher 'control' needs finetune.control: true"),
        # Checked with the section, as training checks them: they were a ZeroDivisionError and a
        # NumPy traceback after the evaluations and the cut.
        ("finetune.checkpoint_every=0", "prune.finetune.checkpoint_every: must be at least 1"),
        ("finetune.seed=-1", "prune.finetune.seed: must be at least 0"),
        ("finetune.log_every=0", "prune.finetune.log_every: must be at least 1"),
        ("finetune.seed=4294967296", "prune.finetune.seed: must be less than 4294967296"),
        # The pruned model went over its source (pruned twice on a rerun), exit 0.
        ("name=src", "the pruned model would be written over its source models/src-pruned.pt"),
    ],
)
def test_bad_config_is_a_one_line_error(project, monkeypatch, capsys, override, message):
    from pipeline import prune as stage

    monkeypatch.chdir(project)
    extra = []
    if override == "name=src":  # its output, models/src-pruned.pt, is the source here
        (project / "models" / "src-pruned.pt").write_bytes((project / "models" / "tiny.pt").read_bytes())
        extra = ["--set", "model=models/src-pruned.pt"]
    code = stage.main(["--set", override, *extra, "--set", "metrics_dir=never", "--set", "evaluate.enabled=false",
                       "--set", "latency.runs=1", "--set", "latency.warmup=0"])
    (project / "models" / "src-pruned.pt").unlink(missing_ok=True)
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message in line
    assert not (project / "never").exists()
