"""Run a stage on every GPU of this machine, or as one process on the CPU.

Usage::

    python -m pipeline.launch train --section train_voc [--set key=value ...]
    python -m pipeline.launch --dry-run evaluate --section evaluate

What the DVC stages run, so that ``dvc repro`` needs no ``accelerate config``:

- with N > 1 GPUs: ``accelerate launch --config_file configs/accelerate/default.yaml
  --multi_gpu --num_processes N -m pipeline.<stage> ...``;
- with one GPU or none: ``python -m pipeline.<stage> ...`` directly (Accelerate needs no
  launcher for one process).

An Accelerate config of your own wins: ``ACCELERATE_CONFIG_FILE`` or the file written by
``accelerate config`` (then ``accelerate launch --config_file <it>`` is used as is; a line on
stderr names it). ``ACCELERATE_MIXED_PRECISION`` and ``ACCELERATE_DYNAMO_BACKEND`` are passed
on as flags (``accelerate launch`` would replace them with the config file's values). The
prune stage runs as one process whatever the GPUs.

The command runs under :mod:`pipeline.supervise`: SIGTERM or Ctrl-C to this process is
passed on once (every training process saves a checkpoint), and the exit code is the
stage processes' own: 0 done, 2 bad config or input, 75 preempted (rerun the same command
to resume), even through ``accelerate launch``, which would say 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pipeline.supervise import supervise

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "default.yaml"
STAGES = ("train", "evaluate", "prune")


def user_config() -> Path | None:
    """An Accelerate config the user set up, if any: ``ACCELERATE_CONFIG_FILE``, else the file
    ``accelerate config`` writes (``$HF_HOME/accelerate/default_config.yaml``; ``HF_HOME``
    defaults to ``$XDG_CACHE_HOME/huggingface``, that to ``~/.cache/huggingface``).

    Found as Accelerate finds it, without importing Accelerate, which imports torch (about 3 s
    of every stage's start); tests/test_launch.py checks the path against Accelerate's own."""
    env = os.environ.get("ACCELERATE_CONFIG_FILE")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = Path(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))))
    path = home / "accelerate" / "default_config.yaml"
    return path if path.is_file() else None


#: Where CUDA (and ROCm) device nodes live: without one, no GPU can be used.
DEVICES = Path("/dev")


def gpu_count() -> int:
    """The GPUs torch sees. Without a GPU device node (``/dev/nvidia0``..., ROCm's ``/dev/kfd``,
    WSL2's ``/dev/dxg``) that is 0, known without importing torch: a CPU stage starts about 3 s
    sooner."""
    if sys.platform.startswith("linux") and not any(DEVICES.glob("nvidia[0-9]*")) \
            and not any((DEVICES / node).exists() for node in ("kfd", "dxg")):
        return 0
    import torch

    return torch.cuda.device_count()


#: Stages that run as one process whatever the GPUs (the prune stage refuses several).
ONE_PROCESS = ("prune",)
#: Accelerate's environment variables that ``accelerate launch`` would overwrite with its config
#: file's value (``mixed_precision: 'no'``), and the flags that pass them on instead.
PASSED_ON = {"ACCELERATE_MIXED_PRECISION": "--mixed_precision", "ACCELERATE_DYNAMO_BACKEND": "--dynamo_backend"}


def command(stage: str, args: list[str], gpus: int, config: Path | None) -> list[str]:
    """The command line that runs ``stage`` with ``args``."""
    module = f"pipeline.{stage}"
    if stage in ONE_PROCESS or (config is None and gpus <= 1):
        return [sys.executable, "-m", module, *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += [x for var, flag in PASSED_ON.items() if os.environ.get(var) for x in (flag, os.environ[var])]
    if config is not None:
        return [*launch, "--config_file", str(config), "-m", module, *args]
    return [*launch, "--config_file", str(DEFAULT_CONFIG), "--multi_gpu", "--num_processes", str(gpus),
            "-m", module, *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a stage on every GPU of this machine (or the CPU).")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the stage")
    ns = parser.parse_args(argv)
    config = user_config()
    if config is not None and ns.stage not in ONE_PROCESS:  # a workstation's `accelerate config` on a shared home
        print(f"pipeline.launch: using the Accelerate config {config} (ACCELERATE_CONFIG_FILE, or the one `accelerate "
              "config` wrote), not configs/accelerate/", file=sys.stderr)
    cmd = command(ns.stage, ns.args, gpu_count(), config)
    if ns.dry_run:
        print(shlex.join(cmd))
        return 0
    return supervise(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
