import subprocess
import sys
from pathlib import Path

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
