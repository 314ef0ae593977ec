"""Advisory locks (``flock``) that live exactly as long as the run holding them: :class:`HeldLock`.

A ``flock`` belongs to the open file, not to the process, and lasts until every descriptor of
that file is closed. Processes forked while it is held (loader workers, a conversion pool)
inherit a descriptor, and they can outlive a killed parent by seconds (loader workers) or for
good (a pool waiting on its queue): the lock would refuse the rerun. So a forked child closes
its copy at once, and a lock that is dropped without :meth:`HeldLock.close` is closed when it is
collected.
"""

from __future__ import annotations

import fcntl
import os
import weakref


class HeldLock:
    """An open descriptor holding an exclusive ``flock``; :meth:`close` releases it."""

    def __init__(self, fd: int):
        self.fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (lock := ref()) is not None and lock._forget())

    def _forget(self) -> None:
        """In a forked child: close this process's copy (the parent's lock stays)."""
        if self.fd is not None:
            self._finalizer.detach()
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            self._finalizer()  # closes the descriptor, once
            self.fd = None


def try_lock(fd: int) -> HeldLock | None:
    """An exclusive ``flock`` on the open descriptor ``fd``, or None where the file system has no
    locks (ENOLCK, EOPNOTSUPP: some bucket mounts), in which case ``fd`` is closed. Raises
    ``BlockingIOError``, ``fd`` left open, when another process holds the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:
        os.close(fd)
        return None
    return HeldLock(fd)
