"""Under DVC, a stage refuses to read a file its dvc.yaml entry doesn't list (pipeline.dvc_inputs).

The stage's deps come from DVC's own API, in a scratch DVC project; the end-to-end case (the real
train_voc stage under ``dvc repro``) is in test_dvc_stages.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.bench.config import BenchmarkConfig
from pipeline.config import load_config
from pipeline.deploy import DeployConfig
from pipeline.dvc_inputs import check_tracked, input_paths
from pipeline.evaluate import EvaluateConfig
from pipeline.prepare import PrepareConfig
from pipeline.stage import StageError
from pipeline.train_config import TrainConfig

PARAMS = {"ev": {"model": "models/a.pt", "shards": "data/shards/voc"}}
STAGES = {
    "ev": {"cmd": "python -c pass", "deps": ["${ev.model}", "data"]},
    "dep": {"cmd": "python -c pass", "deps": ["models/a.pt", "data/shards/voc"]},
    "bench": {"cmd": "python -c pass", "deps": ["data"]},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}))
    (root / "data" / "shards" / "voc").mkdir(parents=True)
    (root / "linked").symlink_to(root / "data")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, timeout=120)
    return root


@pytest.fixture
def inside(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    return project


def under(stage: str, root: Path) -> dict:
    return {"DVC_STAGE": stage, "DVC_ROOT": str(root)}


def evaluate(*overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, PARAMS, "ev", overrides)


def test_input_paths_of_nested_and_listed_configs():
    train = load_config(TrainConfig, {"t": {"model": {"init_weights": "m.pt"}, "distill": {"teacher": "t.pt"}}}, "t")
    assert input_paths(train, "t") == [("t.model.init_weights", "m.pt"), ("t.data.shards", "data/shards/voc"),
                                       ("t.distill.teacher", "t.pt")]
    deploy = load_config(DeployConfig, {"d": {"models": [{"file": "a.pt", "shards": "s"}, {"file": "b.pt",
                                                                                          "shards": "s"}]}}, "d")
    assert input_paths(deploy, "d") == [("d.models[0].file", "a.pt"), ("d.models[0].shards", "s"),
                                        ("d.models[1].file", "b.pt"), ("d.models[1].shards", "s")]
    prepare = load_config(PrepareConfig, {"p": {"ir": {"enabled": False}}}, "p")
    assert input_paths(prepare, "p") == [("p.voc.root", "data/sample/voc")]  # a disabled part reads nothing


def test_outside_dvc_nothing_is_checked(inside):
    check_tracked(evaluate("model=elsewhere.pt"), "ev", environ={})


def test_paths_that_are_deps_or_inside_one_pass(inside):
    check_tracked(evaluate(), "ev", environ=under("ev", inside))  # ${ev.model} as DVC resolves it; data/...
    check_tracked(evaluate("shards=linked/shards/voc"), "ev", environ=under("ev", inside))  # a link into a dep
    check_tracked(evaluate(f"shards={inside / 'data' / 'shards'}"), "ev", environ=under("ev", inside))  # absolute
    check_tracked(evaluate(), "ev", environ=under("dvc.yaml:ev", inside))  # DVC's long address of a stage


def test_a_path_the_stage_does_not_list_is_one_line(inside):
    with pytest.raises(StageError, match=r"^ev\.model: models/b\.pt is not among the deps of the DVC stage 'ev', so "
                                         r"DVC would not rerun the stage when it changes; .*\$\{ev\.model\}"):
        check_tracked(evaluate("model=models/b.pt"), "ev", environ=under("ev", inside))
    with pytest.raises(StageError, match=r"^ev\.shards: datasets/voc is not"):
        check_tracked(evaluate("shards=datasets/voc"), "ev", environ=under("ev", inside))
    with pytest.raises(StageError, match=r"^ev\.shards: data2 is not"):  # a sibling with the dep's name as prefix
        check_tracked(evaluate("shards=data2"), "ev", environ=under("ev", inside))


def test_a_model_added_to_a_list_names_its_entry(inside):
    models = [{"file": "models/a.pt", "shards": "data/shards/voc"}, {"file": "models/new.pt", "shards": "data/shards/voc"}]
    cfg = load_config(DeployConfig, {"d": {"models": models}}, "d")
    with pytest.raises(StageError, match=r"^d\.models\[1\]\.file: models/new\.pt is not among the deps .*dvc\.yaml, or"):
        check_tracked(cfg, "d", environ=under("dep", inside))
    check_tracked(load_config(DeployConfig, {"d": {"models": models[:1]}}, "d"), "d", environ=under("dep", inside))


def test_the_benchmark_checks_only_the_sections_it_runs(inside):
    cfg = load_config(BenchmarkConfig, {"b": {"loader": {"shards": "data/shards/voc"}}}, "b")
    check_tracked(cfg, "b", only=["postprocess", "loader", "feed"], environ=under("bench", inside))
    with pytest.raises(StageError, match=r"^b\.models\.files\[0\]: models/ssdlite_voc\.pt is not"):
        check_tracked(cfg, "b", only=["loader", "models"], environ=under("bench", inside))


def test_a_stage_dvc_cannot_resolve_is_a_warning(inside, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        check_tracked(evaluate("model=models/b.pt"), "ev", environ=under("no_such_stage", inside))
    assert "can't read the deps of the DVC stage 'no_such_stage'" in caplog.text


def test_an_input_no_stage_writes_and_git_ignores_is_refused(tmp_path, monkeypatch):
    """`prune.name` renamed: the prune stage now writes models/new-pruned.pt, and evaluate_pruned
    still read the old models/old-pruned.pt an earlier run left (no stage makes it, git ignores
    it), evaluated it as the pruned model and exited 0."""
    root = tmp_path / "git"
    (root / "models").mkdir(parents=True)
    stages = {
        "prune": {"cmd": "python -c pass", "outs": ["models/new-pruned.pt"]},
        "ev": {"cmd": "python -c pass", "deps": ["${ev.model}", "data", "weights"]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"ev": {"model": "models/old-pruned.pt"}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (root / ".gitignore").write_text("/models/\n")
    (root / "data" / "shards" / "voc").mkdir(parents=True)
    (root / "weights").mkdir()
    for name in ("old-pruned.pt", "new-pruned.pt"):
        (root / "models" / name).write_bytes(b"model")
    (root / "weights" / "start.pt").write_bytes(b"weights")  # not ignored: the user's to commit
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, timeout=120)
    monkeypatch.chdir(root)
    env = under("ev", root)
    with pytest.raises(StageError) as e:
        check_tracked(evaluate("model=models/old-pruned.pt"), "ev", environ=env)
    assert str(e.value).startswith("ev.model: models/old-pruned.pt is no DVC stage's output, and neither DVC nor git "
                                   "tracks it (git ignores it)")
    (root / "params.yaml").write_text(yaml.safe_dump({"ev": {"model": "models/new-pruned.pt"}}))
    check_tracked(evaluate("model=models/new-pruned.pt"), "ev", environ=env)  # the prune stage's output
    (root / "params.yaml").write_text(yaml.safe_dump({"ev": {"model": "weights/start.pt"}}))
    check_tracked(evaluate("model=weights/start.pt"), "ev", environ=env)
    outside = tmp_path / "outside.pt"  # DVC's external deps: listed, outside the project
    outside.write_bytes(b"model")
    (root / "params.yaml").write_text(yaml.safe_dump({"ev": {"model": str(outside)}}))
    check_tracked(evaluate(f"model={outside}"), "ev", environ=env)
    with pytest.raises(StageError, match="is not among the deps"):  # and the deps check still runs
        check_tracked(evaluate(f"model={outside}", "shards=elsewhere"), "ev", environ=env)


def test_a_stage_refuses_when_another_stage_would_read_a_left_file(tmp_path, monkeypatch):
    """`train_voc.name` renamed: train_voc wrote models/new.pt, and evaluate's dep stayed the old
    models/old.pt an earlier run left. DVC didn't rerun evaluate (its deps hadn't changed), so
    the new model's experiment showed the old model's mAP, exit 0. The stage that runs refuses."""
    from dataclasses import dataclass

    @dataclass
    class Nothing:  # a stage config that reads no file
        pass

    root = tmp_path / "git"
    (root / "models").mkdir(parents=True)
    stages = {
        "train": {"cmd": "python -c pass", "outs": ["models/${train.name}.pt"]},
        "ev": {"cmd": "python -c pass", "deps": ["models/old.pt"]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"name": "new"}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (root / ".gitignore").write_text("/models/\n")
    (root / "models" / "old.pt").write_bytes(b"the model before the rename")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, timeout=120)
    monkeypatch.chdir(root)
    with pytest.raises(StageError) as e:
        check_tracked(Nothing(), "train", environ=under("train", root))
    assert str(e.value).startswith("models/old.pt, which the DVC stage(s) ev read, is no stage's output, and neither "
                                   "DVC nor git tracks it (git ignores it): a file an earlier run left")
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"name": "old"}}))
    check_tracked(Nothing(), "train", environ=under("train", root))  # evaluate reads the train stage's output


def test_under_dvc_a_section_s_name_follows_its_model():
    """`dvc exp run -S evaluate.model=models/other.pt` passes no --set, so the command-line check
    never saw it: the other model's metrics and plots were filed as ssdlite_voc, exit 0. A null
    name became 'None' in dvc.yaml's outs, and DVC failed the stage after its work."""
    from pipeline.dvc_inputs import check_name_follows_model_under_dvc as check

    dvc = {"DVC_STAGE": "evaluate"}
    check("ssdlite_voc", "models/ssdlite_voc.pt", "evaluate", environ=dvc)
    check("ssdlite_voc-int8", "models/deploy/ssdlite_voc-int8.onnx", "evaluate_int8", environ=dvc)
    check("lstm_ir_per_frame", "models/lstm_ir.pt", "evaluate_ir_lstm_per_frame", environ=dvc)
    check("ssdlite_voc", "models/other.pt", "evaluate", environ={})  # run directly: the --set check's business
    with pytest.raises(StageError) as e:
        check("ssdlite_voc", "models/other.pt", "evaluate", environ=dvc)
    assert str(e.value) == ("evaluate.name 'ssdlite_voc' with evaluate.model models/other.pt: the results of "
                            "models/other.pt would be filed as 'ssdlite_voc'; under DVC the name is the model "
                            "file's stem, or begins with it and '_': set evaluate.name too ('other', say)")
    with pytest.raises(StageError, match="would be filed as 'ssdlite_voc-pruned'"):  # the unpruned model
        check("ssdlite_voc-pruned", "models/ssdlite_voc.pt", "evaluate_pruned", environ=dvc)
    with pytest.raises(StageError, match=r"prune.name: null \(the model file's stem\) is not for DVC"):
        check(None, "models/ssdlite_voc.pt", "prune", environ=dvc)
