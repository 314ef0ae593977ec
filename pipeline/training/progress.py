"""Training progress: a tqdm bar on a terminal; under a scheduler (stderr not a terminal: Slurm,
a cloud launcher, ``dvc repro > log``) one plain log line per logged row instead, since a bar's
carriage returns make a log file unreadable."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping

log = logging.getLogger("pipeline.train")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps of one run. ``enabled``: the main process; ``interactive``: None asks ``sys.stderr.isatty()``."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool, interactive: bool | None = None):
        self.name, self.total, self.enabled = name, total, enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._start, self._first = time.perf_counter(), initial
        self._bar = None
        if enabled and self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        """One more step done (``step`` is the new step count)."""
        if self._bar is not None:
            self._bar.update(1)

    def logged(self, row: Mapping[str, Any]) -> None:
        """A row of the training log was written at ``row["step"]``: shown on the bar, or as a log line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            return
        log.info(self.line(row))

    def line(self, row: Mapping[str, Any]) -> str:
        """``name step 120/1400 loss 2.3451 (box 0.8123, class 1.5328) lr 1.00e-03 43.2 images/s ETA 5m12s``."""
        step = int(row["step"])
        done = step - self._first
        elapsed = time.perf_counter() - self._start
        eta = _duration(elapsed / done * (self.total - step)) if done > 0 else "?"
        kd = f", distill {row['distill_loss']:.4f}" if "distill_loss" in row else ""
        return (f"{self.name} step {step}/{self.total} loss {row['loss']:.4f} (box {row['box_loss']:.4f}, "
                f"class {row['class_loss']:.4f}{kd}) lr {row['lr']:.2e} {row['images_per_s']:.1f} images/s ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
