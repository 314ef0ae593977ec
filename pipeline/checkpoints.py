"""Training checkpoints that survive being killed while they are written.

Layout of a run's checkpoint directory::

    checkpoints/<run>/step-00000200/   complete: Accelerate's save_state files, our own tensor
                                       files (<name>.safetensors: the EMA, the best model) + meta.json
    checkpoints/<run>/.tmp-step-...    being written (or abandoned by a kill): never loaded

A checkpoint is written by every process into a temporary directory with
``Accelerator.save_state`` (model, optimiser, scheduler, scaler, every
process's RNG states); once all processes are done, the main process writes
``meta.json`` (step, config fingerprint, ...) into it and renames the directory
to its final name. Only directories with the final name and a ``meta.json`` are
complete: a kill at any moment leaves either the previous checkpoints or the
new one, never something half-written that looks complete. Old checkpoints
are removed after the new one is complete (Accelerate's own rotation deletes
before it writes).

All processes must see the same directory (a local disk on one machine, a
shared file system or bucket mount across machines).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from pipeline.locks import HeldLock, try_lock
from ssd.atomic import TMP_PREFIX, write_json

log = logging.getLogger("pipeline.checkpoints")

_NAME = re.compile(r"^step-(\d{8})$")
META = "meta.json"


class RunLocked(Exception):
    """Another process holds the run's lock: a second run of the same name is under way."""


def hold_run_lock(root: str | os.PathLike) -> HeldLock | None:
    """An exclusive lock on ``root``'s sibling ``<root>.lock`` (``root``: a run's checkpoints
    folder), held until the returned lock is closed; :class:`RunLocked` when another process
    holds it. Two runs of one name both resumed from the same checkpoint and wrote each
    other's plot rows. Where the file system can't lock (some bucket mounts), a warning and None."""
    root = Path(root)
    path = root.with_name(f"{root.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        lock = try_lock(fd)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"another run of {root.name} holds {path} ({holder}); wait for it to end, or stop "
                        "it") from None
    if lock is None:
        log.warning("%s: this file system has no locks: nothing stops a second run of %s from starting", path,
                    root.name)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return lock


def is_checkpoint_name(name: str) -> bool:
    """A complete checkpoint's folder name (``step-NNNNNNNN``)."""
    return _NAME.match(name) is not None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / META).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META).read_text())


def save_checkpoint(
    accelerator,
    root: str | os.PathLike,
    step: int,
    meta: dict[str, Any],
    keep: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    local: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Save the training state registered with ``accelerator`` as ``root/step-NNNNNNNN``.

    ``tensors``: more state the main process writes, ``{name: state dict}`` as
    ``<name>.safetensors`` (tensors only: loading one can't run code, unlike a pickle); read
    back with :func:`load_tensors`. ``local``: state each process has its own of, written by
    each as ``<name>-rank<index>.safetensors``. Call on every process. Returns the final directory.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, state in (local or {}).items():
        _save(state, tmp / f"{name}-rank{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, state in (tensors or {}).items():
            _save(state, tmp / f"{name}.safetensors")
        write_json(tmp / META, {**meta, "step": step})
        if final.exists():  # a rerun after a kill between rename and cleanup
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _save(state: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(path))


def load_tensors(checkpoint: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """The state dict saved as ``name`` by :func:`save_checkpoint`; None if the checkpoint has none."""
    path = Path(checkpoint) / f"{name}.safetensors"
    return load_file(str(path)) if path.is_file() else None


def remove_incomplete(root: str | os.PathLike) -> list[str]:
    """Delete abandoned temporary checkpoint directories (main process only); return their names."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for d in root.iterdir():
        if d.name.startswith(TMP_PREFIX) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed
