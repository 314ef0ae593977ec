"""Run a stage on every GPU of this machine, or as one process on the CPU.

Usage::

    python -m pipeline.launch train --section train_voc [--set key=value ...]
    python -m pipeline.launch --dry-run evaluate --section evaluate_voc

What the DVC stages run, so that ``dvc repro`` needs no ``accelerate config``:

- with N > 1 GPUs: ``accelerate launch --config_file configs/accelerate/default.yaml
  --multi_gpu --num_processes N -m pipeline.<stage> ...``;
- with one GPU or none: ``python -m pipeline.<stage> ...`` directly (Accelerate needs no
  launcher for one process).

An Accelerate config of your own wins: ``ACCELERATE_CONFIG_FILE`` or the file written by
``accelerate config`` (then ``accelerate launch --config_file <it>`` is used as is).

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
    """An Accelerate config the user set up, if any."""
    env = os.environ.get("ACCELERATE_CONFIG_FILE")
    if env:
        return Path(env)
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:  # pragma: no cover - accelerate moved it
        return None
    path = Path(default_config_file)
    return path if path.is_file() else None


def command(stage: str, args: list[str], gpus: int, config: Path | None) -> list[str]:
    """The command line that runs ``stage`` with ``args``."""
    module = f"pipeline.{stage}"
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        return [*launch, "--config_file", str(config), "-m", module, *args]
    if gpus > 1:
        return [*launch, "--config_file", str(DEFAULT_CONFIG), "--multi_gpu", "--num_processes", str(gpus),
                "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a stage on every GPU of this machine (or the CPU).")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the stage")
    ns = parser.parse_args(argv)
    import torch

    cmd = command(ns.stage, ns.args, torch.cuda.device_count(), user_config())
    if ns.dry_run:
        print(shlex.join(cmd))
        return 0
    return supervise(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
