import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import launch

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_on_the_cpu_runs_the_stage_directly():
    assert launch.command("train", ["--section", "x"], gpus=0, config=None) == [
        sys.executable, "-m", "pipeline.train", "--section", "x"
    ]
    assert launch.command("train", [], gpus=1, config=None)[1:] == ["-m", "pipeline.train"]


def test_every_gpu_with_the_shipped_config():
    cmd = launch.command("evaluate", ["--section", "e"], gpus=4, config=None)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(launch.DEFAULT_CONFIG)
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-4:] == ["-m", "pipeline.evaluate", "--section", "e"]


def test_a_user_config_wins(tmp_path):
    own = tmp_path / "mine.yaml"
    cmd = launch.command("train", [], gpus=8, config=own)
    assert cmd[cmd.index("--config_file") + 1] == str(own) and "--num_processes" not in cmd


def test_shipped_config_parses_as_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(launch.DEFAULT_CONFIG))
    assert cfg.num_machines == 1 and cfg.gpu_ids == "all" and cfg.distributed_type == "MULTI_GPU"


def test_dry_run_prints_the_command():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-m", "pipeline.launch", "--dry-run", "train", "--section", "s"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().endswith("-m pipeline.train --section s")


def test_a_cpu_machine_launches_without_importing_torch(tmp_path):
    """No GPU device node: 0 GPUs, known without torch (the launcher itself starts in 0.1 s, not 3)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = ("import sys; from pipeline import launch; launch.DEVICES = launch.Path(sys.argv[1]); "
            "launch.main(['--dry-run', 'evaluate']); print('torch' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.splitlines() == [f"{sys.executable} -m pipeline.evaluate", "False False"]


def test_with_a_gpu_device_node_torch_counts_the_gpus(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(launch, "DEVICES", tmp_path)
    assert launch.gpu_count() == (3 if not sys.platform.startswith("linux") else 0)
    for node in ("nvidia0", "nvidia3", "kfd", "dxg"):  # CUDA, ROCm, WSL2
        (tmp_path / node).touch()
        assert launch.gpu_count() == 3
        (tmp_path / node).unlink()
    (tmp_path / "nvidiactl").touch()  # the control node alone is not a GPU
    assert launch.gpu_count() == (3 if not sys.platform.startswith("linux") else 0)


def test_the_user_config_is_the_file_accelerate_itself_would_use(tmp_path):
    """Our path for `accelerate config`'s file, against Accelerate's own (computed when its module
    loads, so reloaded here), under the environment variables both read."""
    import importlib

    from accelerate.commands.config import config_args

    cases = [{"HOME": tmp_path / "home"}, {"HOME": tmp_path / "home", "XDG_CACHE_HOME": tmp_path / "xdg"},
             {"HOME": tmp_path / "home", "XDG_CACHE_HOME": tmp_path / "xdg", "HF_HOME": tmp_path / "hf"}]
    try:
        for extra in cases:
            with pytest.MonkeyPatch.context() as env:
                for name in ("ACCELERATE_CONFIG_FILE", "HF_HOME", "XDG_CACHE_HOME"):
                    env.delenv(name, raising=False)
                for name, value in extra.items():
                    env.setenv(name, str(value))
                theirs = Path(importlib.reload(config_args).default_config_file)
                assert launch.user_config() is None, extra  # no file there yet
                theirs.parent.mkdir(parents=True)
                theirs.write_text("compute_environment: LOCAL_MACHINE\n")
                assert launch.user_config() == theirs, extra
                env.setenv("ACCELERATE_CONFIG_FILE", "/x.yaml")
                assert launch.user_config() == Path("/x.yaml")
    finally:
        importlib.reload(config_args)


def test_the_prune_stage_runs_as_one_process_whatever_the_gpus(tmp_path):
    """It refuses several processes: `pipeline.launch prune` failed on every multi-GPU machine."""
    for config in (None, tmp_path / "mine.yaml"):
        assert launch.command("prune", ["--restart"], gpus=8, config=config) == [
            sys.executable, "-m", "pipeline.prune", "--restart"]


def test_accelerates_own_variables_are_passed_on_as_flags(monkeypatch):
    """accelerate launch replaced ACCELERATE_MIXED_PRECISION=bf16 with its config file's 'no': the
    same dvc repro trained in bf16 on one GPU and in fp32 on eight."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    cmd = launch.command("train", [], gpus=4, config=None)
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16" and cmd[cmd.index("--dynamo_backend") + 1] == "inductor"
    assert cmd.index("--mixed_precision") < cmd.index("-m", 3)  # a launcher flag, not the stage's
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    assert "--mixed_precision" not in launch.command("train", [], gpus=4, config=None)


def test_a_user_config_in_use_is_named(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\nnum_processes: 1\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "ACCELERATE_CONFIG_FILE": str(own)}
    out = subprocess.run([sys.executable, "-m", "pipeline.launch", "--dry-run", "train"], capture_output=True,
                         text=True, env=env, check=True)
    assert f"pipeline.launch: using the Accelerate config {own}" in out.stderr
