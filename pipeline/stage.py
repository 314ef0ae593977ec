"""What every stage entry point shares: logging, the ``--params``/``--set`` flags, clean errors.

A stage's ``main(argv=None)`` builds its parser with :func:`arg_parser`, and
runs its body through :func:`run`, which turns a :class:`StageError` or
:class:`~pipeline.config.ConfigError` into one line on stderr and exit code 2
(never a traceback from deep inside).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Mapping

from pipeline.config import ConfigError
from ssd.errors import InputError

EXIT_USER_ERROR = 2
#: Stopped by Ctrl-C (SIGINT), as shells report it (128 + 2).
EXIT_INTERRUPTED = 130

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A problem with a stage's inputs, with a one-line message naming the file and the problem."""


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the record,
    so a stage run in-process (tests, notebooks) never logs into a stream replaced since."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def check_writable(*folders: str | os.PathLike) -> None:
    """:class:`StageError` unless each folder exists, or can be created, and can be written.

    Called before a stage's work, so a run that can't save its outputs stops at once instead of
    after hours of training. Nothing is created here.
    """
    for folder in folders:
        probe = Path(folder).absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StageError(f"{folder}: can't write there ({probe} is not a folder)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StageError(f"{folder}: can't write there (no write permission in {probe})")


def check_replaceable(out: str | os.PathLike, key: str, owned: Callable[[Path], bool], what: str,
                      inputs: Mapping[str, str | os.PathLike] | None = None) -> None:
    """:class:`StageError` unless replacing the folder ``out`` whole (how a stage writes a folder
    output, atomically) loses nothing the user didn't ask to lose: ``out`` must not be, or hold,
    any of ``inputs`` (key -> path the stage reads), and an existing non-empty ``out`` must look
    like the stage's own output (``owned(out)``; ``what`` names it). Called before any work."""
    target = Path(os.path.abspath(out))
    for name, path in (inputs or {}).items():
        held = Path(os.path.abspath(path))
        if held == target or target in held.parents:
            raise StageError(f"{key}: {out} holds {name} ({path}); writing the output there would delete it: "
                             "choose another folder")
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not owned(target)):
        raise StageError(f"{key}: {out} exists and is not {what}; the output replaces its folder whole, so this "
                         "would delete it: choose a new or empty folder")


def setup_logging(level: int = logging.INFO) -> None:
    """Log ``LEVEL message`` lines to stderr (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_ssd_stage", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._ssd_stage = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Accelerate logs every file of every checkpoint at INFO; our own lines say what matters.
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils", "torch._subclasses"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def arg_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the flags every stage takes: ``--params FILE`` and repeated ``--set key=value``."""
    parser = argparse.ArgumentParser(description=(description or "").strip().split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of this stage's params section (repeatable; value parsed as YAML)",
    )
    return parser


def _peer_failure(e: RuntimeError) -> bool:
    """An error of the collective communication in a job of several processes (gloo raises a plain
    RuntimeError, "Connection closed by peer", when another process has exited). The process
    group may already be gone (the stage ends it on the way out): the launcher's WORLD_SIZE says."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "[gloo", "gloo/", "NCCL"))


def one_line(message: str) -> str:
    """An error message as one line. An error raised in a DataLoader worker arrives wrapped
    in the worker's traceback; its last line is the original ``module.Type: message``."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    if len(lines) > 1 and "Original Traceback" in message:
        return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1].strip())
    return "; ".join(line.strip() for line in lines)


def run(body: Callable[[], int | None]) -> int:
    """Run a stage body; user-facing errors become one line on stderr and exit code 2.

    User-facing errors: :class:`StageError`, :class:`~pipeline.config.ConfigError`, the
    library's :class:`~ssd.errors.InputError`, and an ``OSError`` about a named file (a
    folder that can't be created, a disk that is full). Anything else is a bug and keeps
    its traceback.

    Under :mod:`pipeline.supervise` the exit code is also reported to the supervisor (a
    launcher in between, ``accelerate launch`` or ``torchrun``, replaces it with its own).
    """
    from pipeline import supervise

    setup_logging()
    code: int | None = None
    supervise.report_start()
    try:
        code = body() or 0
    except (StageError, ConfigError, InputError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except OSError as e:
        if e.filename is None:  # not about a file the user named: a bug, with its traceback
            raise
        print(f"error: {e.filename}: {e.strerror or type(e).__name__}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except RuntimeError as e:
        loop = re.fullmatch(r"""Symlink loop from (['"])(.*)\1""", str(e))  # pathlib's resolve(), Python < 3.13
        if loop:
            print(f"error: {loop.group(2)}: a loop of symbolic links", file=sys.stderr)
            code = EXIT_USER_ERROR
        elif _peer_failure(e):
            # Another process of the job failed (its own error says why) and this one's next
            # collective broke: one line, not a traceback that buries the cause.
            print(f"error: stopped because the job's other processes can't be reached (most likely one of them "
                  f"failed first: see its error): {one_line(str(e))[:300]}", file=sys.stderr)
            code = 1
        else:
            raise
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing is half-written
        print("interrupted (Ctrl-C): finished outputs are kept, unfinished ones discarded", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        supervise.report_exit(1 if code is None else code)  # None: an exception, a traceback follows
    return code
