"""A training run's curves: the plots CSV and the TensorBoard scalars, exactly once per step.

The rows logged so far travel in every checkpoint (:meth:`RunLog.rows`). When a run
resumes, both files are rebuilt from the checkpoint's rows before training goes on, so
whatever happened to them in between they end up holding every logged step once:

- DVC deletes a stage's outputs before it reruns it (the CSV is one), so a resumed stage
  would otherwise keep only the rows after the resume;
- rows logged after the checkpoint and before a kill are logged again by the resumed run;
- after a spot recovery the new machine has the checkpoints (a bucket) and nothing else.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from ssd import atomic

log = logging.getLogger("pipeline.run_log")

#: TensorBoard writes event files with this prefix; only these are removed from a run's folder.
EVENTS_PREFIX = "events.out.tfevents."


class RunLog:
    """Rows of ``fields`` appended to ``csv_path`` and written as ``tag_prefix/<field>`` scalars
    to TensorBoard in ``tb_dir``. Only the main process writes (``enabled``); every process
    keeps the rows, which any rank's checkpoint may carry."""

    def __init__(self, csv_path: Path, tb_dir: Path, fields: tuple[str, ...], enabled: bool, tag_prefix: str = "train"):
        self.csv_path, self.tb_dir, self.fields = Path(csv_path), Path(tb_dir), fields
        self.enabled, self.tag_prefix = enabled, tag_prefix
        self._rows: list[dict[str, Any]] = []
        self._writer = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row logged in this run so far, resumed ones included (what a checkpoint stores)."""
        return list(self._rows)

    def start(self, rows: Iterable[Mapping[str, Any]] = (), hparams: Mapping[str, Any] | None = None) -> None:
        """Begin (``rows`` empty) or resume (``rows`` from the checkpoint): both files are
        rewritten to hold exactly ``rows``; events of earlier attempts are removed."""
        self._rows = [dict(r) for r in rows]
        if not self.enabled:
            return
        if self._rows:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self._rows)
            atomic.write_text(self.csv_path, text.getvalue())
        else:  # a fresh run: the file appears with its first row (a run that fails first writes none)
            self.csv_path.unlink(missing_ok=True)
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        for old in self.tb_dir.glob(EVENTS_PREFIX + "*"):  # this run's own event files, nothing else
            old.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.tb_dir))
        if hparams:
            # In the run's own folder ("."), so the next start() removes these events too.
            self._writer.add_hparams(dict(hparams), {}, run_name=".")
        for row in self._rows:
            self._scalars(row)
        self._writer.flush()
        if self._rows:
            log.info("%s: %d logged rows restored from the checkpoint", self.csv_path, len(self._rows))

    def add(self, row: Mapping[str, Any]) -> None:
        """Log one row (every process calls it; the main process writes)."""
        row = {k: row.get(k) for k in self.fields}
        self._rows.append(row)
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        if new:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
        self._scalars(row)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _scalars(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{self.tag_prefix}/{key}", value, step)
