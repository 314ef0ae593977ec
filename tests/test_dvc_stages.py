"""dvc.yaml tracks what the stages really read: the params' paths, the imported code.

- Every input and output path of a stage comes from params.yaml (``${...}``), so DVC tracks
  the user's data and models, not the sample's (tested with the real ``dvc`` CLI).
- Every stage lists exactly the source files it imports (``pipeline.stage_deps``), so a
  comment in a module a stage never imports reruns nothing.
- A training stage preempted under ``dvc repro`` and rerun keeps every plot row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import stage_deps
from pipeline.config import load_config, load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = load_params(ROOT / "params.yaml")


def resolve(text: str, params: dict) -> str:
    """``${a.b}`` -> params' a.b, as DVC interpolates dvc.yaml."""
    def value(m: re.Match) -> str:
        node: Any = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def entries(stage: dict, kind: str) -> list[str]:
    """The paths of a stage's deps/outs/metrics/plots (those with options are one-key dicts)."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(kind, [])]


# ---------------------------------------------------------------------------------------------
# Code deps


def test_every_stage_lists_the_code_it_imports():
    assert stage_deps.check(DVC_YAML) == [], "run `python -m pipeline.stage_deps --write`"


def test_write_puts_the_code_deps_back():
    text = (ROOT / "dvc.yaml").read_text()
    drifted = text.replace("      - ssd/loss.py\n", "", 1).replace("      - pipeline/train.py\n", "      - ssd/export.py\n", 1)
    assert stage_deps.check(yaml.safe_load(drifted))
    assert stage_deps.rewrite(drifted) == text


def test_export_is_no_dependency_of_training():
    """The issue's example: a comment in ssd/export.py reran train_voc."""
    deps = stage_deps.code_deps(DVC_YAML["stages"]["train_voc"]["cmd"])
    assert "ssd/export.py" not in deps and {"ssd/loss.py", "pipeline/train.py", "pipeline/launch.py"} <= set(deps)


PROBE = """
import importlib, sys
from pathlib import Path
root = Path(sys.argv[1])
importlib.import_module(sys.argv[2])
for module in list(sys.modules.values()):
    f = getattr(module, "__file__", None)
    if f and Path(f).is_relative_to(root) and ".venv" not in Path(f).parts:
        print(Path(f).relative_to(root))
"""


@pytest.mark.parametrize("module", sorted({m for s in DVC_YAML["stages"].values()
                                           for m in stage_deps.stage_modules(s["cmd"])}))
def test_what_a_stage_module_loads_is_in_its_computed_deps(module):
    """The import scan reads the source; this checks it against what Python really loads
    (an importlib call the scan can't see would show up here)."""
    loaded = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), module], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert set(loaded) <= set(stage_deps.code_deps(f"python -m {module}"))


# ---------------------------------------------------------------------------------------------
# Data paths


def stage_paths(name: str) -> tuple[set[str], set[str]]:
    """(inputs, outputs) of a stage as its own code computes them from params.yaml."""
    from pipeline.benchmark import BenchmarkConfig
    from pipeline.deploy import DeployConfig
    from pipeline.eval_outputs import EvalPaths
    from pipeline.evaluate import EvaluateConfig
    from pipeline.prepare import PrepareConfig
    from pipeline.prune_config import PruneStageConfig
    from pipeline.sample import SampleConfig
    from pipeline.train_config import RunPaths, TrainConfig

    if name == "sample":
        c = load_config(SampleConfig, PARAMS, name)
        return set(), {c.voc.out_dir, c.ir.out_dir}
    if name == "prepare":
        c = load_config(PrepareConfig, PARAMS, name)
        return {c.voc.root, c.ir.root}, {c.voc.out, c.ir.out}
    if name.startswith("train"):
        c = load_config(TrainConfig, PARAMS, name)
        p = RunPaths.of(c)
        inputs = {c.data.shards, c.model.init_weights, c.model.from_file, c.model.backbone_weights} - {None}
        validated = {str(p.best_model), str(p.val_plots)} if c.validation.every else set()
        return inputs, {str(p.model), str(p.metrics), str(p.plots)} | validated
    if name.startswith("evaluate"):
        c = load_config(EvaluateConfig, PARAMS, name)
        p = EvalPaths.of(c, c.name or Path(c.model).stem)
        return {c.model, c.shards}, {str(p.metrics), str(p.plots), str(p.map_row), str(p.reports),
                                     str(p.confusion)}
    if name == "prune":
        c = load_config(PruneStageConfig, PARAMS, name)
        stem = c.name or Path(c.model).stem
        return ({c.model, c.finetune.data.shards, c.evaluate.shards},
                {f"{c.models_dir}/{stem}-pruned.pt", f"{c.metrics_dir}/prune-{stem}.json"})
    if name == "benchmark":
        c = load_config(BenchmarkConfig, PARAMS, name)
        inputs = {*c.models.files, c.models.source_image, c.loader.shards, c.loader.voc_dir, c.train_step.model,
                  c.train_step.shards, *c.deployed.files, c.deployed.onnx_dir} - {None}
        return inputs, {c.out, c.setup, c.chart}
    if name == "deploy":
        c = load_config(DeployConfig, PARAMS, name)
        return {p for m in c.models for p in (m.file, m.shards)}, {c.out_dir, c.metrics}
    raise AssertionError(f"no rule for stage {name}")


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or Path(path).is_relative_to(d) for d in deps)


