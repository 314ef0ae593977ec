"""Run a launcher so that stopping works: signals reach the stage, and its exit code comes back.

Usage::

    python -m pipeline.supervise accelerate launch --multi_gpu --num_processes 8 -m pipeline.train --section train_voc
    python -m pipeline.supervise torchrun --nproc_per_node 8 -m pipeline.train --section train_voc

(``python -m pipeline.launch`` and the SLURM, torchrun and SkyPilot scripts run their
launchers this way.) Two things go wrong without it:

- **The exit code.** A preempted training process saves a checkpoint and exits 75 ("try
  again"), which SLURM requeues on and SkyPilot's ``recover_on_exit_codes`` recovers on.
  ``accelerate launch`` and ``torchrun`` turn their workers' 75 into 1. Here every stage
  process (:func:`pipeline.stage.run`) reports its exit code into a folder this supervisor
  made (``$SSD_EXIT_REPORTS``), and the supervisor exits with the code the processes agree
  on: 75 when all reported 75 (or were killed after one did), their common code otherwise,
  else the launcher's.
- **The signals.** The launcher runs in a session of its own, so a terminal's Ctrl-C reaches
  only this process, which forwards one SIGTERM (the stages' "save and stop") and waits:
  nothing is killed 0.25 s later with no checkpoint, and a launcher is never signalled twice
  while it shuts its workers down. A second Ctrl-C is forwarded as SIGINT (the stages' "abort
  now"). A SIGTERM to this process (SLURM, a spot instance's shutdown, ``kill``) is forwarded
  the same way. After the launcher exits, stage processes it left running are waited for
  (``--grace`` seconds), so their reports are in before the code is chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.stage import EXIT_USER_ERROR

#: The environment variable naming the folder stage processes report their exit codes to.
REPORTS_ENV = "SSD_EXIT_REPORTS"
#: A stage process stopped by a signal after saving a checkpoint: rerun to resume.
EXIT_PREEMPTED = 75


def _report_path() -> Path | None:
    folder = os.environ.get(REPORTS_ENV)
    if not folder or not Path(folder).is_dir():
        return None
    return Path(folder) / f"{socket.gethostname()}-{os.getpid()}.json"


def report_start() -> None:
    """Called by every stage process when it starts (no-op outside a supervisor)."""
    _write_report({"pid": os.getpid(), "code": None})


def report_exit(code: int) -> None:
    """Called by every stage process with its exit code (no-op outside a supervisor)."""
    _write_report({"pid": os.getpid(), "code": int(code)})


def _write_report(report: dict[str, Any]) -> None:
    path = _report_path()
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)  # the supervisor never reads half a report


def exit_code(launcher_code: int, reports: Sequence[int | None]) -> int:
    """The code to exit with, from the launcher's and the stage processes' (None: killed before it reported).

    - no reports (the command runs no stage): the launcher's code;
    - every process 0: 0 (whatever the launcher says);
    - every process that reported said 75 (others killed while the rest saved): 75;
    - every reported non-zero code the same: that code (a config error on every rank: 2);
    - a user error (2) on some process: 2, whatever the others did (a bad sample read by one
      rank's loader stops it with its one line; the others then fail in their next collective,
      or are killed by the launcher: effects, not causes);
    - otherwise the launcher's code, or 1 if it claims success.
    """
    if not reports:
        return launcher_code
    codes = [c for c in reports if c is not None]
    if codes and all(c == 0 for c in codes) and len(codes) == len(reports):
        return 0
    failed = {c for c in codes if c != 0}
    if len(failed) == 1 and (next(iter(failed)) == EXIT_PREEMPTED or len(codes) == len(reports)):
        return failed.pop()
    if EXIT_USER_ERROR in failed:
        return EXIT_USER_ERROR
    return launcher_code if launcher_code != 0 else 1


def _read_reports(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_stages(folder: Path, grace: float) -> list[int | None]:
    """The reported codes, after waiting up to ``grace`` s for stage processes still running."""
    deadline = time.monotonic() + grace
    while True:
        reports = _read_reports(folder)
        running = [r for r in reports.values() if r.get("code") is None and _alive(int(r["pid"]))]
        if not running or time.monotonic() > deadline:
            return [r.get("code") for r in reports.values()]
        time.sleep(0.2)


def supervise(cmd: Sequence[str], grace: float = 120.0) -> int:
    """Run ``cmd``, forwarding SIGTERM/SIGINT as described above; returns the exit code to use."""
    folder = Path(tempfile.mkdtemp(prefix="ssd-exit-reports-"))
    env = {**os.environ, REPORTS_ENV: str(folder)}
    # torchrun and accelerate launch SIGKILL their workers this many seconds after a stop request,
    # saved or not (torch's default: 30); a large model's checkpoint, or a stop that lands in a
    # validation, takes longer. The scripts in scripts/ set it themselves.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(grace)))
    signals = {"count": 0, "first": 0}
    try:
        child = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"error: {cmd[0]}: cannot run it ({e.strerror or e})", file=sys.stderr)
        return 2

    def forward(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            signals["first"] = signum
            _send(child, signal.SIGTERM)
            print(f"pipeline.supervise: {signal.Signals(signum).name}: asked {cmd[0]} to save and stop",
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            _send(child, signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher_code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if launcher_code < 0:  # died by a signal: report it as a shell would
        launcher_code = 128 - launcher_code
    code = exit_code(launcher_code, _wait_for_stages(folder, grace))
    shutil.rmtree(folder, ignore_errors=True)
    if signals["first"] and code not in (0, 2, EXIT_PREEMPTED):
        # Stopped before any stage could save (a stage that doesn't save, or one still starting):
        # the signal's code, as a shell reports it, not the launcher's 1 ("a bug").
        return 128 + signals["first"]
    return code


def _send(child: subprocess.Popen, sig: int) -> None:
    try:
        child.send_signal(sig)
    except ProcessLookupError:
        pass


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (argparse turns the ValueError into its usage error)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a launcher; forward SIGTERM/SIGINT; exit with its stage processes' code (75: preempted)."
    )
    parser.add_argument("--grace", type=seconds, default=120.0,
                        help="seconds to wait for stage processes still running after the launcher exits")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line")
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.error("no command given")
    return supervise(ns.command, ns.grace)


if __name__ == "__main__":
    raise SystemExit(main())
