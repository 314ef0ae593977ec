"""The training stage's parts, each findable by name (:mod:`pipeline.train` is the stage):

- :mod:`~pipeline.training.setup`: the run built from its config (data, model, optimiser, EMA,
  validation) and resumed from its newest checkpoint;
- :mod:`~pipeline.training.step`: one optimiser step (frames and clips alike) and its bookkeeping;
- :mod:`~pipeline.training.loop`: the steps, with logging, validation and checkpoints between them;
- :mod:`~pipeline.training.validation`: periodic validation, the best model, early stopping;
- :mod:`~pipeline.training.progress`: a progress bar on a terminal, log lines elsewhere;
- :mod:`~pipeline.training.outputs`: checkpoints and the finished run's files;
- :mod:`~pipeline.training.signals`: SIGTERM/SIGINT turned into "stop after this step".
"""