@pytest.mark.parametrize("name", list(DVC_YAML["stages"]))
def test_every_input_and_output_is_the_one_params_yaml_names(name):
    stage = DVC_YAML["stages"][name]
    deps = [resolve(d, PARAMS) for d in entries(stage, "deps")]
    outs = {resolve(o, PARAMS) for kind in ("outs", "metrics", "plots") for o in entries(stage, kind)}
    inputs, outputs = stage_paths(name)
    missing = [p for p in inputs if not covered(p, deps)]
    assert not missing, f"{name} reads {missing} but dvc.yaml doesn't list them"
    assert outputs == outs
    # Data deps are templated from params.yaml; only lists can't be: the benchmark's model files, the
    # deploy stage's models and their shards. And keys that may be null: DVC fails on a templated null.
    fixed = [d for d in entries(stage, "deps") if "${" not in d and not d.startswith(stage_deps.CODE_PREFIXES)]
    models = PARAMS["deploy"]["models"]
    lists = {"benchmark": [*PARAMS["benchmark"]["models"]["files"], PARAMS["benchmark"]["loader"]["voc_dir"]],
             "deploy": [m["file"] for m in models] + list(dict.fromkeys(m["shards"] for m in models))}
    assert fixed == lists.get(name, [])


# ---------------------------------------------------------------------------------------------
# The real dvc CLI in a scratch project


