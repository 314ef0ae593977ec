"""Train a detector with Accelerate: one process, many GPUs, many machines, spot instances.

Usage::

    python -m pipeline.launch train --section train_voc   # what the DVC stage runs: every GPU, or the CPU
    python -m pipeline.train --section train_voc          # one process
    python -m pipeline.supervise accelerate launch -m pipeline.train --section train_voc

The ``--section`` of the params file (needed when it has several training sections) is
parsed into a frozen :class:`~pipeline.train_config.TrainConfig`; ``--set key=value``
overrides it; unknown or mistyped keys are an error that lists the valid ones. Outputs
(``{name}`` is the config's ``name``):

- ``models/{name}.pt``: the model file (:mod:`ssd.model_file`) of the last step, written once,
  atomically; with ``ema.enabled`` it holds the EMA's averaged weights;
- ``models/{name}-best.pt``: with ``validation.every``, the model of the best validation step;
  later stages use whichever of the two their ``model`` / ``init_weights`` key names;
- ``metrics/train-{name}.json``: final loss (mean of the last 50 steps), steps, images/s, wall time, skipped steps (the
  whole run, across preemptions); with validation, ``val``: the last validation's mAP, the best
  one and its step;
- ``plots/train-{name}.csv``: per logged step: loss, its parts, learning rate, gradient norm;
- ``plots/val-{name}.csv``: per validation: the VOC mAP (``map``, the first of
  ``validation.modes``; ``map_<mode>`` for the others);
- ``runs/{name}/``: TensorBoard scalars (``train/*`` and ``val/*``: the same rows) and the
  effective config, ``config.yaml``;
- ``checkpoints/{name}/``: periodic checkpoints while the run is unfinished.

Validation (``validation.every`` steps and at the end) runs the evaluate stage's code on the
``validation.split`` of ``data.shards``, split across the processes and gathered, so the figure
is a one-process evaluation's. ``validation.patience`` stops the run early after that many
validations without a better mAP (exit 0, the outputs written at the step it stopped).
On a terminal a progress bar shows the steps; otherwise (a scheduler's log file) each logged
row is one plain log line with the loss parts, learning rate, images/s and the time left.

Preemption: on SIGTERM or SIGINT every process finishes the current step, a
checkpoint is saved, and the run exits with code **75** (``EX_TEMPFAIL``:
"try again"). Running the same command again resumes from the newest complete
checkpoint (mid-epoch included; the data stream is deterministic in the step,
so nothing is replayed or skipped), and rebuilds the plots CSV and the TensorBoard
scalars from the rows the checkpoint carries; the EMA and the best model travel in the checkpoint too. A run killed without notice resumes
from its last periodic checkpoint. A checkpoint trained with other settings (any key
outside :data:`pipeline.resume.RESUME_SAFE`, or other data or init weights) is refused
(exit code 2) with the keys that differ, unless ``--restart`` is given. When the run
finishes, its checkpoints are deleted (``keep_checkpoints: true`` keeps them).

Exit codes: 0 finished, 2 bad configuration or input, 75 preempted (resume by rerunning).
Under a launcher (``accelerate launch``, ``torchrun``), ``pipeline.supervise`` passes the
75 on; the launchers themselves turn it into 1.
"""

from __future__ import annotations

import logging

from pipeline.config import choose_section, load_config, load_params
from pipeline.dvc_inputs import check_tracked
from pipeline.stage import StageError, arg_parser, run
from pipeline.train_config import DataConfig, ModelConfig, PriorsParams, RunPaths, TrainConfig, ValidationConfig
from pipeline.training.loop import loop
from pipeline.training.signals import StopFlag
from pipeline.training.outputs import EXIT_PREEMPTED, finish
from pipeline.training.setup import setup

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "PriorsParams", "ValidationConfig", "StageError", "train",
           "main", "EXIT_PREEMPTED"]

log = logging.getLogger("pipeline.train")


def train(cfg: TrainConfig, restart: bool = False) -> int:
    """Run (or resume) the training described by ``cfg``; returns the exit code (0, or 75 when
    stopped by a signal after saving a checkpoint)."""
    # Listening from the start: a stop during the set-up (loading, forking the loader) is seen at
    # the first step, which saves a checkpoint and exits 75, rather than killing the process.
    with StopFlag() as stop:
        r = setup(cfg, restart)
        try:
            code = loop(r, stop)
            if code == 0:
                code = finish(r)
            return code
        finally:
            r.log.close()
            r.accelerator.end_training()
            if r.lock is not None:
                r.lock.close()  # another run of this name may start now


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--section", help="params section to run (needed when the file has several train sections)")
    parser.add_argument("--restart", action="store_true", help="discard checkpoints trained with other settings")
    args = parser.parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        section = choose_section(TrainConfig, params, args.section, "train", args.params)
        cfg = load_config(TrainConfig, params, section, args.overrides, args.params)
        paths = RunPaths.of(cfg)
        unwritten = {} if cfg.validation.every else dict.fromkeys(
            map(str, (paths.best_model, paths.val_plots)), "validation.every is 0: no validation")
        written = {str(paths.model): "models_dir", str(paths.metrics): "metrics_dir", str(paths.plots): "plots_dir"}
        check_tracked(cfg, section, unwritten=unwritten, written=written)
        return train(cfg, restart=args.restart)

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
