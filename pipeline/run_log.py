"""A training run's curves: the plots CSV and the TensorBoard scalars, exactly once per step.

A run logs a few tables (training rows, validation rows), each a CSV file and TensorBoard
scalars. The rows logged so far travel in every checkpoint (:meth:`RunLog.rows`). When a run
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ssd import atomic

log = logging.getLogger("pipeline.run_log")

#: TensorBoard writes event files with this prefix; only these are removed from a run's folder.
EVENTS_PREFIX = "events.out.tfevents."


@dataclass(frozen=True)
class Table:
    """One CSV file of a run's log: its path and columns (``step`` first)."""

    csv_path: Path
    fields: tuple[str, ...]


class RunLog:
    """Rows of several tables (``{"train": Table(...), "val": Table(...)}``), each appended to
    its CSV file and written as ``<table>/<field>`` scalars to TensorBoard in ``tb_dir``. Only the
    main process writes (``enabled``); every process keeps the rows, which any rank's checkpoint
    may carry."""

    def __init__(self, tb_dir: Path, tables: Mapping[str, Table], enabled: bool):
        self.tb_dir, self.tables, self.enabled = Path(tb_dir), dict(tables), enabled
        self._rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.tables}
        self._writer = None

    @property
    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every row logged in this run so far per table, resumed ones included (what a checkpoint stores)."""
        return {name: list(rows) for name, rows in self._rows.items()}

    def start(self, rows: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
              hparams: Mapping[str, Any] | None = None) -> None:
        """Begin (``rows`` empty) or resume (``rows`` from the checkpoint): every table's file is
        rewritten to hold exactly its rows; events of earlier attempts are removed."""
        rows = rows or {}
        self._rows = {name: [dict(r) for r in rows.get(name, ())] for name in self.tables}
        if not self.enabled:
            return
        for name, table in self.tables.items():
            if self._rows[name]:
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=table.fields, lineterminator="\n")
                writer.writeheader()
                writer.writerows(self._rows[name])
                atomic.write_text(table.csv_path, text.getvalue())
            else:  # a fresh run: the file appears with its first row (a run that fails first writes none)
                table.csv_path.unlink(missing_ok=True)
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        for old in self.tb_dir.glob(EVENTS_PREFIX + "*"):  # this run's own event files, nothing else
            old.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.tb_dir))
        if hparams:
            # In the run's own folder ("."), so the next start() removes these events too.
            self._writer.add_hparams(dict(hparams), {}, run_name=".")
        restored = 0
        for name, table_rows in self._rows.items():
            for row in table_rows:
                self._scalars(name, row)
            restored += len(table_rows)
        self._writer.flush()
        if restored:
            log.info("%s: %d logged rows restored from the checkpoint", self.tb_dir, restored)

    def add(self, table: str, row: Mapping[str, Any]) -> None:
        """Log one row of ``table`` (every process calls it; the main process writes)."""
        spec = self.tables[table]
        row = {k: row.get(k) for k in spec.fields}
        self._rows[table].append(row)
        if not self.enabled:
            return
        new = not spec.csv_path.exists()
        if new:
            spec.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=spec.fields, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
        self._scalars(table, row)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _scalars(self, table: str, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{table}/{key}", value, step)