def env(cwd: Path) -> dict:
    e = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # dvc's `python` is ours
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def scratch_project(root: Path, stages: list[str], params: dict) -> Path:
    """A git + DVC project with the code, the given stages of the real dvc.yaml and ``params``."""
    for d in ("ssd", "pipeline", "configs"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    definition = {"stages": {s: DVC_YAML["stages"][s] for s in stages}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(definition, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"], [*DVC, "config", "core.analytics", "false"]):
        run(cmd, root, timeout=120)
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")  # the project's plot templates
    return root


def test_dvc_tracks_the_data_prepare_is_pointed_at(tmp_path):
    from test_prepare import BASE_ITEMS, BASE_SPLITS, make_ir_frames, make_voc

    own = tmp_path / "my-datasets"
    make_voc(own / "voc", BASE_ITEMS, BASE_SPLITS)
    frames = {"walk": list(range(1, 9)), "run": list(range(1, 9))}
    make_ir_frames(own / "ir", frames, {s: [f"{v}_f{n}" for n in frames[v]] for s, v in (("train", "walk"), ("val", "run"))})
    prepare = {**PARAMS["prepare"], "workers": 1}
    prepare["voc"] = {**prepare["voc"], "root": str(own / "voc")}
    prepare["ir"] = {**prepare["ir"], "root": str(own / "ir"), "clip_length": 4}
    project = scratch_project(tmp_path / "project", ["prepare"], {"prepare": prepare})
    run([*DVC, "repro", "prepare"], project)
    assert "up to date" in run([*DVC, "status"], project).stdout
    assert json.loads((project / "data/shards/voc/manifest.json").read_text())["source"] == str(own / "voc")

    xml = sorted((own / "voc" / "Annotations").glob("*.xml"))[0]
    xml.write_text(re.sub(r"<xmin>(\d+)</xmin>", lambda m: f"<xmin>{int(m.group(1)) + 1}</xmin>", xml.read_text(), count=1))
    status = run([*DVC, "status", "--json"], project).stdout
    assert str(own / "voc") in json.dumps(json.loads(status)["prepare"]), status
    (own / "ir" / "ImageSets" / "Main" / "val.txt").unlink()  # ... and a split list
    assert str(own / "ir") in run([*DVC, "status"], project).stdout


TRAIN = {
    "name": "tiny",
    "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
    "data": {"shards": "data/shards/voc", "batch_size": 4, "num_workers": 0, "streams": 2, "shuffle_buffer": 8},
    "optim": {"lr": 0.003, "warmup_steps": 2},
    "steps": 40, "checkpoint_every": 5, "log_every": 2, "trace": True,
    "validation": {"every": 10, "num_workers": 0},
}


def test_preempted_training_stage_keeps_its_rows_and_only_its_imports_rerun_it(tmp_path):
    from shardgen import write_frame_dataset
    from procs import kill_tree

    root = tmp_path / "project"
    root.mkdir()
    write_frame_dataset(root / "data" / "shards" / "voc", {"train": [9, 7, 5], "val": [6]})
    project = scratch_project(root, ["train_voc"], {"train_voc": TRAIN})
    trace = project / "runs" / "tiny" / "trace-rank0.jsonl"
    proc = subprocess.Popen([*DVC, "repro", "train_voc"], cwd=project, env=env(project), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while proc.poll() is None and not (trace.exists() and trace.read_text().count("\n") >= 12):
        time.sleep(0.05)
    kill_tree(proc.pid, signal.SIGTERM)  # a spot instance's shutdown: every process
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0 and "stopped at step" in out, out[-3000:]
    assert list((project / "checkpoints" / "tiny").glob("step-*"))

    rerun = run([*DVC, "repro", "train_voc"], project)  # DVC deletes the CSV first; the rerun resumes
    assert "resumed from checkpoints/tiny/step-" in rerun.stdout + rerun.stderr
    with open(project / "plots" / "train-tiny.csv") as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert steps == list(range(2, TRAIN["steps"] + 1, 2))
    summary = json.loads((project / "metrics" / "train-tiny.json").read_text())
    assert summary["steps"] == TRAIN["steps"]
    # The best model survives DVC deleting the stage's outputs: it travels in the checkpoints.
    with open(project / "plots" / "val-tiny.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [10, 20, 30, 40]
    assert summary["val"]["best_map"] == max(float(r[1]) for r in rows)
    assert (project / "models" / "tiny-best.pt").is_file()
    # Without EMA (the default) the model file holds the last step's weights (the trace's checksum).
    from ssd.model_file import load_model_file

    model, _ = load_model_file(project / "models" / "tiny.pt")
    last = json.loads(trace.read_text().splitlines()[-1])["checksum"]
    assert sum(float(p.detach().double().sum()) for p in model.parameters()) == pytest.approx(last, abs=1e-9)

    # A comment in a module training never imports changes nothing; one in the loss reruns it.
    with open(project / "ssd" / "export.py", "a") as f:
        f.write("# a comment\n")
    assert "up to date" in run([*DVC, "status", "train_voc"], project).stdout
    with open(project / "ssd" / "loss.py", "a") as f:
        f.write("# a comment\n")
    assert "ssd/loss.py" in run([*DVC, "status", "train_voc"], project).stdout


def train_voc_project(root: Path, train: dict) -> Path:
    """A scratch project with tiny frame shards and the real train_voc stage running ``train``."""
    from shardgen import write_frame_dataset

    root.mkdir(parents=True, exist_ok=True)
    write_frame_dataset(root / "data" / "shards" / "voc", {"train": [9], "val": [6]})
    return scratch_project(root, ["train_voc"], {"train_voc": train})


def repro_refused(project: Path) -> str:
    """The output of a `dvc repro train_voc` that must fail."""
    result = run([*DVC, "repro", "train_voc"], project, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    return out


def test_a_file_the_stage_reads_but_dvc_does_not_track_stops_the_stage(tmp_path):
    """`dvc exp run -S +train_voc.model.init_weights=models/start.pt`: the real train_voc stage lists
    no such dep, so DVC would never rerun it when the file changes. It used to train and exit 0."""
    from shardgen import CLASSES
    from ssd.model_file import save_model_file
    from ssd.models.ssdlite import ssdlite_mobilenet_v2

    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    save_model_file(root / "models" / "start.pt", ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25,
                                                                        image_size=64), CLASSES)
    train = {**TRAIN, "model": {**TRAIN["model"], "init_weights": "models/start.pt"}}
    project = train_voc_project(root, train)
    out = repro_refused(project)
    assert ("error: train_voc.model.init_weights: models/start.pt is not among the deps of the DVC stage "
            "'train_voc'") in out, out[-3000:]
    assert not (project / "models" / "tiny.pt").exists() and not (project / "checkpoints").exists()


def test_a_training_whose_outputs_are_not_the_stages_outs_stops_before_training(tmp_path):
    """`dvc exp run -S train_voc.validation.every=0`: the run trained, then DVC failed the stage on
    the missing models/<name>-best.pt and plots/val-<name>.csv, the training lost."""
    project = train_voc_project(tmp_path / "project", {**TRAIN, "validation": {"every": 0}})
    out = repro_refused(project)
    assert ("error: models/tiny-best.pt: an out of the DVC stage 'train_voc' that this run won't write "
            "(validation.every is 0: no validation)") in out, out[-3000:]
    assert not (project / "models" / "tiny.pt").exists()
    # The same for outputs placed elsewhere than the stage's outs say (`-S train_voc.models_dir=mine`).
    (project / "params.yaml").write_text(yaml.safe_dump({"train_voc": {**TRAIN, "models_dir": "mine"}}))
    out = repro_refused(project)
    assert ("error: models_dir: this run would write mine/tiny.pt, but the DVC stage "
            "'train_voc' lists it as models/tiny.pt") in out, out[-3000:]
    assert not (project / "mine").exists()
